"""Compatibility scores (linear CKA, mutual-kNN): known answers, agreement with direct formulas, the compat
command on a cache, and ablate --image-features auto."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from conftest import run_cli

from vlmcache.align.ablate import ablate
from vlmcache.cache.sample import paired_rows
from vlmcache.data.synthetic import write_synthetic_cache
from vlmcache.errors import VlmcacheError
from vlmcache.eval.compat import compat
from vlmcache.metrics.compat import (
    DEFAULT_RANK_BY,
    SCORE_LABELS,
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
    table = hsic_table(["a", "b", "t"], np.stack([gram(a), gram(b), gram(t)]))
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
    for by in ("cka", "cka_debiased"):
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
    assert score_pairs({"a": x}, {"a": x}, k=3)[0].cka == pytest.approx(1.0)  # a name may be on both sides
    with pytest.raises(VlmcacheError, match="at least 4 paired rows"):
        score_pairs({"a": x[:3]}, {"t": x[:3]}, k=1)


def test_paired_rows_take_one_valid_caption_per_valid_image_with_a_fixed_seed():
    caption_image = np.repeat(np.arange(6), 5)
    image_valid = np.array([True, True, False, True, True, True])
    caption_valid = np.ones(30, bool)
    caption_valid[15:20] = False  # image 3 has no readable caption
    caption_valid[0] = False
    images, captions = paired_rows(caption_image, image_valid, caption_valid, None, seed=0)
    assert images.tolist() == [0, 1, 4, 5]
    assert caption_image[captions].tolist() == images.tolist() and caption_valid[captions].all() and 0 not in captions
    again = paired_rows(caption_image, image_valid, caption_valid, None, seed=0)
    assert [a.tolist() for a in again] == [images.tolist(), captions.tolist()]
    drawn = {tuple(paired_rows(caption_image, image_valid, caption_valid, None, seed)[1]) for seed in range(20)}
    assert len(drawn) > 1  # another seed, other captions
    sample_images, sample_captions = paired_rows(caption_image, image_valid, caption_valid, 2, seed=0)
    assert len(sample_images) == 2 and set(sample_images) <= set(images)
    assert sorted(sample_images) == sample_images.tolist() and caption_image[sample_captions].tolist() == sample_images.tolist()


@pytest.fixture(scope="module")
def multi_cache(tmp_path_factory):
    """A synthetic cache with 3 image sets (noise 1, 0.3, 8: 'sharp' shares most with the text) and 2 text sets."""
    return write_synthetic_cache(tmp_path_factory.mktemp("compat") / "cache", 400, val_images=50, captions_per_image=5,
                                 dim=24, text_dim=16, shard_size=128, extra_image_sets={"sharp": 0.3, "blurred": 8.0},
                                 extra_text_sets={"texts-b": 1.0})


def test_compat_scores_every_pair_of_a_cache(multi_cache, tmp_path):
    result = compat(multi_cache, sample=300, k=10, combine=2, pool=2)
    assert result.rows == 300 and result.split == "train" and result.rank_by == "mutual_knn" and not result.note
    assert result.image_sets == ["synthetic-images", "sharp", "blurred"] and result.text_sets == ["synthetic-texts", "texts-b"]
    singles = [(s.image_features, s.text_set) for s in result.scores if len(s.image_sets) == 1]
    assert len(singles) == 6 and [image for image, _ in singles[:2]] == ["sharp", "sharp"]
    assert [image for image, _ in singles[-2:]] == ["blurred", "blurred"]
    assert {s.image_features for s in result.scores if len(s.image_sets) == 2} == {"synthetic-images+sharp"}
    # The sample is fixed by the seed: the same call gives the same numbers.
    assert compat(multi_cache, sample=300, combine=1).scores[0].cka == pytest.approx(
        next(s.cka for s in result.scores if s.image_sets == ("sharp",) and s.text_set == result.scores[0].text_set))
    assert compat(multi_cache, sample=0, combine=1).rows == 400  # 0: every train image


def test_compat_command_prints_a_ranked_table_and_json(multi_cache, tmp_path, capsys):
    code, out, err = run_cli(["compat", multi_cache, "--sample", "200", "--json", tmp_path / "c.json", "--rank-by",
                              "cka"], capsys)
    assert code == 0, err
    flat = " ".join(out.split())  # the title wraps at the console's width
    assert "200 image–caption pairs, k=10, ranked by CKA" in flat and "CKA (debiased)" in out
    first_row = next(line for line in out.splitlines() if re.match(r"│\s+1 │", line))
    assert "sharp" in first_row
    saved = json.loads((tmp_path / "c.json").read_text())
    assert saved["rank_by"] == "cka" and len(saved["pairs"]) == 6 + 3 * 2  # all 3 pairs of the 3 sets (pool 4)
    assert saved["pairs"][0]["cka"] >= saved["pairs"][-1]["cka"]
    assert set(saved["pairs"][0]) == {"image_features", "text_features", "cka", "cka_debiased", "mutual_knn"}


def test_compat_on_one_pair_says_so(tmp_path, capsys):
    cache = write_synthetic_cache(tmp_path / "one", 60, dim=8, text_dim=8, captions_per_image=2)
    code, out, _ = run_cli(["compat", cache], capsys)
    flat = " ".join(out.split())
    assert code == 0 and "one image and one text set" in flat and "1 pairs of 1 image × 1 text" in flat
    assert f"ranked by {SCORE_LABELS[DEFAULT_RANK_BY]}" in flat  # the command's default is the library's


@pytest.mark.parametrize(("args", "message"), [
    (["--split", "test"], "has no split 'test'; it has train, val"),
    (["--k", "500"], "--k 500: the sample has 400 paired rows"),
    (["--sample", "2"], "--sample 2: must be at least 4"),
    (["--rank-by", "vibes"], "--rank-by vibes: use one of cka, cka_debiased, mutual_knn"),
])
def test_compat_refuses_bad_options_in_one_line(multi_cache, capsys, args, message):
    code, _, err = run_cli(["compat", multi_cache, *args], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_compat_refuses_a_set_of_other_data(multi_cache, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(multi_cache, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["feature_sets"]["images"]["sharp"]["provenance"]["dataset_fingerprint"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = run_cli(["compat", copy], capsys)
    assert code == 2 and "images@sharp: made from a different dataset" in err and len(err.strip().splitlines()) == 1


def test_ablate_auto_trains_only_the_best_scoring_pairs(multi_cache, tmp_path, capsys):
    expected = [(s.image_features, s.text_set) for s in compat(multi_cache).scores[:2]]
    code, out, err = run_cli(["ablate", multi_cache, "--image-features", "auto", "--top", "2", "--projectors", "linear",
                              "--losses", "infonce", "--seeds", "0", "--epochs", "2", "--jobs", "1", "--no-baselines",
                              "--out", tmp_path / "ablation"], capsys)
    assert code == 0, err
    saved = json.loads((tmp_path / "ablation" / "ablation.json").read_text())
    trained = [(cell["config"]["image_features"], cell["config"]["text_features"]) for cell in saved["cells"]]
    assert sorted(trained) == sorted(expected) and "2 runs trained" in out
    assert [(p["image_features"], p["text_features"]) for p in saved["selected"]] == expected
    assert f"auto: {expected[0][0]} + {expected[0][1]} (mutual_knn" in out
    # Only among the text sets asked for.
    restricted = ablate([multi_cache], tmp_path / "restricted", projectors=("linear",), losses=("infonce",), seeds=(0,),
                        epochs=1, jobs=1, image_features=("auto",), text_features=("texts-b",), top=1,
                        with_baselines=False, progress=False)
    assert [p["text_features"] for p in restricted.selected] == ["texts-b"] and restricted.cells_trained == 1


@pytest.mark.parametrize(("args", "message"), [
    (["--top", "2"], "--top 2: picks pairs for --image-features auto"),
    (["--image-features", "auto,sharp"], "--image-features auto: chooses the image sets itself; give it alone"),
    (["--image-features", "auto", "--top", "0"], "--top 0: must be at least 1"),
    (["--image-features", "auto", "--text-features", "nope"], "--text-features nope: "),
])
def test_ablate_auto_refuses_bad_options_in_one_line(multi_cache, tmp_path, capsys, args, message):
    code, _, err = run_cli(["ablate", multi_cache, "--out", tmp_path / "a", *args], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
