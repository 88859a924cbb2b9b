"""`ablate --capacity`: each family's size knob counted by hand, the closest knob chosen, refusals in one line, and a
tiny grid end to end with its Pareto plot."""

from __future__ import annotations

import csv
import itertools
import json
from dataclasses import asdict

import pytest
import torch
from conftest import run_cli

from vlmcache.align.ablate import LATER_OPTIONS, Cell, ablate, projector_label, projector_spec
from vlmcache.align.capacity import MAX_ND_LAYERS, MAX_ND_SIDE, Sizer, parse_capacity, reachable, reaches
from vlmcache.align.config import TrainConfig
from vlmcache.align.model import initial_model, model_parameters
from vlmcache.app.tables import knob_text, short_count
from vlmcache.errors import VlmcacheError

# The offline default encoders: EfficientNet-Lite0 (1280-d, grid 32x40) and MiniLM (384-d, grid 16x24), into 256-d.
IMAGE, TEXT, DIM = 1280, 384, 256


def count(**options) -> int:
    return model_parameters(TrainConfig(dim=DIM, **options), IMAGE, TEXT)


def test_linear_rank_counts_by_hand():
    for rank in (1, 8, 100):  # Linear(in, r, no bias) -> Linear(r, 256), per side
        assert count(projector="linear", rank=rank) == (1280 * rank + rank * 256 + 256) + (384 * rank + rank * 256 + 256)
    assert count(projector="linear") == count(projector="linear", rank=0) == (1280 + 384) * 256 + 2 * 256  # 426,496
    assert TrainConfig(rank=0).rank is None  # one spelling of the plain Linear


def test_mlp_hidden_counts_by_hand():
    for hidden in (1, 64, 918):  # Linear(in, h) -> GELU -> Linear(h, 256), per side
        assert count(projector="mlp", mlp_hidden=hidden) == (1281 * hidden + (hidden + 1) * 256) + (
            385 * hidden + (hidden + 1) * 256)
    assert count(projector="mlp", mlp_hidden=10, mlp_layers=3) == (1281 * 10 + 11 * 10 + 11 * 256) + (
        385 * 10 + 11 * 10 + 11 * 256)


def test_ndlinear_hidden_grid_and_depth_counts_by_hand():
    # One layer: 32x40 -> 16x16 and 16x24 -> 16x16, one Linear per axis.
    assert count(projector="ndlinear") == (32 * 16 + 16 + 40 * 16 + 16) + (16 * 16 + 16 + 24 * 16 + 16) == 1856
    for side in (1, 16, 256):
        first = (32 * side + side + 40 * side + side) + (16 * side + side + 24 * side + side)  # into the h×h grid
        middle = 2 * (side * side + side) * 2  # h×h -> h×h, both sides
        last = 2 * (side * 16 + 16) * 2  # h×h -> 16x16, both sides
        for layers in (2, 3, 4):
            assert count(projector="ndlinear", ndlinear_layers=layers, ndlinear_hidden=(side, side)) == (
                first + (layers - 2) * middle + last)
    assert count(projector="ndlinear", ndlinear_layers=2) == count(projector="ndlinear", ndlinear_layers=2,
                                                                   ndlinear_hidden=(16, 16))  # default: the out grid
    assert count(projector="ndlinear", ndlinear_layers=2, ndlinear_hidden=(8, 32)) == (
        (32 * 8 + 8 + 40 * 32 + 32) + (16 * 8 + 8 + 24 * 32 + 32) + 2 * (8 * 16 + 16 + 32 * 16 + 16))


