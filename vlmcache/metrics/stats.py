"""Uncertainty of retrieval numbers: bootstrap intervals over the evaluated images, paired tests, Holm.

A recall on 1,000 images is itself an estimate: another 1,000 images from the same distribution would
give another number (R@1 near 45% has a standard error of ~1.6 points on 1,000 queries, several times the
seed-to-seed spread of a grid cell). Everything here starts from the per-query ranks a model gave (see
vlmcache.metrics.retrieval.retrieval_ranks), so no embedding is recomputed:

- `query_hits` turns ranks into per-image sufficient statistics: for each image, whether it found a
  caption in its top K (image→text) and how many of its captions found it in their top K (text→image).
  Every recall is a ratio of weighted sums of these, so a bootstrap replicate is one matrix product.
- The unit of resampling is the image, with all of its captions: captions of one image are not
  independent queries (they share the image), so resampling captions alone would understate the spread.
- A cell trained with several seeds is resampled on two levels (hierarchical bootstrap): the images,
  and the seeds. Its interval thus combines query sampling and training randomness. With few seeds the
  seed part is slightly narrow (a bootstrap of S values has (S-1)/S of their variance), which matters
  little beside the query part.
- Two cells evaluated on the same images are compared *paired*: each replicate draws one set of images
  for both, so what the images have in common (an easy image is easy for every model) cancels out.
- A table compares every cell with the best one; `holm` corrects those p-values for the number of
  comparisons, and cells whose corrected p-value is at least alpha are marked as not distinguishable.

Retrieval numbers are in percent, in the order of RETRIEVAL_KEYS (six recalls, then their mean). Tables of
other numbers that are functions of per-image outcomes (linear-probe accuracy, caption metrics) use the
same machinery through `bootstrap_table`: one draw of images per replicate for every row, percentile
intervals, the paired test against the best row, Holm.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from vlmcache.metrics.retrieval import KS, RETRIEVAL_KEYS

RESAMPLES = 2000  # bootstrap replicates: percentile intervals and p-values resolved to ~0.001
CONFIDENCE = 0.95
ALPHA = 0.05
BEST, TIED, WORSE = "best", "tied", "worse"  # the marks of a table cell (see mark_best)


@dataclass(frozen=True)
class QueryHits:
    """A cell's retrieval outcome per evaluated image, for one or more seeds on the same images.

    `hits[s, i]` holds, for seed s and image i: whether image i found one of its captions within
    K=1, 5, 10 (three 0/1 values; 0 for an image without captions), then how many of its captions found
    image i within K=1, 5, 10. `counts[i]` = (1 if image i has captions else 0, its number of captions):
    the denominators, the same for every model evaluated on these images.
    """

    hits: np.ndarray  # (seeds, images, 6) float64
    counts: np.ndarray  # (images, 2) float64

    @property
    def seeds(self) -> int:
        return self.hits.shape[0]

    @property
    def images(self) -> int:
        return self.hits.shape[1]


def query_hits(image_ranks: np.ndarray, text_ranks: np.ndarray, caption_image: np.ndarray) -> QueryHits:
    """Per-image hit counts of one model from its ranks (image ranks 0 = image without captions)."""
    image_ranks, text_ranks = np.asarray(image_ranks), np.asarray(text_ranks)
    caption_image = np.asarray(caption_image, dtype=np.int64)
    images, ks = len(image_ranks), np.asarray(KS)
    scored = image_ranks > 0
    image_to_text = scored[:, None] & (image_ranks[:, None] <= ks)
    text_to_image = np.stack([np.bincount(caption_image, weights=text_ranks <= k, minlength=images) for k in KS], 1)
    hits = np.concatenate([image_to_text, text_to_image], axis=1).astype(np.float64)
    counts = np.stack([scored, np.bincount(caption_image, minlength=images)], axis=1).astype(np.float64)
    return QueryHits(hits[None], counts)


def stack_seeds(per_seed: list[QueryHits]) -> QueryHits:
    """One cell from its seeds' hits; they must have been evaluated on the same images."""
    counts = per_seed[0].counts
    if any(item.counts.shape != counts.shape or not np.array_equal(item.counts, counts) for item in per_seed):
        raise ValueError("seeds of one cell were evaluated on different images")
    return QueryHits(np.concatenate([item.hits for item in per_seed]), counts)


