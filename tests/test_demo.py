"""`vlmcache demo` end to end on a small generated dataset (the no-data fallback's generator)."""

from __future__ import annotations

from conftest import run_cli
from PIL import Image

from vlmcache.app.demo import make_shapes_dataset
from vlmcache.data.datasets import load_dataset


def test_shapes_dataset_has_matching_captions(tmp_path):
    folder = make_shapes_dataset(tmp_path / "shapes", train=4, val=2)
    dataset = load_dataset(folder)
    assert dataset.split_counts() == {"train": {"images": 4, "captions": 20}, "val": {"images": 2, "captions": 10}}
    colours = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
               "purple": (140, 60, 170), "orange": (240, 130, 30)}
    backgrounds = {"white": (245, 245, 245), "black": (20, 20, 20), "grey": (128, 128, 128)}
    centres = {"left": (29, 48), "right": (67, 48), "top": (48, 29), "bottom": (48, 67), "centre": (48, 48)}
    for row in range(6):  # each picture shows what its first caption says: colour at the shape's place, background
        words = dataset.captions[5 * row].split()  # "a {colour} {shape} on the {place} of a {background} picture"
        image = Image.open(dataset.image_paths[row]).convert("RGB")
        assert image.size == (96, 96)
        assert image.getpixel(centres[words[5]]) == colours[words[1]]
        assert image.getpixel((0, 0)) == backgrounds[words[8]]


def test_demo_runs_extract_train_eval_classify(tmp_path, capsys):
    data = make_shapes_dataset(tmp_path / "shapes", train=48, val=16)
    code, out, err = run_cli(["demo", "--data", data, "--out", tmp_path / "demo", "--epochs", "5"], capsys)
    assert code == 0, err
    for step in ("1/4 extract", "2/4 train", "3/4 evaluate", "4/4 classify"):
        assert step in out
    assert "untrained (same init)" in out and "probability" in out and "true caption" in out
