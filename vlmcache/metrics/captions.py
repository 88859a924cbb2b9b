"""Caption metrics and the training-free caption baselines.

Scores come from `pycocoevalcap` (the COCO caption evaluation code): BLEU-1..4, METEOR, ROUGE-L and
CIDEr-D against all references of each image, every one ×100 as papers print them. Captions are
tokenised by the Stanford PTB tokenizer of that package; it and METEOR run on Java. Without a `java`
on the PATH the captions are tokenised in Python (lower-case, punctuation-only tokens dropped, which is
what the PTB tokenizer does to these captions) and METEOR is reported as None, with a warning naming it.

Baselines: the nearest-neighbour captioner (Devlin et al. 2015, "Exploring nearest neighbor approaches
for image captioning") and the constant most-frequent caption.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from vlmcache.errors import VlmcacheError

METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider")
METRIC_LABELS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


def words(text: str) -> list[str]:
    """Lower-case words of a caption; tokens made only of punctuation are dropped (as the PTB tokenizer
    of the COCO evaluation drops them)."""
    return [word for word in text.lower().split() if re.search(r"\w", word)]


def java_available() -> bool:
    """Whether METEOR and the PTB tokenizer can run (they are Java programs)."""
    return shutil.which("java") is not None


@contextmanager
def _child_stderr_silenced() -> Iterator[None]:
    """Child processes started in the block write their stderr to /dev/null.

    The PTB tokenizer (a Java process pycocoevalcap starts with our stderr) reports its speed there on every
    call; those lines would sit above a failure's one-line error. pycocoevalcap gives no way to redirect it."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _tokenize(captions: dict[int, list[str]], java: bool) -> dict[int, list[str]]:
    if java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        with _child_stderr_silenced():
            return PTBTokenizer().tokenize({key: [{"caption": c} for c in values] for key, values in captions.items()})
    return {key: [" ".join(words(c)) for c in values] for key, values in captions.items()}


def score_captions(candidates: list[str], references: list[list[str]], meteor: bool = True) -> dict[str, float | None]:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr (×100) of one candidate per image against its references.

    METEOR is None when `meteor=False` (per-epoch validation skips its slow Java run) or Java is missing.
    """
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError:
        raise VlmcacheError("caption metrics need pycocoevalcap: pip install 'vlmcache[caption]'") from None
    if len(candidates) != len(references) or not candidates:
        raise ValueError(f"{len(candidates)} candidates for {len(references)} reference lists")
    java = java_available()
    if not java:
        warnings.warn("no java on the PATH: METEOR is skipped (reported as None) and captions are tokenised in "
                      "Python instead of by the PTB tokenizer; install a Java runtime (Debian: default-jre-headless)",
                      stacklevel=2)
    gts = _tokenize(dict(enumerate(references)), java)
    res = _tokenize({i: [c] for i, c in enumerate(candidates)}, java)
    # ROUGE-L divides by the candidate's length: an empty caption is scored as one word that matches nothing.
    res = {key: [value[0] or "<empty>"] for key, value in res.items()}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores: dict[str, float | None] = {f"bleu{n + 1}": 100 * float(value) for n, value in enumerate(bleu)}
    scores["meteor"] = None
    if meteor and java:
        from pycocoevalcap.meteor.meteor import Meteor

        scores["meteor"] = 100 * float(Meteor().compute_score(gts, res)[0])
    scores["rouge_l"] = 100 * float(Rouge().compute_score(gts, res)[0])
    scores["cider"] = 100 * float(Cider().compute_score(gts, res)[0])
    return {name: scores[name] for name in METRICS}


def nearest_neighbour_captions(train_images: np.ndarray, train_texts: np.ndarray, train_captions: list[str],
                               caption_image: np.ndarray, query_images: np.ndarray, k: int = 5) -> list[str]:
    """For each query image, the consensus caption of its `k` nearest training images (cosine on the
    cached image features): among those images' captions, the one whose cached text feature has the
    highest mean cosine to the others' (Devlin et al. 2015 pick the consensus caption the same way, with
    BLEU/CIDEr as the similarity; the cached sentence features make it a matrix product)."""
    images = F.normalize(torch.from_numpy(np.asarray(train_images, np.float32)), dim=-1)
    texts = F.normalize(torch.from_numpy(np.asarray(train_texts, np.float32)), dim=-1)
    queries = F.normalize(torch.from_numpy(np.asarray(query_images, np.float32)), dim=-1)
    rows_of = [np.flatnonzero(caption_image == image) for image in range(len(images))]
    chosen = []
    for start in range(0, len(queries), 512):
        nearest = torch.topk(queries[start:start + 512] @ images.T, min(k, len(images)), dim=1).indices
        for neighbours in nearest.tolist():
            rows = np.concatenate([rows_of[image] for image in neighbours])
            similarity = texts[rows] @ texts[rows].T
            mean_to_others = (similarity.sum(1) - similarity.diagonal()) / max(1, len(rows) - 1)
            chosen.append(train_captions[int(rows[int(torch.argmax(mean_to_others))])])
    return chosen


def most_frequent_caption(captions: list[str]) -> str:
    """The most frequent training caption (compared lower-cased, punctuation dropped; first seen wins a tie)."""
    if not captions:
        raise ValueError("no captions")
    return Counter(" ".join(words(caption)) for caption in captions).most_common(1)[0][0]