def recalls(cell: QueryHits, weights: np.ndarray) -> np.ndarray:
    """(replicates, seeds, 7) recalls in percent of each seed, each row of `weights` (replicates, images)
    weighting the images (all ones: the plain numbers of recall_from_ranks)."""
    seeds, images, _ = cell.hits.shape
    found = (weights @ cell.hits.transpose(1, 0, 2).reshape(images, seeds * 6)).reshape(len(weights), seeds, 6)
    totals = weights @ cell.counts  # (replicates, 2): scored images, captions
    # Image→text recalls are over the images with captions, text→image ones over the captions.
    denominators = np.repeat(np.maximum(totals, 1e-12), 3, axis=1)[:, None, :]
    values = 100.0 * found / denominators
    return np.concatenate([values, values.mean(axis=2, keepdims=True)], axis=2)


def point_estimate(cell: QueryHits) -> np.ndarray:
    """The cell's seven numbers (mean over seeds), as the table prints them."""
    return recalls(cell, np.ones((1, cell.images)))[0].mean(axis=0)


def bootstrap_weights(images: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(resamples, images): how often each image is drawn in each bootstrap sample of `images` images."""
    drawn = rng.integers(0, images, size=(resamples, images))
    rows = np.repeat(np.arange(resamples), images)
    return np.bincount(rows * images + drawn.ravel(), minlength=resamples * images).reshape(resamples, images).astype(
        np.float64)


def replicates(cell: QueryHits, weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(replicates, 7) bootstrap values of the cell's mean over seeds: the images drawn by `weights`, the
    seeds drawn with replacement (one draw of all seeds per replicate)."""
    per_seed = recalls(cell, weights)  # (replicates, seeds, 7)
    if cell.seeds == 1:
        return per_seed[:, 0]
    chosen = rng.integers(0, cell.seeds, size=(len(weights), cell.seeds))
    return np.take_along_axis(per_seed, chosen[:, :, None], axis=1).mean(axis=1)


def percentile_interval(values: np.ndarray, confidence: float = CONFIDENCE) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) percentile interval of bootstrap `values` (replicates, ...) along the replicates."""
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(values, [tail, 100.0 - tail], axis=0)
    return low, high


def bootstrap_p_value(differences: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """Two-sided p-value of "no difference" from paired bootstrap differences (replicates, ...).

    The bootstrap distribution is shifted to the null (centred on 0): p is the share of replicates at
    least as far from the observed difference as the observed difference is from 0, counted with +1 so
    that it is never 0. Identical cells give p = 1.
    """
    extreme = np.abs(differences - observed) >= np.abs(observed) - 1e-9
    return (1.0 + extreme.sum(axis=0)) / (1.0 + len(differences))


def interval(cell: QueryHits, resamples: int = RESAMPLES, confidence: float = CONFIDENCE,
             seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(point, low, high) of a cell's seven numbers: 95% bootstrap interval over images (with their
    captions) and seeds."""
    rng = np.random.default_rng(seed)
    values = replicates(cell, bootstrap_weights(cell.images, resamples, rng), rng)
    return (point_estimate(cell), *percentile_interval(values, confidence))


@dataclass(frozen=True)
class Difference:
    """A paired comparison of cell a with cell b on the same images: a − b per metric (7 values each)."""

    a: np.ndarray
    b: np.ndarray
    difference: np.ndarray
    low: np.ndarray
    high: np.ndarray
    p_value: np.ndarray


def _check_paired(a: QueryHits, b: QueryHits) -> None:
    if a.counts.shape != b.counts.shape or not np.array_equal(a.counts, b.counts):
        raise ValueError("a paired comparison needs both cells evaluated on the same images")


