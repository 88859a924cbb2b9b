"""Ablation cells: keyed by the vlmcache version; eval on another cache keeps the run's baselines."""

from __future__ import annotations

import importlib
from dataclasses import asdict
from pathlib import Path

import pytest
from conftest import make_flickr_slice, run_cli, tiny

from vlmcache import extract, open_cache
from vlmcache.align.config import TrainConfig
from vlmcache.eval.evaluate import evaluate_checkpoint
from vlmcache.metrics.baselines import ASIF_ROW, CCA_ROW, baseline_metrics

REPO = Path(__file__).resolve().parents[1]
ablate_module = importlib.import_module("vlmcache.align.ablate")  # `vlmcache.ablate` is the function
train_module = importlib.import_module("vlmcache.align.train")





# --- defect: ablate cells are keyed by the vlmcache version ------------------------------------------------------


def test_ablate_cell_key_includes_the_version(vit_cache, tmp_path, monkeypatch):
    cell = ablate_module.Cell(str(vit_cache), asdict(TrainConfig(projector="linear", epochs=1, batch_size=4)))
    key = cell.key()
    assert ablate_module.Cell(str(vit_cache), dict(cell.config)).key() == key  # same inputs, same key
    grid = {"projectors": ("linear",), "losses": ("infonce",), "seeds": (0,), "epochs": 1, "jobs": 1,
            "with_baselines": False, "base_config": {"batch_size": 4}, "progress": False}
    first = ablate_module.ablate([vit_cache], tmp_path / "ab", **grid)
    assert (first.cells_trained, first.cells_reused) == (1, 0)
    assert ablate_module.ablate([vit_cache], tmp_path / "ab", **grid).cells_reused == 1
    monkeypatch.setattr(ablate_module, "__version__", "999.0.0")
    assert cell.key() != key
    after_upgrade = ablate_module.ablate([vit_cache], tmp_path / "ab", **grid)
    assert (after_upgrade.cells_trained, after_upgrade.cells_reused) == (1, 0)


# --- defect: eval --cache OTHER keeps CCA and ASIF, fitted on the run's training cache ------------------------------


def test_eval_on_another_cache_fits_baselines_on_the_runs_training_cache(vit_run, vit_cache, tiny_models, tmp_path,
                                                                         capsys):
    # Another dataset with only a val split: there is nothing in it to fit the baselines on (the old code
    # dropped the CCA and ASIF rows here, and fitted them on OTHER's own train split when it had one).
    other = make_flickr_slice(tmp_path / "other-data", 3, 3)
    extract(other, tmp_path / "other", **tiny(tiny_models, splits=["val"]))
    assert open_cache(tmp_path / "other").splits == ["val"]
    report = evaluate_checkpoint(vit_run, cache=tmp_path / "other")
    assert report.split == "val" and [row for row in report.rows if "QB-Norm" not in row] == [
        "trained (linear + infonce)", "untrained (same init)", CCA_ROW, ASIF_ROW]
    expected = baseline_metrics(open_cache(vit_cache).split("train"), open_cache(tmp_path / "other").split("val"), 256)
    assert report.rows[CCA_ROW] == pytest.approx(expected[CCA_ROW])
    assert report.rows[ASIF_ROW] == pytest.approx(expected[ASIF_ROW])
    code, out, err = run_cli(["eval", vit_run, "--cache", tmp_path / "other"], capsys)
    assert code == 0 and CCA_ROW in out and "ASIF" in out, err


