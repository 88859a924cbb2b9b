"""Per-query ranks kept beside a result (an .npz next to its JSON), so any later comparison of two results
(intervals, paired tests: vlmcache.metrics.stats) needs no re-embedding.

One file holds the ranks of one or more models ("rows") on one evaluated split: `names`, `image_ranks`
(rows, images) and `text_ranks` (rows, captions), the split's `caption_image`, its name and `items`, a
fingerprint of what was evaluated (image ids, captions, which caption belongs to which image). Two
results can be compared only when their `items` agree. Written atomically; read without pickle.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlmcache.cache.store import Split
from vlmcache.errors import VlmcacheError
from vlmcache.files import atomic_write
from vlmcache.metrics.retrieval import recall_from_ranks
from vlmcache.metrics.stats import QueryHits, query_hits


def items_key(split: Split) -> str:
    """A fingerprint of a split's evaluated items: its image ids, its captions and each caption's image."""
    digest = hashlib.sha256(json.dumps([split.image_ids, split.captions]).encode())
    digest.update(np.ascontiguousarray(split.caption_image, dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Ranked:
    """One model's 1-based ranks on one split (image ranks 0 = image without captions)."""

    image_ranks: np.ndarray
    text_ranks: np.ndarray
    caption_image: np.ndarray
    split: str
    items: str

    @classmethod
    def of(cls, ranks: tuple[np.ndarray, np.ndarray], split: Split) -> Ranked:
        """A model's (image ranks, text ranks) on `split`."""
        return cls(np.asarray(ranks[0]), np.asarray(ranks[1]), split.caption_image, split.name, items_key(split))

    def metrics(self) -> dict[str, float]:
        return recall_from_ranks(self.image_ranks, self.text_ranks)

    def hits(self) -> QueryHits:
        return query_hits(self.image_ranks, self.text_ranks, self.caption_image)


def ranks_path(result: str | Path) -> Path:
    """Where the ranks of a result file go: beside it, with the suffix .npz (results.json -> results.npz)."""
    return Path(result).with_suffix(".npz")


def save_ranks(path: str | Path, rows: dict[str, Ranked]) -> None:
    """Write the ranks of several models evaluated on the same split to one .npz (atomically)."""
    first = next(iter(rows.values()))
    if any(row.items != first.items or row.split != first.split for row in rows.values()):
        raise ValueError("one ranks file holds results on one split only")
    arrays = {"names": np.array(list(rows)), "split": np.array(first.split), "items": np.array(first.items),
              "caption_image": first.caption_image.astype(np.int64),
              "image_ranks": np.stack([row.image_ranks for row in rows.values()]).astype(np.int64),
              "text_ranks": np.stack([row.text_ranks for row in rows.values()]).astype(np.int64)}
    with atomic_write(path) as temporary, open(temporary, "wb") as handle:  # a file object: numpy adds no suffix
        np.savez_compressed(handle, **arrays)


def load_ranks(path: str | Path) -> dict[str, Ranked]:
    """{row name: Ranked} of an .npz written by save_ranks."""
    try:
        with np.load(path, allow_pickle=False) as data:
            names, split, items = data["names"].tolist(), str(data["split"]), str(data["items"])
            owner, image_ranks, text_ranks = data["caption_image"], data["image_ranks"], data["text_ranks"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
        raise VlmcacheError(f"{path}: not a readable ranks file written by vlmcache ({error})") from None
    return {name: Ranked(image_ranks[row], text_ranks[row], owner, split, items) for row, name in enumerate(names)}
