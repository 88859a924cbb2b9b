"""Property-based fuzzing of the whole CLI (issue #11): random option values and malformed files for every command.

Whatever it is given, `vlmcache` either works (exit 0) or refuses in one line (exit 2, exactly one line on
stderr); it never shows a Python traceback. The CLI runs in-process (fast); an uncaught exception fails the
property at once and hypothesis shrinks it to the smallest command line that raises it.

Valid inputs are in the mix too (a tiny cache, a trained run, a real photo), so some examples do real work;
values that would make a valid run slow rather than wrong (thousands of epochs, 64 worker processes,
65,536-wide MLP layers) are left out of the valid range, never out of the invalid one.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
from conftest import make_flickr_slice, works_or_one_line
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlmcache import extract
from vlmcache.align.config import TrainConfig
from vlmcache.align.train import train

# VLMCACHE_FUZZ_EXAMPLES=500 fuzzes harder (minutes); 25 per command keeps the suite fast.
FUZZ = settings(max_examples=int(os.environ.get("VLMCACHE_FUZZ_EXAMPLES", "25")), deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_models) -> dict[str, Path]:
    """Valid inputs (dataset, cache, run, photo) and malformed ones (empty, random bytes, truncated JSON...)."""
    root = tmp_path_factory.mktemp("fuzz")
    data = make_flickr_slice(root / "flickr", 4, 3)
    models = {"image_model": str(tiny_models["vit"]), "text_model": str(tiny_models["distilbert"])}
    extract(data, root / "cache", progress=False, **models)
    train(root / "cache", root / "run", TrainConfig(projector="linear", epochs=1, batch_size=4))
    (root / "empty").write_bytes(b"")
    (root / "random.bin").write_bytes(bytes(range(256)) * 3 + b"\xff\xfe\x00")
    (root / "truncated.json").write_text('{"format_version": 1, "status": "comp')
    (root / "truncated.toml").write_text('epochs = 3\nprojector = "ml')
    (root / "config.toml").write_text('projector = "linear"\nepochs = 1\nbatch_size = 4\nbogus = 1\n')
    (root / "folder").mkdir()
    (root / "not-utf8.txt").write_bytes(b"a dog\n\xff\xfe\xfa\n")
    (root / "fake.jpg").write_text("not a jpeg")
    (root / "pairs.csv").write_text("image,caption\nnowhere.png,a ghost\n,\n")
    bad_cache = root / "bad-cache"
    bad_cache.mkdir()
    (bad_cache / "manifest.json").write_text('{"format_version": 1, "status": "complete", "shards": {}}')
    (root / "foreign").mkdir()
    (root / "foreign" / "notes.txt").write_text("someone's notes")
    broken_run = root / "broken-run"
    broken_run.mkdir()
    (broken_run / "best.safetensors").write_bytes((root / "run" / "best.safetensors").read_bytes()[:200])
    return {"data": data, "cache": root / "cache", "run": root / "run", "photo": next((data / "Images").iterdir()),
            "empty": root / "empty", "random": root / "random.bin", "json": root / "truncated.json",
            "toml": root / "truncated.toml", "config": root / "config.toml", "folder": root / "folder",
            "labels": root / "not-utf8.txt", "fake": root / "fake.jpg", "pairs": root / "pairs.csv",
            "bad_cache": bad_cache, "broken_run": broken_run, "missing": root / "no" / "such" / "thing",
            "foreign": root / "foreign", "out": root / "outputs", "models": models}


BAD = ("empty", "random", "json", "toml", "folder", "labels", "fake", "pairs", "bad_cache", "broken_run", "missing")
# Integers of every size and sign, and floats including nan and inf, as the command line would spell them.
HUGE = st.integers(min_value=-(10**30), max_value=10**30)
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([math.nan, math.inf, -math.inf, 0.0]))
TEXT = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=24)


def value(strategy) -> st.SearchStrategy[str]:
    return strategy.map(str)


def small_or_invalid(high: int) -> st.SearchStrategy[str]:
    """Any integer, except valid values above `high` (correct but slow): those become `high`."""
    return value(st.one_of(HUGE, st.integers(-3, high + 2)).map(lambda v: high if high < v <= 10**6 else v))


def path_of(files: dict, *names: str) -> st.SearchStrategy[str]:
    return st.sampled_from([str(files[name]) for name in names])


def command_line(draw, files: dict, positional: list[str], options: dict[str, st.SearchStrategy[str]],
                 flags: tuple[str, ...] = ()) -> list[str]:
    """Positional values, then a random subset of the options with random values, then random flags."""
    argv = list(positional)
    for option, strategy in options.items():
        if draw(st.booleans()):
            argv += [option, draw(strategy)]
    for flag in flags:
        if draw(st.booleans()):
            argv.append(flag)
    return argv


def out_folder(files: dict) -> st.SearchStrategy[str]:
    """An --out folder: a fresh one (maybe reused by an earlier example), an existing file, someone else's folder.
    Never one of the malformed inputs' folders: a run written there would make it valid for later examples."""
    return st.one_of(st.integers(0, 3).map(lambda n: str(files["out"] / f"o{n}")),
                     path_of(files, "empty", "random", "json", "foreign"))


