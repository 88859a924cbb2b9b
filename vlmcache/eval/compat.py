"""`vlmcache compat`: which of a cache's (image set, text set) pairs look most alignable, before training.

Reads a paired sample of a split (vlmcache.cache.sample) from every feature set of the cache and scores
every pair — each image set, and '+' combinations of the best few — against every text set with linear
CKA (plain and debiased) and mutual-kNN (vlmcache.metrics.compat). Seconds on a CPU, where training
every pair takes minutes each.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from vlmcache.cache.sample import read_paired_sample
from vlmcache.cache.store import open_cache
from vlmcache.errors import VlmcacheError
from vlmcache.metrics.compat import DEFAULT_RANK_BY, DEFAULT_SAMPLE, SCORES, PairScore, score_pairs

ONE_PAIR_NOTE = ("the cache holds one image and one text set, so there is only one pair: nothing to rank; "
                 "add sets with extract --image-model/--text-model or --layers")


@dataclass
class CompatResult:
    """Every scored pair, best first by `rank_by`, and how the sample was drawn."""

    cache: Path
    split: str
    rows: int  # paired rows scored (one caption per image)
    k: int
    seed: int
    rank_by: str
    scores: list[PairScore] = field(default_factory=list)
    image_sets: list[str] = field(default_factory=list)
    text_sets: list[str] = field(default_factory=list)
    seconds: float = 0.0
    note: str = ""

    def to_json(self) -> dict:
        """Plain JSON: the settings and one object per pair, best first."""
        return {"cache": str(self.cache), "split": self.split, "rows": self.rows, "k": self.k, "seed": self.seed,
                "rank_by": self.rank_by, "image_sets": self.image_sets, "text_sets": self.text_sets,
                "seconds": self.seconds, "note": self.note,
                "pairs": [{"image_features": s.image_features, "text_features": s.text_set,
                           **{score: s.score(score) for score in SCORES}} for s in self.scores]}


def compat(cache: str | Path, split: str = "train", sample: int | None = DEFAULT_SAMPLE, k: int = 10, *,
           combine: int = 2, pool: int = 4, rank_by: str = DEFAULT_RANK_BY, seed: int = 0) -> CompatResult:
    """Score every (image set or combination, text set) pair of a cache on a paired sample of `split`.

    `sample`: pairs drawn (None or 0: all of the split's images, one caption each); `k`: neighbours for
    mutual-kNN; `combine`/`pool`: '+' combinations of up to `combine` image sets among the `pool` best
    single sets (`combine=1`: none).
    """
    started = time.perf_counter()
    sample = sample or None  # 0 reads as "all", as on the command line
    for option, value, low in (("--sample", sample, 4), ("--k", k, 1), ("--combine", combine, 1), ("--pool", pool, 1)):
        if value is not None and value < low:
            raise VlmcacheError(f"{option} {value}: must be at least {low}")
    if rank_by not in SCORES:
        raise VlmcacheError(f"--rank-by {rank_by}: use one of {', '.join(SCORES)}")
    opened = open_cache(cache)
    paired = read_paired_sample(opened, split, sample, seed)
    rows = len(paired.image_rows)
    if k >= rows:
        raise VlmcacheError(f"--k {k}: the sample has {rows} paired rows; give a k below that")
    scores = score_pairs(paired.images, paired.texts, k=k, combine=combine, pool=pool, rank_by=rank_by)
    one_pair = len(paired.images) == 1 and len(paired.texts) == 1
    return CompatResult(opened.path, split, rows, k, seed, rank_by, scores, list(paired.images), list(paired.texts),
                        time.perf_counter() - started, ONE_PAIR_NOTE if one_pair else "")