def paired_difference(a: QueryHits, b: QueryHits, resamples: int = RESAMPLES, confidence: float = CONFIDENCE,
                      seed: int = 0, test: str = "bootstrap") -> Difference:
    """a − b with its paired bootstrap interval and a two-sided p-value of "no difference".

    `test="bootstrap"` takes the p-value from the same paired replicates as the interval (images and
    seeds resampled: training randomness counts); `test="permutation"` from `sign_flip_test` (exact for
    the given models, seeds averaged: training randomness does not count).
    """
    _check_paired(a, b)
    rng = np.random.default_rng(seed)
    weights = bootstrap_weights(a.images, resamples, rng)
    differences = replicates(a, weights, rng) - replicates(b, weights, rng)
    point_a, point_b = point_estimate(a), point_estimate(b)
    observed = point_a - point_b
    p_value = (bootstrap_p_value(differences, observed) if test == "bootstrap"
               else sign_flip_test(a, b, resamples, seed + 1))
    return Difference(point_a, point_b, observed, *percentile_interval(differences, confidence), p_value)


def sign_flip_test(a: QueryHits, b: QueryHits, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """Two-sided paired permutation test per metric: under "no difference" the two cells' outcomes on an
    image are exchangeable, so each image's difference keeps or flips its sign at random.

    Both cells share the denominators (same images), so a recall difference is a sum of per-image
    differences and every permutation is one matrix product. The seeds of each cell are averaged first.
    """
    _check_paired(a, b)
    per_image = a.hits.mean(axis=0) - b.hits.mean(axis=0)  # (images, 6)
    totals = np.repeat(np.maximum(a.counts.sum(axis=0), 1e-12), 3)
    contributions = 100.0 * per_image / totals
    contributions = np.concatenate([contributions, contributions.mean(axis=1, keepdims=True)], axis=1)
    observed = contributions.sum(axis=0)
    signs = np.random.default_rng(seed).choice(np.array([-1.0, 1.0]), size=(resamples, a.images))
    flipped = signs @ contributions
    extreme = np.abs(flipped) >= np.abs(observed) - 1e-9
    return (1.0 + extreme.sum(axis=0)) / (1.0 + resamples)


def holm(p_values: np.ndarray) -> np.ndarray:
    """Holm's step-down adjustment of m p-values (along the first axis): the k-th smallest is multiplied
    by m − k + 1, then made non-decreasing in that order and capped at 1. Rejecting adjusted p < alpha
    keeps the chance of any false rejection below alpha."""
    p_values = np.asarray(p_values, dtype=np.float64)
    count = len(p_values)
    order = np.argsort(p_values, axis=0, kind="stable")
    ranked = np.take_along_axis(p_values, order, axis=0)
    factors = (count - np.arange(count)).reshape((count,) + (1,) * (p_values.ndim - 1))
    adjusted = np.minimum(1.0, np.maximum.accumulate(ranked * factors, axis=0))
    result = np.empty_like(adjusted)
    np.put_along_axis(result, order, adjusted, axis=0)
    return result


@dataclass(frozen=True)
class TableStats:
    """Per cell (first axis) and metric (second axis, in the order of `metrics`): the numbers of a table."""

    point: np.ndarray
    low: np.ndarray
    high: np.ndarray
    p_vs_best: np.ndarray  # Holm-adjusted p-value of "same as the best cell" (1 for the best cell itself)
    marks: np.ndarray  # BEST, TIED (not distinguishable from the best at alpha) or WORSE, as strings
    metrics: tuple[str, ...] = RETRIEVAL_KEYS

    def row(self, index: int) -> dict:
        """One cell's numbers as JSON keys: <metric>_ci_low, _ci_high, _p_vs_best, _mark."""
        values = {}
        for column, metric in enumerate(self.metrics):
            values.update({f"{metric}_ci_low": float(self.low[index, column]),
                           f"{metric}_ci_high": float(self.high[index, column]),
                           f"{metric}_p_vs_best": float(self.p_vs_best[index, column]),
                           f"{metric}_mark": str(self.marks[index, column])})
        return values


def compare_cells(point: np.ndarray, values: np.ndarray, metrics: tuple[str, ...] = RETRIEVAL_KEYS,
                  confidence: float = CONFIDENCE, alpha: float = ALPHA) -> TableStats:
    """Intervals and marks from each cell's point estimates `point` (cells, metrics) and its bootstrap
    `values` (cells, replicates, metrics), replicate r of every cell drawn on the same images (paired).

    Per metric, the best cell is the one with the highest point estimate; every other cell is compared with
    it by the paired bootstrap test, and those m − 1 p-values are Holm-corrected together.
    """
    low, high = percentile_interval(values.transpose(1, 0, 2), confidence)
    best = point.argmax(axis=0)  # (metrics,)
    columns = np.arange(point.shape[1])
    differences = values - values[best, :, columns].T[None]  # each cell minus the best, per replicate
    raw = bootstrap_p_value(differences.transpose(1, 0, 2), point - point[best, columns][None])  # (cells, metrics)
    p_vs_best = np.ones_like(raw)
    for column in columns:
        others = np.flatnonzero(np.arange(len(point)) != best[column])
        if len(others):
            p_vs_best[others, column] = holm(raw[others, column])
    marks = np.where(p_vs_best >= alpha, TIED, WORSE).astype(object)
    marks[best, columns] = BEST
    return TableStats(point, low, high, p_vs_best, marks, tuple(metrics))


def mark_best(cells: list[QueryHits], resamples: int = RESAMPLES, confidence: float = CONFIDENCE,
              alpha: float = ALPHA, seed: int = 0) -> TableStats:
    """Intervals for every cell and, per metric, the best cell and those not distinguishable from it.

    All cells must be evaluated on the same images. One set of bootstrap image draws serves every cell,
    so each replicate is paired across cells; each cell's seeds are drawn independently (different
    trainings). See compare_cells for the test.
    """
    for cell in cells[1:]:
        _check_paired(cells[0], cell)
    rng = np.random.default_rng(seed)
    weights = bootstrap_weights(cells[0].images, resamples, rng)
    values = np.stack([replicates(cell, weights, rng) for cell in cells])  # (cells, replicates, 7)
    point = np.stack([point_estimate(cell) for cell in cells])
    return compare_cells(point, values, RETRIEVAL_KEYS, confidence, alpha)


def weighted_mean(per_image: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(replicates, ...) means of per-image scores `per_image` (images, ...), each row of `weights`
    (replicates, images) weighting the images: the bootstrap of a metric that is a mean over images."""
    per_image = np.asarray(per_image, dtype=np.float64)
    flat = per_image.reshape(len(per_image), -1)
    return ((weights @ flat) / weights.sum(axis=1, keepdims=True)).reshape((len(weights),) + per_image.shape[1:])


def bootstrap_table(statistic: Callable[[np.ndarray], np.ndarray], images: int, metrics: tuple[str, ...],
                    resamples: int = RESAMPLES, confidence: float = CONFIDENCE, alpha: float = ALPHA,
                    seed: int = 0) -> TableStats:
    """Intervals, best and not-distinguishable cells of a table whose numbers are functions of per-image
    outcomes on the same `images` images.

    `statistic(weights)` maps image weights (replicates, images) to every cell's numbers (cells,
    replicates, metrics); all-ones weights give the plain numbers (the point estimates). The images are
    resampled with replacement (one draw per replicate, shared by all cells: paired), so a corpus-level
    metric (BLEU, METEOR) is recomputed from resampled per-image counts and a mean of per-image scores is
    a weighted mean (see weighted_mean). Single-seed cells: no seed level here.
    """
    weights = bootstrap_weights(images, resamples, np.random.default_rng(seed))
    point = statistic(np.ones((1, images)))[:, 0]
    return compare_cells(point, statistic(weights), metrics, confidence, alpha)


def method(resampled: str, resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """How a table's statistics were made, for its JSON file; `resampled` names the unit of resampling."""
    return {"interval": f"{CONFIDENCE:.0%} percentile bootstrap over {resampled}",
            "test": "paired bootstrap against the best row on the same images", "correction": "holm",
            "alpha": ALPHA, "confidence": CONFIDENCE, "resamples": resamples, "seed": seed}