def test_the_knobs_build_working_models_and_old_checkpoints_keep_their_weights():
    for options in ({"projector": "linear", "rank": 4}, {"projector": "ndlinear", "ndlinear_layers": 3,
                                                          "ndlinear_hidden": (4, 4)}):
        model = initial_model(TrainConfig(dim=16, **options), 32, 24)
        assert model.embed_images(torch.randn(3, 32)).shape == model.embed_texts(torch.randn(3, 24)).shape == (3, 16)
    # The single NdLinear layer and the plain Linear keep their weight names (checkpoints written before load).
    assert set(initial_model(TrainConfig(projector="ndlinear", dim=16), 32, 24).image.state_dict()) == {
        "nd.align_layers.0.weight", "nd.align_layers.0.bias", "nd.align_layers.1.weight", "nd.align_layers.1.bias"}
    assert set(initial_model(TrainConfig(projector="linear", dim=16), 32, 24).image.state_dict()) == {"weight", "bias"}
    with pytest.raises(VlmcacheError, match="--ndlinear-hidden 300x300: 90,000 cells; at most 65,536"):
        TrainConfig(ndlinear_hidden="300x300")


def test_new_options_at_their_defaults_keep_the_cell_keys(vit_cache):
    config = asdict(TrainConfig(projector="linear", epochs=1, batch_size=4))
    before = {key: value for key, value in config.items() if key not in LATER_OPTIONS}  # as cells were keyed
    assert Cell(str(vit_cache), config).key() == Cell(str(vit_cache), before).key()
    assert Cell(str(vit_cache), {**config, "rank": 4}).key() != Cell(str(vit_cache), config).key()


def test_parse_capacity_reads_counts_with_suffixes_and_refuses_the_rest():
    assert parse_capacity("2k,30k,400k,2M") == (2_000, 30_000, 400_000, 2_000_000)
    assert parse_capacity(" 1.5K , 250,250,2m,") == (250, 1_500, 2_000_000)  # sorted, once each
    assert parse_capacity([3000, 1000]) == (1000, 3000)  # TOML or Python
    for bad, message in (("2x", "'2x' is not a count"), ("-5", "-5 must be a positive"), ("0", "0 must be a positive"),
                         ("", "--capacity '': no values"), (",", "no values"), ("1.2345k", "whole number"),
                         ("1e6", "not a count"), ("٣k", "not a count")):
        with pytest.raises(VlmcacheError, match="--capacity"):
            parse_capacity(bad)
        with pytest.raises(VlmcacheError, match=message):
            parse_capacity(bad)


def test_reach_is_within_a_quarter_of_the_target():
    assert reaches(125, 100) and reaches(75, 100) and not reaches(126, 100) and not reaches(74, 100)
    assert reachable(128, 1056) == (103, 1408)  # 128 / 1.25 = 102.4, 1056 / 0.75 = 1408


@pytest.mark.parametrize("target", [100, 1_000, 2_000, 30_000, 400_000, 2_000_000])
def test_the_closest_knob_is_chosen(target):
    linear = Sizer(TrainConfig(projector="linear", dim=DIM), IMAGE, TEXT)
    chosen = linear.closest(target)
    # Ranks only while the bottleneck is smaller than the full Linear: 2176·r + 512 < 426,496 up to r = 195.
    candidates = [{"rank": rank} for rank in range(1, 196)] + [{"rank": None}]
    assert linear.count({"rank": 196}) >= linear.count({"rank": None}) > linear.count({"rank": 195})
    assert abs(chosen.parameters - target) == min(abs(linear.count(knob) - target) for knob in candidates)
    mlp = Sizer(TrainConfig(projector="mlp", dim=DIM), IMAGE, TEXT).closest(target)
    hidden = mlp.knob["mlp_hidden"]
    assert all(abs(count(projector="mlp", mlp_hidden=h) - target) >= abs(mlp.parameters - target)
               for h in (hidden - 1, hidden + 1) if h >= 1)  # counts grow with h: the neighbours decide


