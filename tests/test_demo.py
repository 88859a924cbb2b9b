"""`vlmcache demo` end to end on a small generated dataset (the no-data fallback's generator)."""

from __future__ import annotations

from conftest import run_cli
from PIL import Image

from vlmcache.datasets import load_dataset
from vlmcache.demo import make_shapes_dataset


def test_shapes_dataset_has_matching_captions(tmp_path):
    folder = make_shapes_dataset(tmp_path / "shapes", train=4, val=2)
    dataset = load_dataset(folder)
    assert dataset.split_counts() == {"train": {"images": 4, "captions": 20}, "val": {"images": 2, "captions": 10}}
    first = Image.open(dataset.image_paths[0]).convert("RGB")
    colour_word = dataset.captions[0].split()[1]  # "a <colour> <shape> ..."
    assert colour_word in {"red", "green", "blue", "yellow", "purple", "orange"}
    assert first.size == (96, 96)


def test_demo_runs_extract_train_eval_classify(tmp_path, capsys):
    data = make_shapes_dataset(tmp_path / "shapes", train=48, val=16)
    code, out, err = run_cli(["demo", "--data", data, "--out", tmp_path / "demo", "--epochs", "5"], capsys)
    assert code == 0, err
    for step in ("1/4 extract", "2/4 train", "3/4 evaluate", "4/4 classify"):
        assert step in out
    assert "untrained (same init)" in out and "probability" in out and "true caption" in out
