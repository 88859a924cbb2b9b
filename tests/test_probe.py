"""Linear probe: metrics checked by hand, the protocol on synthetic features, and the command on a labelled folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import CIFAR, make_flickr_slice, require_shared_data, run_cli

from vlmcache.align.config import TrainConfig
from vlmcache.align.train import train
from vlmcache.encode.extract import extract
from vlmcache.errors import VlmcacheError
from vlmcache.eval.probe import C_SWEEP, class_accuracy, linear_probe, probe, stratified_split


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
    for row in report["rows"].values():
        assert 0 <= row["top1"] <= 100 and 0 <= row["mean_per_class"] <= 100
    # The same numbers from Python (deterministic), and a refusal for a cache without labels.
    again = probe(tmp_path / "cache", tmp_path / "run")
    assert again.rows == report["rows"]
    with pytest.raises(VlmcacheError, match="no class labels"):
        probe(tmp_path / "flickr-cache")
