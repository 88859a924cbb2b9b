"""The small decoder's word vocabulary: special tokens, then the training captions' frequent words."""

from __future__ import annotations

from collections import Counter

from vlmcache.metrics.captions import words

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD, BOS, EOS, UNK = range(4)


def build_vocabulary(captions: list[str], min_count: int) -> list[str]:
    """Special tokens, then the words seen at least `min_count` times, most frequent first."""
    counts = Counter(word for caption in captions for word in words(caption))
    kept = sorted((word for word, count in counts.items() if count >= min_count), key=lambda w: (-counts[w], w))
    return [*SPECIALS, *kept]
