"""Compatibility scores (linear CKA, mutual-kNN): known answers, and agreement with direct formulas."""

from __future__ import annotations

import numpy as np
import pytest

from vlmcache.errors import VlmcacheError
from vlmcache.metrics.compat import (
    gram,
    hsic_table,
    knn_indices,
    knn_overlap,
    linear_cka,
    mutual_knn,
    rank_pairs,
    score_pairs,
)

RNG = np.random.default_rng(0)


def features(rows: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, width)).astype(np.float32)


def rotation(width: int, seed: int = 1) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((width, width)))
    return q.astype(np.float32)


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_of_a_set_with_itself_its_rotation_and_scaling_is_one(debiased):
    x = features(500, 24)
    assert linear_cka(x, x, debiased) == pytest.approx(1.0, abs=1e-5)
    assert linear_cka(x, 7.5 * x @ rotation(24), debiased) == pytest.approx(1.0, abs=1e-5)
    assert linear_cka(x + 3.0, x, debiased) == pytest.approx(1.0, abs=1e-5)  # a shift changes nothing (centred)


def test_cka_of_independent_noise_is_near_zero_and_debiasing_removes_the_width_bias():
    x, y = features(2000, 16, 1), features(2000, 16, 2)
    assert linear_cka(x, y) < 0.02 and abs(linear_cka(x, y, debiased=True)) < 0.01
    # Wide sets: plain CKA of unrelated features is far from 0 (≈ pq / sqrt((n²p + np²)(n²q + nq²))), debiased is not.
    wide, narrow = features(1000, 512, 3), features(1000, 128, 4)
    assert 0.15 < linear_cka(wide, narrow) < 0.35
    assert abs(linear_cka(wide, narrow, debiased=True)) < 0.01


def test_cka_matches_the_feature_space_formula_and_debiased_hsic_matches_song_et_al():
    x, z = features(300, 20, 5), features(300, 3, 6)
    y = np.concatenate([x[:, :5] @ features(5, 12, 7), z], axis=1) + 0.5 * features(300, 15, 8)
    xc, yc = x - x.mean(0), y - y.mean(0)
    direct = (np.linalg.norm(xc.T @ yc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc)))
    assert linear_cka(x, y) == pytest.approx(direct, rel=1e-4)

    def unbiased_hsic(k: np.ndarray, m: np.ndarray) -> float:  # Song et al. (2012), eq. 5, written out
        n = len(k)
        k, m = k.astype(np.float64).copy(), m.astype(np.float64).copy()
        np.fill_diagonal(k, 0)
        np.fill_diagonal(m, 0)
        ones = np.ones(n)
        return float((np.trace(k @ m) + ones @ k @ ones * (ones @ m @ ones) / ((n - 1) * (n - 2))
                      - 2 / (n - 2) * ones @ k @ m @ ones) / (n * (n - 3)))

    kx, ky = gram(x), gram(y)
    expected = unbiased_hsic(kx, ky) / np.sqrt(unbiased_hsic(kx, kx) * unbiased_hsic(ky, ky))
    assert linear_cka(x, y, debiased=True) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_of_a_concatenation_comes_from_the_per_set_table(debiased):
    a, b, t = features(400, 10, 9), features(400, 30, 10), features(400, 8, 11)
    table = hsic_table(["a", "b", "t"], [gram(a), gram(b), gram(t)])
    direct = linear_cka(np.concatenate([a, b], 1), t, debiased)
    assert table.cka(("a", "b"), ("t",), debiased) == pytest.approx(direct, rel=1e-4)


def test_mutual_knn_of_identical_sets_is_one_and_of_random_sets_about_k_over_n():
    x = features(1000, 32, 12)
    assert mutual_knn(x, x, k=10) == 1.0
    assert mutual_knn(x, 2 * x @ rotation(32), k=5) == 1.0  # cosine neighbours: invariant to rotation and scale
    chance = [mutual_knn(x, features(1000, 32, seed), k=10) for seed in (13, 14, 15)]
    assert np.mean(chance) == pytest.approx(10 / 999, rel=0.3)


def test_knn_by_hand():
    # Four points on a line: each one's nearest other point by cosine of the centred features.
    points = np.array([[0.0, 1.0], [0.1, 1.0], [3.0, -1.0], [3.2, -1.0]])
    assert knn_indices(gram(points), 1)[:, 0].tolist() == [1, 0, 3, 2]
    first, second = np.array([[1, 2], [0, 2]]), np.array([[2, 3], [2, 0]])
    assert knn_overlap(first, second) == pytest.approx((1 / 2 + 2 / 2) / 2)
    with pytest.raises(VlmcacheError, match=r"--k 4: must be between 1 and the number of paired rows minus one \(3\)"):
        knn_indices(gram(points), 4)


def test_score_pairs_ranks_the_set_that_shares_more_structure_first():
    latent = features(800, 8, 20)
    maps = [features(8, width, 21 + i) for i, width in enumerate((40, 40, 40, 12))]
    images = {"clean": latent @ maps[0] + 0.3 * features(800, 40, 30),
              "noisy": latent @ maps[1] + 3.0 * features(800, 40, 31),
              "unrelated": features(800, 40, 32)}
    texts = {"text": latent @ maps[3] + 0.3 * features(800, 12, 33)}
    scores = score_pairs(images, texts, k=10, combine=2, pool=2)
    singles = [s.image_features for s in scores if len(s.image_sets) == 1]
    assert singles == ["clean", "noisy", "unrelated"]
    # Combinations only of the 2 best singles; every score ranks the same way here.
    assert {s.image_features for s in scores if len(s.image_sets) > 1} == {"clean+noisy"}
    for by in ("cka_debiased", "mutual_knn"):
        assert [s.image_features for s in rank_pairs(scores, by) if len(s.image_sets) == 1] == singles
    clean = next(s for s in scores if s.image_sets == ("clean",))
    # Not 1: CKA is not invariant to the two sides' different (non-isotropic) maps of the latent.
    assert clean.cka > 0.6 and clean.mutual_knn > 0.3 and scores[-1].cka_debiased < 0.05


def test_score_pairs_refuses_bad_input():
    x = features(20, 4)
    with pytest.raises(VlmcacheError, match="--rank-by speed: use one of cka, cka_debiased, mutual_knn"):
        score_pairs({"a": x}, {"t": x}, rank_by="speed")
    with pytest.raises(VlmcacheError, match="different numbers of paired rows"):
        score_pairs({"a": x}, {"t": x[:10]})
    with pytest.raises(VlmcacheError, match="share a name"):
        score_pairs({"a": x}, {"a": x})
    with pytest.raises(VlmcacheError, match="at least 4 paired rows"):
        score_pairs({"a": x[:3]}, {"t": x[:3]}, k=1)
