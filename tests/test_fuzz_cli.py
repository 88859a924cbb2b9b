"""Property-based fuzzing of the whole CLI (issue #11): random option values and malformed files for every command.

Whatever it is given, `vlmcache` either works (exit 0) or refuses in one line (exit 2, exactly one line on
stderr); it never shows a Python traceback. The CLI runs in-process (fast); an uncaught exception fails the
property at once and hypothesis shrinks it to the smallest command line that raises it.

Valid inputs are in the mix too (a tiny cache, a trained run, a real photo), so some examples do real work;
values that would make a valid run slow rather than wrong (thousands of epochs, 64 worker processes,
65,536-wide MLP layers) are left out of the valid range, never out of the invalid one.
"""

from __future__ import annotations

import io
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_flickr_slice, works_or_one_line
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlmcache import extract
from vlmcache.align.config import TrainConfig
from vlmcache.align.train import train
from vlmcache.data.formats import export_cache, import_embeddings

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
    "--text-grid": st.one_of(st.just("8x4"), TEXT), "--rank": small_or_invalid(8),
    "--ndlinear-layers": small_or_invalid(3), "--ndlinear-hidden": st.one_of(st.just("4x4"), TEXT),
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
               "--jobs": small_or_invalid(1), "--config": path_of(files, "config", *BAD),
               "--capacity": st.one_of(st.sampled_from(["2k", "300,5k", "1M"]), TEXT)}
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


# --- import of malformed embedding files: npy, npz, parquet (and an export's manifest) ---------------------------


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """One small valid source per import format (clip-retrieval twice: as written, and as vlmcache exports it)."""
    from test_formats import write_clip_retrieval, write_datacomp

    root = tmp_path_factory.mktemp("formats")
    write_clip_retrieval(root / "clip-retrieval", parts=(6, 4), image_dim=4, text_dim=3)
    import_embeddings(root / "clip-retrieval", root / "cache", "clip-retrieval", progress=False)
    export_cache(root / "cache", root / "export", rows_per_file=6, progress=False)
    write_datacomp(root / "datacomp", shards=(5,))
    rng = np.random.default_rng(0)
    (root / "npy").mkdir()
    np.save(root / "npy" / "img_emb.npy", rng.standard_normal((5, 4)).astype(np.float32))
    np.save(root / "npy" / "text_emb.npy", rng.standard_normal((5, 3)).astype(np.float32))
    pq.write_table(pa.table({"caption": [f"c{n}" for n in range(5)]}), root / "npy" / "metadata.parquet")
    return {name: root / name for name in ("clip-retrieval", "export", "datacomp", "npy")}


# The files each example may break, by source; each source's --format is its name (the export is clip-retrieval).
TARGETS = {
    "clip-retrieval": ["img_emb/img_emb_0.npy", "text_emb/text_emb_1.npy", "metadata/metadata_0.parquet"],
    "export": ["img_emb/img_emb_1.npy", "text_emb/text_emb_0.npy", "metadata/metadata_1.parquet", "vlmcache-export.json"],
    "datacomp": ["00000000.npz", "00000000.parquet"],
    "npy": ["img_emb.npy", "text_emb.npy", "metadata.parquet"],
}
DTYPES = ["float16", "float32", ">f4", "float64", "int32", "uint8", "bool", "complex64", "U3", "object"]
COLUMN_VALUES = [pa.array(["a dog"] * 6), pa.array([b"a dog"] * 6, pa.binary()), pa.array([b"\xff"] * 6, pa.binary()),
                 pa.array(range(6)), pa.array([0.5] * 6), pa.array([None] * 6, pa.string()), pa.array([None] * 6),
                 pa.array([["a"]] * 6), pa.array(["a dog"] * 6).dictionary_encode(), pa.array([{"x": 1}] * 6)]


