"""How alike two representations of the same items are, before any training: linear CKA and mutual-kNN.

Encoder pairs whose representations are already similar align best (freeze-align, CVPR 2025, picks pairs
by CKA; the "platonic representation" work measures mutual nearest-neighbour alignment), so these scores
rank a cache's (image set, text set) pairs in seconds instead of training every one.

Both scores work on n *paired* rows: row i of every set describes the same item (an image, and one of its
captions). Everything goes through each set's n×n Gram matrix of its centred features:

- **Linear CKA** (Kornblith et al., 2019): HSIC(K, L) / sqrt(HSIC(K, K) · HSIC(L, L)) with linear kernels.
  `standard` uses the plain (biased) HSIC, tr(KHLH)/(n−1)²; `debiased` the unbiased estimator of
  Song et al. (2012), which removes the upward bias plain CKA has when the width is not small next to n
  (independent 1,280-d and 384-d features on 2,000 rows score 0.25 plain, 0.001 debiased). Both are invariant to
  rotations and isotropic scaling of either side, and equal 1 for a set against itself.
- **Mutual-kNN** (Huh et al., 2024): the mean over rows of |kNN_A(i) ∩ kNN_B(i)| / k, neighbours by cosine
  of the centred features, the row itself excluded. 1 for identical neighbourhoods, ≈ k/(n−1) for
  unrelated ones.

Both HSICs are bilinear in the Gram matrices and the Gram of a concatenation [A, B] is K_A + K_B, so the
scores of any '+' combination of sets follow from per-set Grams and one (sets × sets) table of HSICs:
no combination is ever materialised as features. Pure functions of arrays: no files, no cache.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from vlmcache.errors import VlmcacheError

SCORES = ("cka", "cka_debiased", "mutual_knn")
SCORE_LABELS = {"cka": "CKA", "cka_debiased": "CKA (debiased)", "mutual_knn": "mutual-kNN"}
# Measured on Flickr8k (benchmarks/compat_study.py, docs/results.md): over 27 trained (image, text) pairs,
# mutual-kNN's rank correlation with dev mean recall was 0.92, CKA's (plain or debiased) 0.48; among the image
# sets of one text set, CKA's was negative (−0.35 to −0.63), mutual-kNN's 0.77–0.80.
DEFAULT_RANK_BY = "mutual_knn"
# Paired rows scored by default: the Grams of 13 sets of 2,000 rows take 210 MB (memory grows as n²).
DEFAULT_SAMPLE = 2000


def gram(features: np.ndarray) -> np.ndarray:
    """The linear-kernel Gram matrix (n, n) float32 of a set's rows after centring each column.

    Centring first keeps the float32 products away from the cancellation a raw Gram suffers from (every
    ReLU feature is positive, so raw dot products share one large common term)."""
    centred = np.asarray(features, dtype=np.float64)
    centred = (centred - centred.mean(axis=0)).astype(np.float32)
    return centred @ centred.T


@dataclass
class HsicTable:
    """Plain and debiased HSIC of every pair of sets (rows and columns in the order of `names`)."""

    names: list[str]
    standard: np.ndarray  # (sets, sets) float64
    debiased: np.ndarray

    def index(self, members: tuple[str, ...]) -> list[int]:
        return [self.names.index(name) for name in members]

    def cka(self, first: tuple[str, ...], second: tuple[str, ...], debiased: bool = False) -> float:
        """CKA between the concatenations of two groups of sets, from the table (bilinearity of HSIC)."""
        table = self.debiased if debiased else self.standard
        a, b = self.index(first), self.index(second)
        cross = table[np.ix_(a, b)].sum()
        self_a, self_b = table[np.ix_(a, a)].sum(), table[np.ix_(b, b)].sum()
        if self_a <= 0 or self_b <= 0:  # a constant set (or, debiased, too few rows): no structure to compare
            return 0.0
        return float(cross / np.sqrt(self_a * self_b))


def hsic_table(names: list[str], grams: np.ndarray) -> HsicTable:
    """Plain and debiased HSIC between every pair of Gram matrices, given stacked as (sets, n, n) (n ≥ 4).

    Every term of both estimators is a bilinear form of the two Grams, so all pairs come from one
    (sets × n²) product and a few (sets × n) ones.
    """
    n = grams.shape[1]
    if n < 4:
        raise VlmcacheError(f"compatibility scores need at least 4 paired rows; got {n}")
    flat = grams.reshape(len(grams), -1)
    inner = (flat @ flat.T).astype(np.float64)  # <K_i, K_j>
    diag = np.stack([np.diag(g) for g in grams]).astype(np.float64)
    row_sums = np.stack([g.sum(axis=1, dtype=np.float64) for g in grams])
    totals, traces = row_sums.sum(axis=1), diag.sum(axis=1)
    standard = (inner - 2.0 / n * row_sums @ row_sums.T + np.outer(totals, totals) / n**2) / (n - 1) ** 2
    # Song et al. (2012), with K̃ = K with its diagonal zeroed: tr(K̃L̃), 1ᵀK̃1 and K̃1·L̃1 from the same terms.
    off_rows = row_sums - diag
    off_totals = totals - traces
    debiased = ((inner - diag @ diag.T) + np.outer(off_totals, off_totals) / ((n - 1) * (n - 2))
                - 2.0 / (n - 2) * off_rows @ off_rows.T) / (n * (n - 3))
    return HsicTable(list(names), standard, debiased)


def knn_indices(gram_matrix: np.ndarray, k: int) -> np.ndarray:
    """(n, k) indices of each row's k nearest other rows by cosine similarity, from a Gram matrix."""
    n = gram_matrix.shape[0]
    if not 1 <= k < n:
        raise VlmcacheError(f"--k {k}: must be between 1 and the number of paired rows minus one ({n - 1})")
    norms = np.sqrt(np.maximum(np.diag(gram_matrix), 1e-12))
    cosine = torch.from_numpy(gram_matrix / norms[:, None] / norms[None, :])
    cosine.fill_diagonal_(-float("inf"))  # a row is not its own neighbour
    return torch.topk(cosine, k, dim=1).indices.numpy()  # torch's top-k: several times faster than argpartition