def test_the_closest_ndlinear_by_every_grid_and_depth():
    sizer = Sizer(TrainConfig(projector="ndlinear", dim=16), 32, 32)  # 4x8 -> 4x4 grids: cheap to enumerate
    everything = [{"ndlinear_layers": 1, "ndlinear_hidden": None}] + [
        {"ndlinear_layers": layers, "ndlinear_hidden": (side, side)}
        for layers, side in itertools.product(range(2, MAX_ND_LAYERS + 1), range(1, MAX_ND_SIDE + 1))]
    for target in (60, 112, 500, 1_000, 9_000, 50_000):
        best = min(abs(sizer.count(knob) - target) for knob in everything)
        chosen = sizer.closest(target)
        assert abs(chosen.parameters - target) == best
        # On a tie: fewest layers, then the smallest grid.
        tied = [knob for knob in everything if abs(sizer.count(knob) - target) == best]
        assert chosen.knob == tied[0]
    assert sizer.closest(500).knob == {"ndlinear_layers": 2, "ndlinear_hidden": (11, 11)}  # 2·(22·11 + 8) = 500


def test_labels_show_the_knob_of_the_family_and_read_back():
    config = asdict(TrainConfig(projector="ndlinear", ndlinear_layers=2, ndlinear_hidden=(16, 16), rank=8))
    assert projector_label(config) == "ndlinear:ndlinear-layers=2:ndlinear-hidden=16x16"  # rank is linear's
    assert projector_label(config, knobs=False) == "ndlinear"
    assert projector_label(asdict(TrainConfig(projector="linear", rank=8))) == "linear:rank=8"
    assert projector_label(asdict(TrainConfig(projector="linear"))) == "linear"
    for label in ("linear:rank=8", "mlp:mlp-hidden=64", "ndlinear:ndlinear-layers=2:ndlinear-hidden=16x16"):
        assert projector_label(asdict(TrainConfig(**projector_spec(label)))) == label
    with pytest.raises(VlmcacheError, match="rank sizes linear, not mlp"):
        projector_spec("mlp:rank=8")
    assert [knob_text(knob) for knob in ({"rank": 8}, {"rank": None}, {"mlp_hidden": 64}, {
        "ndlinear_layers": 2, "ndlinear_hidden": [16, 16]}, {"ndlinear_layers": 1, "ndlinear_hidden": None})] == [
        "rank 8", "full", "hidden 64", "2×16x16", "1 layer"]
    assert [short_count(n) for n in (2_000_000, 400_000, 1_500, 250, 1_234_567)] == ["2M", "400k", "1.5k", "250",
                                                                                   "1,234,567"]