def array_bytes(draw) -> bytes:
    """An .npy of a random dtype and shape (0 to 3 dimensions, sizes 0 to 8), pickled when of objects."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 8), max_size=3)))
    array = np.zeros(shape, dtype=dtype) if dtype != "object" else np.full(shape, None, dtype=object)
    if array.dtype.kind == "f" and array.size and draw(st.booleans()):
        array.flat[0] = draw(st.sampled_from([np.nan, np.inf, 1e30]))
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def npz_bytes(draw) -> bytes:
    """A .npz whose arrays are random (see array_bytes), under the expected names or others."""
    buffer = io.BytesIO()
    names = draw(st.lists(st.sampled_from(["b32_img", "b32_txt", "l14_img", "x"]), min_size=0, max_size=3, unique=True))
    arrays = {}
    for name in names:
        arrays[name] = np.load(io.BytesIO(array_bytes(draw)), allow_pickle=True)
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def table_bytes(draw) -> bytes:
    """A parquet file whose caption/text/split/id columns hold random types and row counts."""
    columns = {}
    for name in draw(st.lists(st.sampled_from(["caption", "text", "split", "uid", "image_path"]), max_size=4, unique=True)):
        rows = draw(st.sampled_from([0, 4, 5, 6]))
        columns[name] = draw(st.sampled_from(COLUMN_VALUES))[:rows]
    rows = min((len(values) for values in columns.values()), default=0)  # a table's columns share one length
    buffer = io.BytesIO()
    pq.write_table(pa.table({name: values[:rows] for name, values in columns.items()}), buffer)
    return buffer.getvalue()


@st.composite
def broken_sources(draw, sources):
    """(source, file, its new bytes, whether the import must fail): the file unchanged, cut short, with bytes
    flipped, replaced by random bytes, by another kind's file, or by a well-formed file of the wrong content."""
    source = draw(st.sampled_from(sorted(TARGETS)))
    target = draw(st.sampled_from(TARGETS[source]))
    original = (sources[source] / target).read_bytes()
    how = draw(st.sampled_from(["same", "truncate", "flip", "random", "other kind", "wrong content"]))
    if how == "same":
        return source, target, original, False
    if how == "truncate":  # every kind here is checked whole: a cut-off file never imports
        return source, target, original[:draw(st.integers(0, len(original) - 1))], True
    if how == "flip":
        data = bytearray(original)
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
        # An export's manifest notices any change to a part (a flip in its own fields may be harmless).
        return source, target, bytes(data), source == "export" and target != "vlmcache-export.json"
    if how == "random":
        return source, target, draw(st.binary(max_size=300)), True
    other = draw(st.sampled_from([path for files in TARGETS.values() for path in files if Path(path).suffix !=
                                  Path(target).suffix]))
    if how == "other kind":
        return source, target, next(sources[s] / other for s in TARGETS if other in TARGETS[s]).read_bytes(), True
    maker = {".npy": array_bytes, ".npz": npz_bytes, ".parquet": table_bytes}.get(Path(target).suffix)
    return source, target, maker(draw) if maker else draw(TEXT).encode(), source == "export"


def test_import_of_broken_embedding_files_fails_in_one_line(sources, capsys, tmp_path):
    """Whatever bytes an npy, npz, parquet or export manifest holds, `vlmcache import` imports it (exit 0) or
    refuses it in one line (exit 2); truncated or random bytes always fail, and the unchanged file imports."""
    @FUZZ
    @given(case=broken_sources(sources))
    def property_holds(case):
        source, target, data, must_fail = case
        with tempfile.TemporaryDirectory(dir=tmp_path) as work:
            folder = Path(work) / source
            shutil.copytree(sources[source], folder)
            (folder / target).write_bytes(data)
            argv = ["import", str(folder), "--format", "clip-retrieval" if source == "export" else source,
                    "--out", str(Path(work) / "cache")] + (["--features", "b32"] if source == "datacomp" else [])
            code = works_or_one_line(argv, capsys)
            if data == (sources[source] / target).read_bytes():  # also a flip undone by a second one
                assert code == 0, (argv, target)
            elif must_fail:
                assert code == 2, (argv, target, data[:80])

    property_holds()
