"""One typed definition per option (vlmcache.options): checks, the typed TOML reader, the CLI and the docs table
are all derived from the config fields."""

from __future__ import annotations

import dataclasses

import pytest
import typer
from conftest import run_cli
from typer.testing import CliRunner

from vlmcache.align.config import TrainConfig, read_config_file
from vlmcache.errors import VlmcacheError
from vlmcache.options import check_options, markdown_table, option, read_toml, toml_types, typed_values, with_options


@pytest.mark.parametrize(("text", "message"), [
    ('standardize = "false"', "key 'standardize' = 'false' must be true or false"),
    ("image-features = 3", "key 'image_features' = 3 must be a string"),
    ('train_split = ["train"]', "key 'train_split' = ['train'] must be a string"),
    ('epochs = "20"', "key 'epochs' = '20' must be an integer"),
    ("lr = true", "key 'lr' = True must be a number"),
    ("patience = 2.5", "key 'patience' = 2.5 must be an integer"),
    ("epocs = 3", "unknown key 'epocs'"),
])
def test_a_config_value_of_the_wrong_type_is_refused_naming_the_key(tmp_path, capsys, text, message):
    (tmp_path / "run.toml").write_text(text + "\n")
    with pytest.raises(VlmcacheError, match="run.toml: " + message.replace("[", r"\[").replace("]", r"\]")):
        read_config_file(tmp_path / "run.toml")
    code, _, err = run_cli(["train", "x", "--config", tmp_path / "run.toml"], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_standardize_false_in_a_file_trains_without_standardisation(tmp_path):
    (tmp_path / "run.toml").write_text("standardize = false\nimage-grid = \"4x8\"\n")
    config = TrainConfig.from_dict(read_config_file(tmp_path / "run.toml"))
    assert config.standardize is False and config.image_grid == (4, 8)


def test_python_values_are_checked_by_the_same_definition():
    with pytest.raises(VlmcacheError, match="--standardize 'false': must be true or false"):
        TrainConfig(standardize="false")
    with pytest.raises(VlmcacheError, match="--epochs 0: must be a finite number ≥ 1"):
        TrainConfig(epochs=0)
    with pytest.raises(VlmcacheError, match="--loss cosine: use one of infonce, sigmoid"):
        TrainConfig(loss="cosine")
    with pytest.raises(VlmcacheError, match="grid 'ax3'"):
        TrainConfig(image_grid="ax3")
    assert TrainConfig(image_grid=[2, 3]).image_grid == (2, 3)  # as a checkpoint's JSON stores it


def test_ablate_config_keys_are_typed(tmp_path, capsys):
    (tmp_path / "grid.toml").write_text('caches = ["x"]\nseeds = "0,1"\nprojectors = 3\n')
    code, _, err = run_cli(["ablate", "--config", tmp_path / "grid.toml"], capsys)
    assert code == 2 and "key 'projectors' = 3 must be a string or must be a list" in err
    (tmp_path / "grid.toml").write_text('caches = "x"\n')
    code, _, err = run_cli(["ablate", "--config", tmp_path / "grid.toml"], capsys)
    assert code == 2 and "key 'caches' = 'x' must be a list" in err


def test_adding_an_option_is_one_field(tmp_path):
    """A new field with option(...) is checked, read from TOML with its type, offered on the command line and
    listed in the docs table, with no other declaration."""

    @dataclasses.dataclass
    class ToyConfig:
        width: int = option(8, "Hidden width.", low=1, high=64)
        mode: str = option("fast", "fast | slow", choices=("fast", "slow"))
        verbose: bool = option(False, "Say more.", flag="--verbose")

        def __post_init__(self):
            check_options(self)

    with pytest.raises(VlmcacheError, match="--width 65: must be a finite number ≥ 1 and ≤ 64"):
        ToyConfig(width=65)
    (tmp_path / "toy.toml").write_text('width = "8"\n')
    with pytest.raises(VlmcacheError, match="key 'width' = '8' must be an integer"):
        typed_values(tmp_path / "toy.toml", read_toml(tmp_path / "toy.toml"), toml_types(ToyConfig), "toy")
    app = typer.Typer()
    seen = {}

    @app.command()
    @with_options(ToyConfig)
    def run(options: dict, name: str = "x") -> None:
        seen.update(ToyConfig(**options).__dict__, name=name)

    result = CliRunner().invoke(app, ["--width", "16", "--mode", "slow", "--verbose", "--name", "y"])
    assert result.exit_code == 0, result.output
    assert seen == {"width": 16, "mode": "slow", "verbose": True, "name": "y"}
    table = markdown_table(ToyConfig)
    assert "| `--width` | int | `8` | Hidden width. Range: ≥ 1, ≤ 64. |" in table and "`--verbose`" in table


def test_docs_options_table_is_generated_from_the_definitions():
    from pathlib import Path

    from vlmcache.app.reference import options_reference

    written = (Path(__file__).resolve().parents[1] / "docs" / "options.md").read_text(encoding="utf-8")
    assert written == options_reference(), "docs/options.md is stale: run python -m vlmcache.app.reference"