def out_file(files: dict, suffix: str) -> st.SearchStrategy[str]:
    """An output file: a fresh name, a folder, or a place whose folder does not exist."""
    return st.one_of(st.integers(0, 3).map(lambda n: str(files["out"] / f"f{n}{suffix}")),
                     path_of(files, "folder", "missing"), st.just(str(files["empty"] / f"x{suffix}")))


@st.composite
def extract_args(draw, files):
    models = files["models"]
    options = {
        "--out": out_folder(files),
        "--image-model": st.one_of(st.just(models["image_model"]), st.just(models["text_model"]), TEXT,
                                   path_of(files, "folder", "random")),
        "--text-model": st.one_of(st.just(models["text_model"]), TEXT, path_of(files, "folder")),
        "--image-pooling": st.one_of(st.sampled_from(["cls", "mean", "pooler", "avgpool"]), TEXT),
        "--text-pooling": st.one_of(st.sampled_from(["cls", "mean", "pooler"]), TEXT),
        "--format": st.one_of(st.sampled_from(["auto", "flickr8k", "karpathy", "pairs", "imagefolder"]), TEXT),
        "--images-dir": path_of(files, *BAD),
        "--splits": st.one_of(st.just("train,val"), TEXT),
        "--limit": small_or_invalid(10**6), "--shard-size": small_or_invalid(10**6),
        "--batch-size": small_or_invalid(64), "--text-batch-size": small_or_invalid(64),
        "--max-length": small_or_invalid(8192), "--workers": small_or_invalid(1),
        "--device": st.one_of(st.sampled_from(["cpu", "cuda", "cuda:7", "tpu", "auto"]), TEXT),
        "--dtype": st.one_of(st.sampled_from(["float16", "float32"]), TEXT),
        "--on-error": st.one_of(st.sampled_from(["fail", "skip"]), TEXT),
        "--backend": st.one_of(st.sampled_from(["auto", "torch", "onnxruntime", "eager"]), TEXT),
    }
    data = draw(st.one_of(path_of(files, "data", *BAD), TEXT))
    argv = command_line(draw, files, ["extract", data], options, ("--tokens", "--overwrite"))
    if "--image-model" not in argv:  # never the default model: real work, but too slow for a fuzz example
        argv += ["--image-model", models["image_model"], "--text-model", models["text_model"]]
    return argv


TRAIN_OPTIONS = {
    "--projector": st.one_of(st.sampled_from(["linear", "mlp", "ndlinear"]), TEXT),
    "--loss": st.one_of(st.sampled_from(["infonce", "sigmoid"]), TEXT),
    "--dim": small_or_invalid(512), "--epochs": small_or_invalid(2), "--batch-size": small_or_invalid(64),
    "--lr": value(FLOATS), "--weight-decay": value(FLOATS), "--warmup": value(HUGE),
    "--schedule": st.one_of(st.sampled_from(["cosine", "onecycle", "constant"]), TEXT),
    "--seed": value(HUGE), "--sampling": st.one_of(st.sampled_from(["image", "caption"]), TEXT),
    "--patience": value(HUGE), "--dropout": value(FLOATS), "--mlp-hidden": small_or_invalid(512),
    "--mlp-layers": small_or_invalid(4), "--image-grid": st.one_of(st.just("4x8"), TEXT),
    "--text-grid": st.one_of(st.just("8x4"), TEXT),
    "--train-split": st.one_of(st.just("val"), TEXT), "--val-split": st.one_of(st.just("train"), TEXT),
    "--device": st.one_of(st.sampled_from(["cpu", "cuda", "auto", "tpu"]), TEXT),
}


@st.composite
def train_args(draw, files):
    options = {**TRAIN_OPTIONS, "--out": out_folder(files),
               "--text-cache": path_of(files, "cache", *BAD), "--config": path_of(files, "config", *BAD)}
    cache = draw(st.one_of(path_of(files, "cache", "cache", *BAD), TEXT))
    argv = command_line(draw, files, ["train", cache], options, ("--resume", "--overwrite", "--residual"))
    if "--epochs" not in argv:
        argv += ["--epochs", "1"]  # the default 20 is correct but slow
    return argv


