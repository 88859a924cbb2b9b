"""Selection apart from reporting: `--select-on train:N` carves a fixed selection split out of train."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_cli

from vlmcache.align.config import TrainConfig
from vlmcache.align.inputs import evaluate_model
from vlmcache.align.load import load_model
from vlmcache.align.train import train
from vlmcache.cache.carve import carve, carved_images
from vlmcache.cache.store import open_cache
from vlmcache.data.synthetic import write_synthetic_cache
from vlmcache.errors import VlmcacheError


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """200 train + 40 val synthetic images with 1-3 captions each."""
    return write_synthetic_cache(tmp_path_factory.mktemp("select") / "cache", 200, val_images=40,
                                 captions_per_image=(1, 3), dim=32, text_dim=24)


def test_carving_is_fixed_by_image_ids_and_keeps_captions_with_their_image(cache):
    split = open_cache(cache).split("train")
    rest, carved = carve(split, 50)
    assert carved.name == "train:50" and rest.name == "train"
    assert len(carved.image_ids) == 50 and len(rest.image_ids) == 150 and not set(carved.image_ids) & set(rest.image_ids)
    # The same images whatever the row order (another cache of the same data, another seed).
    assert carved_images(split.image_ids[::-1], 50)[::-1].tolist() == carved_images(split.image_ids, 50).tolist()
    for part in (rest, carved):
        assert len(part.captions) == len(part.text_features) == len(part.caption_image)
        for caption, owner in zip(part.captions, part.caption_image, strict=True):  # each caption still finds its image
            original = split.captions.index(caption)
            assert part.image_ids[owner] == split.image_ids[split.caption_image[original]]
            assert np.array_equal(part.text_features[part.captions.index(caption)], split.text_features[original])
    assert len(rest.captions) + len(carved.captions) == len(split.captions)
    with pytest.raises(VlmcacheError, match="carve fewer"):
        carve(split, 200)


@pytest.mark.parametrize("value, message", [("val:10", "carve from the training split"), ("train", "is the training split"),
                                            ("train:abc", "give a split name"), ("train:0", "give a split name"),
                                            (":5", "give a split name")])
def test_bad_selections_are_refused(value, message):
    with pytest.raises(VlmcacheError, match=message):
        TrainConfig(select_on=value)


def test_the_best_epoch_is_chosen_on_the_carved_images(cache, tmp_path):
    result = train(cache, tmp_path / "run", TrainConfig(projector="linear", epochs=3, batch_size=32, dim=16,
                                                        select_on="train:50"))
    model, _ = load_model(tmp_path / "run")
    carved = carve(open_cache(cache).split("train"), 50)[1]
    assert evaluate_model(model, carved) == pytest.approx(result.best_metrics)
    with pytest.raises(VlmcacheError, match="carving needs the training split in memory"):
        train(cache, tmp_path / "streamed", TrainConfig(select_on="train:50", stream=True))


def test_ablate_and_eval_name_where_they_selected_and_refuse_overlap(cache, tmp_path, capsys):
    grid = ["--projectors", "linear", "--losses", "infonce", "--seeds", "0", "--epochs", "2", "--batch-size", "32",
            "--dims", "16", "--jobs", "1", "--no-baselines", "--out", tmp_path / "ab"]
    code, out, err = run_cli(["ablate", cache, *grid, "--select-on", "train:50"], capsys)
    assert code == 0, err
    assert "ablation on split 'val'" in out and "best epoch chosen on 'train:50'" in " ".join(out.split())
    assert json.loads((tmp_path / "ab" / "ablation.json").read_text())["selected_on"] == "train:50"
    code, out, err = run_cli(["ablate", cache, *grid], capsys)
    assert code == 0 and "chosen on 'val' too (optimistic" in " ".join(out.split())
    for selection, message in (("val", "overlaps the reported split 'val'"), ("train:500", "has only 200 images"),
                               ("train:x", "--select-on train:x: give a split name")):
        code, _, err = run_cli(["ablate", cache, *grid, "--select-on", selection], capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    code, _, err = run_cli(["train", cache, "--projector", "linear", "--epochs", "2", "--batch-size", "32",
                            "--select-on", "train:50", "--out", tmp_path / "run"], capsys)
    assert code == 0, err
    code, out, err = run_cli(["eval", tmp_path / "run", "--json", tmp_path / "e.json"], capsys)
    assert code == 0, err
    assert "best epoch chosen on 'train:50'" in " ".join(out.split())
    saved = json.loads((tmp_path / "e.json").read_text())
    assert saved["selected_on"] == "train:50" and "trained (linear + infonce) + QB-Norm" in saved["retrieval"]


def test_tuning_chooses_each_rows_values_on_the_selection_split(cache, tmp_path, capsys):
    grid = ["--projectors", "linear", "--losses", "infonce", "--seeds", "0", "--epochs", "2", "--batch-size", "32",
            "--dims", "16", "--jobs", "1", "--no-baselines", "--out", tmp_path / "ab"]
    code, out, err = run_cli(["ablate", cache, *grid, "--tune", "lr=1e-4,3e-3", "--select-on", "train:50"], capsys)
    assert code == 0, err
    saved = json.loads((tmp_path / "ab" / "ablation.json").read_text())
    (row,) = saved["rows"]
    scores = {cell["tuned"]["lr"]: cell["selection_metrics"]["mean_recall"] for cell in saved["cells"]}
    assert set(scores) == {1e-4, 3e-3} and row["tuned"] == {"lr": max(scores, key=scores.get)}
    assert [cell["chosen"] for cell in saved["cells"]] == [cell["tuned"] == row["tuned"] for cell in saved["cells"]]
    chosen = next(cell for cell in saved["cells"] if cell["chosen"])
    assert row["mean_recall"] == pytest.approx(chosen["metrics"]["mean_recall"])  # reported on val, not on train:50
    assert "tuned (on the selection split)" in out and f"lr={row['tuned']['lr']:g}" in out
    for tune, message in (("lr=1e-3", "would be chosen on the reported split 'val'"),
                          ("foo=1", "'foo' is not a tunable option"), ("projector=mlp", "'projector' is not a tunable"),
                          ("lr=abc", "lr='abc' is not a number"), ("lr=-1", "--lr -1.0: must be"),
                          ("batch_size=0.5", "is not an integer"), ("1e-3", "write key=value"), ("lr=1e-3,lr=2e-3", "twice")):
        selection = [] if tune == "lr=1e-3" else ["--select-on", "train:50"]
        code, _, err = run_cli(["ablate", cache, *grid, "--tune", tune, *selection], capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (tune, err)