def one_line_refusal(argv: list, capsys, *wanted: str) -> None:
    code, out, err = run_cli(argv, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert all(text in err for text in wanted), err


GRID = ["--losses", "infonce", "--seeds", "0", "--epochs", "1", "--batch-size", "4", "--jobs", "1", "--dims", "16"]


def test_refusals_name_the_option_in_one_line(vit_cache, tmp_path, capsys):
    out = ["--out", tmp_path / "ab"]
    for value in ("2x", "-5", "0", "", "1.5"):
        one_line_refusal(["ablate", vit_cache, "--capacity", value, *GRID, *out], capsys, "--capacity")
    one_line_refusal(["ablate", vit_cache, "--params", "abc", *GRID, *out], capsys, "--capacity abc")
    # 32-d features into 16-d: linear spans 128 (rank 1) to 1,056 (full) parameters, so 50 is out of reach.
    one_line_refusal(["ablate", vit_cache, "--projectors", "linear", "--capacity", "50,500", *GRID, *out], capsys,
                     "--capacity 50:", "reachable: 103 to 1,408")
    one_line_refusal(["ablate", vit_cache, "--projectors", "linear,cross-attention", "--capacity", "500", *GRID, *out],
                     capsys, "--projectors cross-attention has no size knob")
    one_line_refusal(["ablate", vit_cache, "--projectors", "linear:rank=4", "--capacity", "500", *GRID, *out], capsys,
                     "--projectors linear:rank=4: sets its size")
    (tmp_path / "grid.toml").write_text("mlp-hidden = 64\n")
    one_line_refusal(["ablate", vit_cache, "--config", tmp_path / "grid.toml", "--capacity", "500", *GRID, *out], capsys,
                     "--mlp-hidden: --capacity chooses it")
    (tmp_path / "grid.toml").write_text("residual = true\n")
    one_line_refusal(["ablate", vit_cache, "--projectors", "mlp", "--config", tmp_path / "grid.toml", "--capacity", "500",
                      *GRID, *out], capsys, "--residual fixes the MLP's hidden width")
    assert not (tmp_path / "ab").exists()  # refused before anything was written


def test_ablate_at_matched_capacities_end_to_end_with_the_pareto_plot(vit_cache, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from PIL import Image

    # 32-d features into 16-d: linear 96·r + 32 (ranks 1-10) or 1,056; mlp 98·h + 32; ndlinear 112, or 44·h + 16
    # with 2 layers. At 100 only ndlinear comes within 25% (h = 2: 104); linear (128) and mlp (130) are listed.
    code, out, err = run_cli(["ablate", vit_cache, "--capacity", "100,500,1k", *GRID, "--out", tmp_path / "ab"], capsys)
    assert code == 0, err
    assert "target" in out and "unreachable: linear at 100 parameters" in out
    assert "linear rank 5" in out and "ndlinear 2×11x11" in out and "1k" in out  # the table's short family + knob
    saved = json.loads((tmp_path / "ab" / "ablation.json").read_text())
    sized = {(row["family"], row["capacity"]): row for row in saved["rows"] if "capacity" in row}
    assert set(sized) == {("ndlinear", 100), *((family, target) for family in ("linear", "mlp", "ndlinear")
                                               for target in (500, 1000))}
    assert (sized["linear", 500]["projector"], sized["linear", 500]["parameters"]) == ("linear:rank=5", 96 * 5 + 32)
    assert sized["linear", 1000]["knob"] == {"rank": 10} and sized["linear", 1000]["parameters"] == 992
    assert (sized["mlp", 500]["projector"], sized["mlp", 500]["parameters"]) == ("mlp:mlp-hidden=5", 98 * 5 + 32)
    assert sized["ndlinear", 500]["knob"] == {"ndlinear_layers": 2, "ndlinear_hidden": [11, 11]}
    assert sized["ndlinear", 100]["parameters"] == 104
    for row in sized.values():  # the statistics stay: an interval and a paired test against the best row
        assert row["mean_recall_ci_low"] <= row["mean_recall"] <= row["mean_recall_ci_high"]
        assert 0 <= row["mean_recall_p_vs_best"] <= 1
    missing = {(miss["projector"], miss["capacity"]) for miss in saved["capacity"]["unreachable"]}
    assert missing == {("linear", 100), ("mlp", 100)} and saved["capacity"]["targets"] == [100, 500, 1000]
    assert "128" in next(m["reason"] for m in saved["capacity"]["unreachable"] if m["projector"] == "linear")
    with open(tmp_path / "ab" / "ablation.csv") as handle:
        table = list(csv.DictReader(handle))
    assert {"capacity", "family", "parameters", "mean_recall_ci_low"} <= set(table[0])
    assert sum(1 for row in table if row["capacity"]) == 7
    again = ablate([vit_cache], tmp_path / "ab", projectors=("linear", "mlp", "ndlinear"), losses=("infonce",),
                   seeds=(0,), epochs=1, dims=(16,), base_config={"batch_size": 4}, jobs=1, progress=False,
                   capacity=[100, 500, 1000])
    assert again.cells_trained == 0 and again.cells_reused == 7
    code, out, err = run_cli(["plot", tmp_path / "ab"], capsys)
    assert code == 0 and "ablation.png" in out, err
    assert Image.open(tmp_path / "ab" / "ablation.png").size[0] >= 600
    # The plot's reader checks what it draws: a capacity row without its family is refused in one line.
    saved["rows"][0] = {**saved["rows"][0], "capacity": 5}
    saved["rows"][0].pop("family", None)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "ablation.json").write_text(json.dumps(saved))
    one_line_refusal(["plot", tmp_path / "bad"], capsys, "has a capacity but no family")