@st.composite
def eval_args(draw, files):
    options = {"--split": st.one_of(st.sampled_from(["train", "val", "test"]), TEXT),
               "--cache": path_of(files, "cache", *BAD), "--zero-shot": path_of(files, "cache", *BAD),
               "--class-names": path_of(files, *BAD), "--json": out_file(files, ".json")}
    checkpoint = draw(st.one_of(path_of(files, "run", "run", *BAD), TEXT))
    return command_line(draw, files, ["eval", checkpoint], options, ("--no-baselines", "--ensemble"))


@st.composite
def classify_args(draw, files):
    options = {"--checkpoint": path_of(files, "run", "run", *BAD), "--labels": TEXT,
               "--labels-file": path_of(files, *BAD), "--template": st.one_of(st.just("a photo of {}."), TEXT)}
    image = draw(st.one_of(path_of(files, "photo", *BAD), TEXT))
    return command_line(draw, files, ["classify", image], options)


@st.composite
def search_args(draw, files):
    options = {"--top": value(HUGE), "--split": st.one_of(st.sampled_from(["train", "val"]), TEXT),
               "--cache": path_of(files, "cache", *BAD)}
    checkpoint = draw(st.one_of(path_of(files, "run", "run", *BAD), TEXT))
    return command_line(draw, files, ["search", checkpoint, draw(TEXT)], options)


@st.composite
def ablate_args(draw, files):
    int_list = st.one_of(st.lists(small_or_invalid(2), max_size=2).map(",".join), TEXT)
    options = {"--out": out_folder(files), "--projectors": st.one_of(st.sampled_from(["linear", "mlp,ndlinear"]), TEXT),
               "--losses": st.one_of(st.sampled_from(["infonce", "sigmoid"]), TEXT), "--seeds": int_list,
               "--dims": st.one_of(st.lists(small_or_invalid(64), max_size=2).map(",".join), TEXT),
               "--epochs": small_or_invalid(1), "--batch-size": small_or_invalid(64),
               "--jobs": small_or_invalid(1), "--config": path_of(files, "config", *BAD)}
    caches = draw(st.lists(st.one_of(path_of(files, "cache", *BAD), TEXT), min_size=1, max_size=2))
    argv = command_line(draw, files, ["ablate", *caches], options, ("--no-baselines",))
    for option, safe in (("--epochs", "1"), ("--jobs", "1"), ("--seeds", "0"), ("--projectors", "linear"),
                         ("--losses", "infonce")):
        if option not in argv:  # the defaults are a 3×2×3 grid of 20 epochs on every core: correct, slow
            argv += [option, safe]
    return argv


@st.composite
def plot_args(draw, files):
    path = draw(st.one_of(path_of(files, "run", *BAD), TEXT))
    return command_line(draw, files, ["plot", path], {"--out": out_file(files, ".png")})


@st.composite
def serve_args(draw, files):
    """Only command lines that fail before binding a port: a bad checkpoint, or the good one with a split it lacks."""
    options = {"--host": TEXT, "--port": value(HUGE)}
    if draw(st.booleans()):
        argv = ["serve", draw(st.one_of(path_of(files, *BAD), TEXT.filter(lambda t: not Path(t).exists())))]
        return command_line(draw, files, argv, {**options, "--split": TEXT})
    split = draw(TEXT.filter(lambda t: t not in ("", "train", "val")))
    return command_line(draw, files, ["serve", str(files["run"]), "--split", split], options)


@pytest.mark.parametrize("command", [extract_args, train_args, eval_args, classify_args, search_args, ablate_args,
                                     plot_args, serve_args], ids=lambda c: c.__name__.removesuffix("_args"))
def test_any_command_line_works_or_fails_in_one_line(files, capsys, command):
    @FUZZ
    @given(argv=command(files))
    def property_holds(argv):
        works_or_one_line(argv, capsys)

    property_holds()


@pytest.mark.parametrize("name", ["info", "verify"])
def test_info_and_verify_on_every_file_kind(files, capsys, name):
    for key in (*BAD, "cache", "data", "run", "photo"):
        works_or_one_line([name, str(files[key])], capsys)


@FUZZ
@given(name=st.sampled_from(["info", "verify"]), path=TEXT)
def test_info_and_verify_on_any_path(capsys, name, path):
    works_or_one_line([name, path], capsys)


def test_the_fuzzed_files_are_left_as_they_were(files):
    """The malformed inputs are read, never 'repaired' or deleted, by any command above."""
    assert files["empty"].read_bytes() == b"" and files["json"].read_text().endswith("comp")
    assert (files["bad_cache"] / "manifest.json").exists() and files["photo"].exists()
    assert [p.name for p in files["folder"].iterdir()] == [] and not files["missing"].parent.exists()
    assert (files["foreign"] / "notes.txt").read_text() == "someone's notes"
