"""Known-answer tests of the table statistics (vlmcache.metrics.stats): intervals, paired tests, Holm."""

from __future__ import annotations

import numpy as np
import pytest

from vlmcache.metrics.retrieval import RETRIEVAL_KEYS, recall_from_ranks
from vlmcache.metrics.stats import (
    BEST,
    TIED,
    WORSE,
    holm,
    interval,
    mark_best,
    paired_difference,
    point_estimate,
    query_hits,
    sign_flip_test,
    stack_seeds,
)

I2T_R1, T2I_R1, MEAN = (RETRIEVAL_KEYS.index(key) for key in ("i2t_r1", "t2i_r1", "mean_recall"))


def ranks_from_hits(hit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Ranks that are 1 where `hit`, else a rank in 2..50."""
    return np.where(hit, 1, rng.integers(2, 51, size=hit.shape))


def model_ranks(rng: np.random.Generator, images: int = 1000, captions: int = 5, difficulty: np.ndarray | None = None,
                skill: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ranks of a model on `images` images with `captions` captions each: a query's log-rank is its image's
    shared difficulty plus its own noise, minus the model's skill (so models agree on which images are hard).
    At skill 0 the mean recall is ~45, as for a linear projector on Flickr8k."""
    owner = np.repeat(np.arange(images), captions)
    difficulty = rng.standard_normal(images) if difficulty is None else difficulty

    def ranks(shared: np.ndarray) -> np.ndarray:
        return 1 + np.floor(np.exp(1.5 + 1.5 * shared + rng.standard_normal(len(shared)) - skill)).astype(int)

    return ranks(difficulty), ranks(difficulty[owner]), owner


def test_point_estimate_is_recall_from_ranks():
    rng = np.random.default_rng(0)
    owner = np.sort(rng.integers(0, 40, size=150))  # uneven caption counts, some images without any
    image_ranks = np.where(np.isin(np.arange(40), owner), rng.integers(1, 20, size=40), 0)
    text_ranks = rng.integers(1, 40, size=150)
    expected = recall_from_ranks(image_ranks, text_ranks)
    assert point_estimate(query_hits(image_ranks, text_ranks, owner)) == pytest.approx([expected[k] for k in RETRIEVAL_KEYS])


def test_interval_of_a_known_bernoulli_recall_matches_the_normal_approximation():
    rng = np.random.default_rng(1)
    images, p = 1000, 0.45
    owner = np.repeat(np.arange(images), 5)
    # Image→text: one Bernoulli(p) query per image. Text→image: five independent Bernoulli(p) captions per image.
    hits = query_hits(ranks_from_hits(rng.random(images) < p, rng), ranks_from_hits(rng.random(5 * images) < p, rng),
                      owner)
    point, low, high = interval(hits, resamples=4000)
    for column, queries in ((I2T_R1, images), (T2I_R1, 5 * images)):
        observed = point[column] / 100
        half_width = 100 * 1.96 * np.sqrt(observed * (1 - observed) / queries)
        assert low[column] == pytest.approx(point[column] - half_width, abs=0.12 * half_width)
        assert high[column] == pytest.approx(point[column] + half_width, abs=0.12 * half_width)
    assert 2.9 < (high[I2T_R1] - low[I2T_R1]) / 2 < 3.3  # ~1.96·sqrt(.45·.55/1000) = 3.1 points


def test_captions_are_resampled_with_their_image():
    # All five captions of an image hit or miss together: 1,000 independent outcomes, not 5,000.
    rng = np.random.default_rng(2)
    images, p = 1000, 0.45
    owner = np.repeat(np.arange(images), 5)
    image_hit = rng.random(images) < p
    hits = query_hits(ranks_from_hits(image_hit, rng), ranks_from_hits(image_hit[owner], rng), owner)
    point, low, high = interval(hits, resamples=4000)
    observed = point[T2I_R1] / 100
    assert (high[T2I_R1] - low[T2I_R1]) / 2 == pytest.approx(100 * 1.96 * np.sqrt(observed * (1 - observed) / images),
                                                             rel=0.12)


def test_seed_spread_widens_the_interval():
    rng = np.random.default_rng(3)
    difficulty = rng.standard_normal(1000)
    steady = [query_hits(*model_ranks(np.random.default_rng(10), difficulty=difficulty))] * 3
    spread = [query_hits(*model_ranks(np.random.default_rng(10 + s), difficulty=difficulty, skill=skill))
              for s, skill in enumerate((-0.3, 0.0, 0.3))]
    _, low, high = interval(stack_seeds(steady))
    _, spread_low, spread_high = interval(stack_seeds(spread))
    assert (spread_high - spread_low)[MEAN] > 1.3 * (high - low)[MEAN]


def test_identical_runs_are_not_different():
    rng = np.random.default_rng(4)
    hits = query_hits(*model_ranks(rng))
    for test in ("bootstrap", "permutation"):
        result = paired_difference(hits, hits, test=test)
        assert np.all(result.difference == 0) and np.all(result.p_value == 1.0)
        assert np.all(result.low == 0) and np.all(result.high == 0)


def test_equal_models_are_rarely_called_different():
    # Two models of the same skill, each with its own noise: the 5% test says "different" about 5% of the time.
    rng = np.random.default_rng(5)
    p_values = []
    for trial in range(200):
        difficulty = rng.standard_normal(500)
        a, b = (query_hits(*model_ranks(rng, images=500, difficulty=difficulty)) for _ in range(2))
        p_values.append(paired_difference(a, b, resamples=400, seed=trial).p_value[MEAN])
    rejected = np.mean(np.array(p_values) < 0.05)
    assert 0.01 <= rejected <= 0.10, rejected
    assert np.median(p_values) > 0.3


def test_a_planted_two_point_difference_on_1000_queries_is_found():
    rng = np.random.default_rng(6)
    difficulty = rng.standard_normal(1000)
    # Seeds of each model: the same skill, their own noise. The better model's skill is set to give +2 points.
    worse = stack_seeds([query_hits(*model_ranks(rng, difficulty=difficulty)) for _ in range(3)])
    better = stack_seeds([query_hits(*model_ranks(rng, difficulty=difficulty, skill=0.1)) for _ in range(3)])  # ≈ +2 points
    result = paired_difference(better, worse)
    assert 1.0 < result.difference[MEAN] < 3.0
    assert result.p_value[MEAN] < 0.05 and result.low[MEAN] > 0
    assert sign_flip_test(better, worse)[MEAN] < 0.05


def test_holm_by_hand():
    # Sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 → raised to 0.06 (monotone).
    assert holm(np.array([0.01, 0.04, 0.03, 0.005])) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm(np.array([0.2, 0.9])) == pytest.approx([0.4, 0.9])
    assert holm(np.array([0.6, 0.7])) == pytest.approx([1.0, 1.0])  # 0.6·2 capped at 1, and 0.7 raised to it
    columns = holm(np.array([[0.01, 0.5], [0.04, 0.9], [0.03, 0.2], [0.005, 0.1]]))  # per column
    assert columns[:, 0] == pytest.approx([0.03, 0.06, 0.06, 0.02])


def test_marks_the_best_cell_and_those_not_distinguishable_from_it():
    rng = np.random.default_rng(7)
    difficulty = rng.standard_normal(1000)
    best = query_hits(*model_ranks(rng, difficulty=difficulty, skill=0.3))
    far_behind = query_hits(*model_ranks(rng, difficulty=difficulty, skill=-0.3))
    stats = mark_best([far_behind, best, best])
    assert stats.marks[:, MEAN].tolist() == [WORSE, BEST, TIED]
    assert stats.p_vs_best[1, MEAN] == 1.0 and stats.p_vs_best[2, MEAN] == 1.0 and stats.p_vs_best[0, MEAN] < 0.05
    assert np.all(stats.low <= stats.point) and np.all(stats.point <= stats.high)
    row = stats.row(0)
    assert row["mean_recall_mark"] == WORSE and row["mean_recall_ci_low"] < row["mean_recall_ci_high"]


def test_cells_on_different_images_are_refused():
    rng = np.random.default_rng(8)
    with pytest.raises(ValueError, match="same images"):
        paired_difference(query_hits(*model_ranks(rng, images=100)), query_hits(*model_ranks(rng, images=90)))
