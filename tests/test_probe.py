"""Linear probe: metrics checked by hand, the protocol on synthetic features, intervals with known answers, and
the command on a labelled folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import CIFAR, make_flickr_slice, require_shared_data, run_cli

from vlmcache.align.config import TrainConfig
from vlmcache.align.train import train
from vlmcache.encode.extract import extract
from vlmcache.errors import VlmcacheError
from vlmcache.eval.probe import C_SWEEP, accuracy_statistics, class_accuracy, linear_probe, probe, stratified_split
from vlmcache.metrics.stats import BEST, TIED, WORSE


def test_class_accuracy_by_hand():
    # class 0: 2 of 3 right, class 1: 1 of 1 right -> top-1 3/4, mean per class (2/3 + 1) / 2.
    metrics = class_accuracy(np.array([0, 0, 0, 1]), np.array([0, 0, 1, 1]))
    assert metrics["top1"] == pytest.approx(75.0) and metrics["mean_per_class"] == pytest.approx(100 * 5 / 6)


def test_stratified_split_is_seeded_and_per_class():
    labels = np.repeat([0, 1, 2], [10, 20, 4])
    kept, held = stratified_split(labels, 0.5, seed=3)
    assert np.bincount(labels[held]).tolist() == [5, 10, 2] and len(set(kept) & set(held)) == 0
    assert np.array_equal(held, stratified_split(labels, 0.5, seed=3)[1])
    assert not np.array_equal(held, stratified_split(labels, 0.5, seed=4)[1])


def test_probe_separates_separable_classes_and_not_random_labels():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((4, 32)) * 3
    labels = np.repeat(np.arange(4), 50)
    features = centres[labels] + rng.standard_normal((200, 32))
    train_rows, test_rows = stratified_split(labels, 0.5, 0)
    result = linear_probe(features[train_rows], labels[train_rows], features[test_rows], labels[test_rows])
    assert result["top1"] == 100.0 and result["C"] in C_SWEEP
    shuffled = rng.permutation(labels)  # labels carry no information: about chance (25%)
    noise = linear_probe(features[train_rows], shuffled[train_rows], features[test_rows], shuffled[test_rows])
    assert noise["top1"] < 45


def predictions_with_accuracy(labels: np.ndarray, p: float, rng: np.random.Generator) -> np.ndarray:
    """Each image right with probability p, independently; a wrong one predicts the next class."""
    return np.where(rng.random(len(labels)) < p, labels, (labels + 1) % (labels.max() + 1))


def test_accuracy_interval_of_a_known_bernoulli_accuracy_matches_the_normal_approximation():
    rng = np.random.default_rng(0)
    images, p = 2000, 0.7
    labels = rng.integers(0, 10, size=images)
    predicted = predictions_with_accuracy(labels, p, rng)
    table = accuracy_statistics(labels, [predicted])
    expected = class_accuracy(labels, predicted)
    assert table.point[0] == pytest.approx([expected["top1"], expected["mean_per_class"]])
    half = 100 * 1.96 * np.sqrt(p * (1 - p) / images)  # 2.0 points
    top1 = table.point[0, 0]
    assert table.low[0, 0] == pytest.approx(top1 - half, abs=0.25) and table.high[0, 0] == pytest.approx(top1 + half, abs=0.25)
    # Mean per class averages 10 class accuracies on ~200 images each: about as wide as top-1.
    assert table.high[0, 1] - table.low[0, 1] == pytest.approx(2 * half, rel=0.15)


def test_accuracy_all_right_has_a_zero_width_interval_and_the_seed_fixes_the_draws():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, size=100)
    perfect = accuracy_statistics(labels, [labels])
    assert perfect.low[0] == pytest.approx([100, 100]) and perfect.high[0] == pytest.approx([100, 100])
    predicted = predictions_with_accuracy(labels, 0.6, rng)
    first, again = accuracy_statistics(labels, [predicted], seed=3), accuracy_statistics(labels, [predicted], seed=3)
    other = accuracy_statistics(labels, [predicted], seed=4)
    assert np.array_equal(first.low, again.low) and np.array_equal(first.high, again.high)
    assert not np.array_equal(first.low, other.low)


def test_accuracy_rows_are_compared_with_the_best_on_the_same_images():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 5, size=1000)
    good = predictions_with_accuracy(labels, 0.8, rng)
    table = accuracy_statistics(labels, [predictions_with_accuracy(labels, 0.5, rng), good, good.copy()])
    assert table.marks[:, 0].tolist() == [WORSE, BEST, TIED]  # 50% vs 80% on 1,000 images; a copy of the best ties
    assert table.p_vs_best[0, 0] < 0.01 and table.p_vs_best[2, 0] == 1.0 and table.p_vs_best[1, 0] == 1.0
    assert set(table.row(0)) == {f"{metric}{suffix}" for metric in ("top1", "mean_per_class")
                                 for suffix in ("_ci_low", "_ci_high", "_p_vs_best", "_mark")}


@pytest.fixture
def cifar_slice(tmp_path):
    """4 classes x 12 images of the shared CIFAR-10 sample (symlinked)."""
    require_shared_data()
    for name in ("airplane", "cat", "ship", "truck"):
        (tmp_path / "cifar" / name).mkdir(parents=True)
        for image in sorted((CIFAR / name).iterdir())[:12]:
            (tmp_path / "cifar" / name / image.name).symlink_to(image)
    return tmp_path / "cifar"


def test_probe_command_carves_a_split_and_adds_the_projector_row(cifar_slice, tiny_models, tmp_path, capsys):
    models = {"image_model": str(tiny_models["vit"]), "text_model": str(tiny_models["distilbert"]), "progress": False}
    extract(cifar_slice, tmp_path / "cache", **models)
    extract(make_flickr_slice(tmp_path / "flickr", 6, 4), tmp_path / "flickr-cache", **models)
    train(tmp_path / "flickr-cache", tmp_path / "run", TrainConfig(projector="linear", epochs=1, batch_size=4))
    code, out, err = run_cli(["probe", tmp_path / "cache", "--checkpoint", tmp_path / "run", "--json", tmp_path / "p.json"],
                             capsys)
    assert code == 0, err
    assert "no 'train' split in the cache: carved from split 'test', per class 50% held out as test with seed 0" in out
    report = json.loads((tmp_path / "p.json").read_text())
    assert (report["train_images"], report["test_images"], report["val_images"], report["classes"]) == (24, 24, 4, 4)
    names = list(report["rows"])
    assert names[0].startswith("raw features (") and names[1].startswith("after image projector (linear")
    assert report["rows"]["chance (baseline)"]["top1"] == 25.0
    for name, row in report["rows"].items():
        assert 0 <= row["top1"] <= 100 and 0 <= row["mean_per_class"] <= 100
        if name == "chance (baseline)":  # a constant: no interval, no test
            assert "top1_ci_low" not in row
        else:
            assert row["top1_ci_low"] <= row["top1"] <= row["top1_ci_high"]
            assert row["mean_per_class_mark"] in ("best", "tied", "worse")
    assert report["statistics"]["resamples"] == 2000 and "±" in out and "the test images" in out
    # The same numbers from Python (deterministic), and a refusal for a cache without labels.
    again = probe(tmp_path / "cache", tmp_path / "run")
    assert again.rows == report["rows"]
    with pytest.raises(VlmcacheError, match="no class labels"):
        probe(tmp_path / "flickr-cache")