def knn_overlap(first: np.ndarray, second: np.ndarray) -> float:
    """Mean over rows of the shared fraction of two (n, k) neighbour lists."""
    shared = (first[:, :, None] == second[:, None, :]).any(axis=2).sum(axis=1)
    return float(shared.mean() / first.shape[1])


def linear_cka(x: np.ndarray, y: np.ndarray, debiased: bool = False) -> float:
    """Linear CKA of paired rows x (n, p) and y (n, q): plain, or debiased (see the module docstring)."""
    return hsic_table(["x", "y"], np.stack([gram(x), gram(y)])).cka(("x",), ("y",), debiased)


def mutual_knn(x: np.ndarray, y: np.ndarray, k: int = 10) -> float:
    """Mutual k-nearest-neighbour alignment of paired rows x and y (cosine of centred features)."""
    return knn_overlap(knn_indices(gram(x), k), knn_indices(gram(y), k))


@dataclass
class PairScore:
    """The scores of one (image feature sets, text feature set) pair."""

    image_sets: tuple[str, ...]
    text_set: str
    cka: float
    cka_debiased: float
    mutual_knn: float

    @property
    def image_features(self) -> str:
        """The pair's image side as train's --image-features spells it (a+b)."""
        return "+".join(self.image_sets)

    def score(self, by: str) -> float:
        return float(getattr(self, by))


def image_combinations(singles: list[str], ranking: list[str], combine: int, pool: int) -> list[tuple[str, ...]]:
    """Every single set, then the '+' combinations of 2..`combine` sets drawn from the `pool` best-ranked ones
    (in the cache's order within a combination). The pool keeps the count small: each combination costs
    a top-k search over n² similarities."""
    chosen = [name for name in ranking if name in singles][:pool]
    ordered = [name for name in singles if name in chosen]
    combos = [(name,) for name in singles]
    for size in range(2, min(combine, len(ordered)) + 1):
        combos += list(itertools.combinations(ordered, size))
    return combos


def score_pairs(image_features: dict[str, np.ndarray], text_features: dict[str, np.ndarray], *, k: int = 10,
                combine: int = 2, pool: int = 4, rank_by: str = DEFAULT_RANK_BY) -> list[PairScore]:
    """Score every (image combination, text set) pair of paired rows, best first by `rank_by`.

    `image_features`/`text_features`: set name → (n, d) features, row i of each describing the same item.
    Image combinations: each set alone, and '+' concatenations of up to `combine` sets among the `pool`
    sets whose best single pair scores highest (`combine=1`: singles only).
    """
    if rank_by not in SCORES:
        raise VlmcacheError(f"--rank-by {rank_by}: use one of {', '.join(SCORES)}")
    if not image_features or not text_features:
        raise VlmcacheError("compatibility scores need at least one image and one text feature set")
    rows = {len(features) for features in (*image_features.values(), *text_features.values())}
    if len(rows) != 1:
        raise VlmcacheError(f"feature sets hold different numbers of paired rows ({sorted(rows)}); pass rows of one sample")
    # Keyed by side: an image set and a text set may share a name (one encoder run on both, say). Written into
    # one preallocated stack, which the HSIC table reads without a copy.
    sides = [("image", name, x) for name, x in image_features.items()] + [("text", name, x) for name, x in text_features.items()]
    n = rows.pop()
    stack = np.empty((len(sides), n, n), np.float32)
    grams = {}
    for index, (side, name, features) in enumerate(sides):
        stack[index] = gram(features)
        grams[side, name] = stack[index]
    table = hsic_table([f"{side}:{name}" for side, name, _ in sides], stack)
    text_neighbours = {name: knn_indices(grams["text", name], k) for name in text_features}

    def pair(images: tuple[str, ...], text: str) -> PairScore:
        neighbours = image_neighbours.get(images)
        if neighbours is None:
            neighbours = image_neighbours[images] = knn_indices(sum(grams["image", name] for name in images), k)
        image_keys, text_key = tuple(f"image:{name}" for name in images), (f"text:{text}",)
        return PairScore(images, text, table.cka(image_keys, text_key), table.cka(image_keys, text_key, debiased=True),
                         knn_overlap(neighbours, text_neighbours[text]))

    image_neighbours: dict[tuple[str, ...], np.ndarray] = {}
    singles = [pair((name,), text) for name in image_features for text in text_features]
    ranking = [s.image_sets[0] for s in sorted(singles, key=lambda s: -s.score(rank_by))]
    combos = [c for c in image_combinations(list(image_features), list(dict.fromkeys(ranking)), combine, pool)
              if len(c) > 1]
    scored = singles + [pair(images, text) for images in combos for text in text_features]
    return rank_pairs(scored, rank_by)


def rank_pairs(scores: list[PairScore], by: str = DEFAULT_RANK_BY) -> list[PairScore]:
    """Pairs best first by one score (ties: fewer image sets first, then by name, so the order is stable)."""
    return sorted(scores, key=lambda s: (-s.score(by), len(s.image_sets), s.image_features, s.text_set))
