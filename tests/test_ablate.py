"""`vlmcache ablate`: the grid, baseline rows, resume from cached cells, and reproducibility."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import run_cli

from vlmcache import extract
from vlmcache.align import ablate as ablate_module
from vlmcache.align.ablate import ablate
from vlmcache.cache.store import FeatureCache
from vlmcache.run.ranks import load_ranks


@pytest.fixture
def tiny_caches(flickr_slice, tmp_path, tiny_models):
    for image in ("vit", "resnet"):
        extract(flickr_slice, tmp_path / image, image_model=str(tiny_models[image]),
                text_model=str(tiny_models["distilbert"]), progress=False)
    return tmp_path / "vit", tmp_path / "resnet"


def test_grid_with_baselines_files_and_resume(tiny_caches, tmp_path):
    vit, resnet = tiny_caches
    grid = {"projectors": ("linear", "ndlinear"), "losses": ("infonce", "sigmoid"), "seeds": (0, 1), "epochs": 2,
            "base_config": {"batch_size": 4}, "jobs": 1, "progress": False}
    result = ablate([vit, resnet], tmp_path / "ab", **grid)
    assert result.cells_trained == 2 * 2 * 2 * 2 and result.cells_reused == 0
    names = [(row["encoders"].split(" ")[0], row["projector"], row["loss"]) for row in result.rows]
    assert len(names) == 2 * (4 + 3)  # per cache: 4 trained rows + untrained, CCA, ASIF
    assert {n[1] for n in names} == {"linear", "ndlinear", "untrained linear", "CCA (closed form)", "ASIF (no training)"}
    row = next(r for r in result.rows if r["projector"] == "linear" and r["loss"] == "infonce")
    assert row["seeds"] == [0, 1] and row["parameters"] == (32 + 32) * 256 + 2 * 256
    # Two seeds a, b: the row's mean is (a + b) / 2 and its (population) std |a - b| / 2.
    a, b = (cell["metrics"]["mean_recall"] for cell in result.raw if cell["cache"] == row["cache"]
            and cell["config"]["projector"] == "linear" and cell["config"]["loss"] == "infonce")
    assert row["mean_recall"] == pytest.approx((a + b) / 2) and row["mean_recall_std"] == pytest.approx(abs(a - b) / 2)
    saved = json.loads((tmp_path / "ab" / "ablation.json").read_text())
    assert saved["rows"] == result.rows
    with open(tmp_path / "ab" / "ablation.csv") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == len(result.rows) and {"mean_recall_std", "mean_recall_ci_low", "i2t_r1_mark"} <= set(table[0])
    # Both caches hold the same images: one group, one best row per metric, every interval around its mean.
    assert len({row["items"] for row in result.rows}) == 1
    for metric in ("i2t_r1", "mean_recall"):
        assert [row[f"{metric}_mark"] for row in result.rows].count("best") == 1
        assert all(row[f"{metric}_ci_low"] <= row[metric] <= row[f"{metric}_ci_high"] for row in result.rows)
        assert all(0 <= row[f"{metric}_p_vs_best"] <= 1 for row in result.rows)
    for cell in saved["cells"]:  # every cell's per-query ranks are kept and give its metrics again
        (ranked,) = load_ranks(tmp_path / "ab" / cell["ranks"]).values()
        assert ranked.items == cell["items"] and ranked.metrics() == pytest.approx(cell["metrics"])
    again = ablate([vit, resnet], tmp_path / "ab", **grid)  # everything cached: nothing retrained
    assert again.cells_trained == 0 and again.cells_reused == 16
    untimed = [{k: v for k, v in row.items() if k != "seconds"} for row in result.rows]
    assert [{k: v for k, v in row.items() if k != "seconds"} for row in again.rows] == untimed
    assert saved["cells"][0]["config"]["projector"] in ("linear", "ndlinear")
    (tmp_path / "ab" / saved["cells"][0]["ranks"]).unlink()  # a cell without its ranks is trained again
    assert ablate([vit, resnet], tmp_path / "ab", **grid).cells_trained == 1


def test_same_seeds_reproduce_the_same_numbers_in_parallel_too(tiny_caches, tmp_path):
    vit, _ = tiny_caches
    grid = {"projectors": ("mlp",), "losses": ("infonce", "sigmoid"), "seeds": (3,), "epochs": 2,
            "base_config": {"batch_size": 4}, "with_baselines": False, "progress": False}
    first = ablate([vit], tmp_path / "a", jobs=1, **grid)
    second = ablate([vit], tmp_path / "b", jobs=2, **grid)
    assert [r["mean_recall"] for r in first.rows] == [r["mean_recall"] for r in second.rows]
    assert [r["i2t_r1"] for r in first.rows] == [r["i2t_r1"] for r in second.rows]


def test_a_grid_reads_each_input_once(tiny_caches, tmp_path, monkeypatch):
    """Cells and baseline rows of one grid share what the process has read: one read per (split, sets)."""
    vit, _ = tiny_caches
    reads = []
    read_split = FeatureCache.split

    def counted(self, name, *args, **kwargs):
        reads.append((str(self.path), name, args, tuple(sorted(kwargs.items()))))
        return read_split(self, name, *args, **kwargs)

    monkeypatch.setattr(FeatureCache, "split", counted)
    grid = {"projectors": ("linear", "mlp"), "losses": ("infonce", "sigmoid"), "seeds": (0,), "epochs": 1,
            "base_config": {"batch_size": 4}, "jobs": 1, "progress": False}
    first = ablate([vit], tmp_path / "a", **grid)
    assert first.cells_trained == 4 and reads and len(reads) == len(set(reads))
    assert not ablate_module._OPENED  # the splits kept for the grid are released when it ends
    reads.clear()  # a second grid reads afresh (the cache could have changed in between), again once
    ablate([vit], tmp_path / "b", **grid)
    assert reads and len(reads) == len(set(reads))


def test_cli_ablate_prints_the_table(tiny_caches, tmp_path, capsys):
    vit, _ = tiny_caches
    code, out, err = run_cli(["ablate", vit, "--projectors", "linear", "--losses", "infonce", "--seeds", "0",
                              "--epochs", "1", "--batch-size", "4", "--jobs", "1", "--out", tmp_path / "ab"], capsys)
    assert code == 0, err
    assert "ablation on split 'val'" in out and "CCA (closed form)" in out and "ASIF" in out and "±" in out
    assert "95% interval" in out and "*" in out  # intervals, and the best row marked (* = best)
    code, _, err = run_cli(["ablate", tmp_path / "missing"], capsys)
    assert code == 2 and "no such cache folder" in err
    code, _, err = run_cli(["ablate", vit, "--seeds", "a,b"], capsys)
    assert code == 2 and "--seeds a,b" in err


def test_plots_of_a_run_and_an_ablation(tiny_caches, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from PIL import Image

    from vlmcache.align.config import TrainConfig
    from vlmcache.align.train import train

    vit, _ = tiny_caches
    train(vit, tmp_path / "run", TrainConfig(epochs=3, batch_size=4))
    code, out, err = run_cli(["plot", tmp_path / "run"], capsys)
    assert code == 0, err
    assert Image.open(tmp_path / "run" / "training.png").size[0] > 1000
    ablate([vit], tmp_path / "ab", projectors=("linear",), losses=("infonce", "sigmoid"), seeds=(0, 1), epochs=1,
           base_config={"batch_size": 4}, jobs=1, progress=False)
    code, out, err = run_cli(["plot", tmp_path / "ab"], capsys)
    assert code == 0 and "ablation.png" in out
    assert Image.open(tmp_path / "ab" / "ablation.png").size[0] >= 600
    code, _, err = run_cli(["plot", tmp_path / "nothing"], capsys)
    assert code == 2 and "metrics.jsonl: not found" in err
