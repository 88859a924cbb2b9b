"""Per-query ranks beside `eval --json`, intervals in the eval table, and `vlmcache compare`."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

from vlmcache.align.config import TrainConfig
from vlmcache.align.train import train
from vlmcache.data.synthetic import write_synthetic_cache
from vlmcache.eval.compare import compare
from vlmcache.metrics.retrieval import RETRIEVAL_KEYS
from vlmcache.run.ranks import load_ranks

TRAINED = "trained (linear + infonce)"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs (linear, mlp) on one synthetic cache of 200 train + 60 val images × 3 captions."""
    root = tmp_path_factory.mktemp("compare")
    cache = write_synthetic_cache(root / "cache", 200, val_images=60, captions_per_image=3, dim=32, text_dim=24)
    for projector in ("linear", "mlp"):
        train(cache, root / projector, TrainConfig(projector=projector, epochs=2, batch_size=32, dim=16))
    return root


def test_eval_json_keeps_the_ranks_and_the_table_shows_intervals(runs, capsys):
    code, out, err = run_cli(["eval", runs / "linear", "--json", runs / "linear.json"], capsys)
    assert code == 0, err
    assert "95% interval" in " ".join(out.split()) and "*" in out
    saved = json.loads((runs / "linear.json").read_text())
    assert saved["ranks"] == "linear.npz" and len(saved["items"]) == 16
    stored = load_ranks(runs / "linear.npz")
    assert list(stored) == list(saved["retrieval"])  # every row, in the table's order
    for name, ranked in stored.items():
        row, statistics = saved["retrieval"][name], saved["statistics"][name]
        assert {k: row[k] for k in ranked.metrics()} == pytest.approx(ranked.metrics())
        assert statistics["mean_recall_ci_low"] <= row["mean_recall"] <= statistics["mean_recall_ci_high"]
    assert sum(row["mean_recall_mark"] == "best" for row in saved["statistics"].values()) == 1


def test_compare_is_paired_and_needs_no_re_embedding(runs, capsys):
    run_cli(["eval", runs / "linear", "--json", runs / "linear.json"], capsys)
    same = compare(runs / "linear", runs / "linear.json")  # ranked now vs stored: the same numbers
    assert all(m["difference"] == 0 and m["p_value"] == 1.0 for m in same.metrics.values())
    rows = json.loads((runs / "linear.json").read_text())["retrieval"]
    versus = compare(f"{runs / 'linear.json'}#CCA (closed form)", runs / "linear.json", test="bootstrap")
    for metric in RETRIEVAL_KEYS:
        m = versus.metrics[metric]
        assert m["difference"] == pytest.approx(rows["CCA (closed form)"][metric] - rows[TRAINED][metric])
        assert m["ci_low"] <= m["difference"] <= m["ci_high"] and 0 < m["p_value"] <= 1
    assert versus.images == 60 and versus.captions == 180
    code, out, err = run_cli(["compare", runs / "linear", runs / "mlp", "--json", runs / "c.json"], capsys)
    assert code == 0, err
    assert "A − B" in out and "mean recall" in out and "p by permutation" in " ".join(out.split())
    assert set(json.loads((runs / "c.json").read_text())["metrics"]) == set(RETRIEVAL_KEYS)


def test_compare_refuses_other_items_splits_and_rows(runs, tmp_path, capsys):
    other = write_synthetic_cache(tmp_path / "other", 200, val_images=50, captions_per_image=3, dim=32, text_dim=24)
    code, _, err = run_cli(["compare", runs / "linear", runs / "mlp", "--cache", other], capsys)
    assert code == 0, err  # both ranked on the other cache: the same items
    for name, extra in (("linear", []), ("other", ["--cache", other]), ("train", ["--split", "train", "--no-qbnorm"])):
        code, _, err = run_cli(["eval", runs / "linear", *extra, "--json", tmp_path / f"{name}.json"], capsys)
        assert code == 0, err
    for args, message in (([tmp_path / "linear.json", tmp_path / "other.json"], "evaluated on different items"),
                          ([tmp_path / "linear.json", tmp_path / "train.json"], "on split 'val' and"),
                          ([tmp_path / "linear.json", runs / "mlp", "--cache", other], "--cache applies to runs only"),
                          ([tmp_path / "linear.json", runs / "mlp", "--split", "train"], "was evaluated on split 'val'"),
                          ([f"{tmp_path / 'linear.json'}#nope", runs / "mlp"], "has no row 'nope'"),
                          ([tmp_path / "missing", runs / "mlp"], "no such run"),
                          ([runs / "linear", runs / "mlp", "--test", "t"], "--test t: use one of")):
        code, _, err = run_cli(["compare", *args], capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
