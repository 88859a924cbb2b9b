"""Run and grid config files: TOML options, command-line overrides, reproduction from a run's config.toml."""

from __future__ import annotations

import importlib
import json
import tomllib
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file

from vlmcache.align.load import load_model
from vlmcache.errors import VlmcacheError
from vlmcache.metrics.retrieval import RETRIEVAL_KEYS

REPO = Path(__file__).resolve().parents[1]
ablate_module = importlib.import_module("vlmcache.align.ablate")  # `vlmcache.ablate` is the function
train_module = importlib.import_module("vlmcache.align.train")





# --- run and grid config files ------------------------------------------------------------------------------------


def test_train_config_file_cli_override_and_reproduction(vit_cache, tmp_path, capsys):
    (tmp_path / "run.toml").write_text('projector = "linear"\nloss = "sigmoid"\nepochs = 2\nbatch-size = 4\n'
                                       'lr = 0.01\nseed = 3\nwarmup = 0\n')
    code, _, err = run_cli(["train", vit_cache, "--config", tmp_path / "run.toml", "--out", tmp_path / "a"], capsys)
    assert code == 0, err
    config = load_model(tmp_path / "a")[1]["config"]
    assert (config["projector"], config["loss"], config["epochs"], config["batch_size"], config["lr"], config["seed"],
            config["warmup"]) == ("linear", "sigmoid", 2, 4, 0.01, 3, 0)
    assert config["dim"] == 256  # not in the file: the default
    code, _, err = run_cli(["train", vit_cache, "--config", tmp_path / "run.toml", "--epochs", "3", "--seed", "0",
                            "--out", tmp_path / "b"], capsys)
    assert code == 0, err
    config = load_model(tmp_path / "b")[1]["config"]
    assert (config["epochs"], config["seed"], config["loss"], config["lr"]) == (3, 0, "sigmoid", 0.01)
    # The run's resolved config reproduces it from one file.
    saved = tomllib.loads((tmp_path / "a" / "config.toml").read_text())
    assert saved["cache"] == str(vit_cache.resolve()) and saved["loss"] == "sigmoid" and saved["lr"] == 0.01
    code, _, err = run_cli(["train", "--config", tmp_path / "a" / "config.toml", "--out", tmp_path / "c"], capsys)
    assert code == 0, err
    first, again = (load_model(tmp_path / name)[1] for name in ("a", "c"))
    assert again["best_metrics"] == first["best_metrics"] and again["config"] == first["config"]
    weights = load_file(str(tmp_path / "a" / "best.safetensors")), load_file(str(tmp_path / "c" / "best.safetensors"))
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    (tmp_path / "typo.toml").write_text("epocs = 3\n")
    code, _, err = run_cli(["train", vit_cache, "--config", tmp_path / "typo.toml", "--out", tmp_path / "d"], capsys)
    assert code == 2 and "unknown key 'epocs'" in err


def test_ablate_config_file_and_override(vit_cache, tmp_path, capsys):
    (tmp_path / "grid.toml").write_text(f'caches = ["{vit_cache}"]\nprojectors = ["linear"]\nlosses = ["infonce"]\n'
                                        'seeds = [0, 1]\nepochs = 1\nbatch_size = 4\njobs = 1\nbaselines = false\n'
                                        'lr = 0.005\n')
    code, out, err = run_cli(["ablate", "--config", tmp_path / "grid.toml", "--out", tmp_path / "ab"], capsys)
    assert code == 0, err
    cells = json.loads((tmp_path / "ab" / "ablation.json").read_text())["cells"]
    assert sorted(cell["config"]["seed"] for cell in cells) == [0, 1]
    assert {(cell["config"]["lr"], cell["config"]["batch_size"], cell["config"]["epochs"]) for cell in cells} == {(0.005, 4, 1)}
    direct = ablate_module.ablate([vit_cache], tmp_path / "direct", projectors=("linear",), losses=("infonce",),
                                  seeds=(0, 1), epochs=1, jobs=1, with_baselines=False,
                                  base_config={"lr": 0.005, "batch_size": 4}, progress=False)
    saved = json.loads((tmp_path / "ab" / "ablation.json").read_text())["rows"]
    assert [row[key] for row in saved for key in RETRIEVAL_KEYS] == [row[key] for row in direct.rows for key in RETRIEVAL_KEYS]
    code, _, err = run_cli(["ablate", "--config", tmp_path / "grid.toml", "--seeds", "1", "--out", tmp_path / "ab1"], capsys)
    assert code == 0, err
    cells = json.loads((tmp_path / "ab1" / "ablation.json").read_text())["cells"]
    assert [cell["config"]["seed"] for cell in cells] == [1]



def test_bad_config_file_is_one_line(tmp_path, capsys):
    (tmp_path / "bad.toml").write_text("epochs = [")
    code, _, err = run_cli(["train", "x", "--config", tmp_path / "bad.toml"], capsys)
    assert code == 2 and "--config" in err and "Traceback" not in err
    with pytest.raises(VlmcacheError, match="file not found"):
        importlib.import_module("vlmcache.align.config").read_config_file(tmp_path / "missing.toml")
