"""Property-based fuzzing of every file kind vlmcache reads (issue #23), through the real commands that read it.

Each kind starts from a valid file made by vlmcache itself and is damaged the ways files are damaged: cut short,
bytes changed, replaced by noise, and — for JSON, HDF5 and safetensors metadata — values of the wrong type or
keys gone. Whatever the damage, the command that reads the file either works (exit 0: hypothesis may leave it
valid) or refuses in one line (exit 2, exactly one line on stderr); it never shows a traceback.

Where vlmcache recorded a file's SHA-256, half the examples record the damaged file's hash too, so the damage
reaches the library behind the hash check (tokenizers, ONNX Runtime, safetensors, h5py). npy/npz/parquet are
fuzzed with the import formats (tests/test_formats.py). Everything expensive is built once per module;
VLMCACHE_FUZZ_EXAMPLES raises the examples per kind (6 keeps the file near a minute).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import pytest
import safetensors.numpy
from conftest import make_flickr_slice, works_or_one_line
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_webdataset import write_shards

from vlmcache import extract
from vlmcache.align.config import TrainConfig
from vlmcache.align.train import train
from vlmcache.app.search import build_index
from vlmcache.app.search_index import FOLDER
from vlmcache.cache import query_encoder
from vlmcache.caption.config import CaptionConfig
from vlmcache.caption.train import train_captioner
from vlmcache.files import SEAL, write_sealed_safetensors

FUZZ = settings(max_examples=int(os.environ.get("VLMCACHE_FUZZ_EXAMPLES", "6")), deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
QUERIES = (f"a query never seen before, number {n}" for n in itertools.count())  # each one runs the text encoder


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny_models) -> dict:
    """Valid files of every kind, each made by vlmcache: a cache, a run with its search index, a captioner, a
    webdataset tar, a TOML config and photos."""
    root = tmp_path_factory.mktemp("fuzz-files")
    data = make_flickr_slice(root / "flickr", 4, 3)
    models = {"image_model": str(tiny_models["vit"]), "text_model": str(tiny_models["distilbert"])}
    extract(data, root / "cache", shard_size=4, progress=False, **models)
    train(root / "cache", root / "run", TrainConfig(projector="linear", epochs=1, batch_size=4))
    build_index(root / "run")
    train_captioner(root / "cache", root / "captioner", CaptionConfig(width=32, layers=1, heads=2, min_count=1,
                                                                      batch_size=8, max_length=8, epochs=1))
    photos = sorted((data / "Images").iterdir())
    write_shards(root / "tars", [photo.resolve() for photo in photos[:3]])
    (root / "photos").mkdir()
    for photo in photos[:2]:  # a JPEG from the data and the same picture as PNG
        shutil.copyfile(photo, root / "photos" / "photo.jpg")
    from PIL import Image

    Image.open(photos[1]).save(root / "photos" / "photo.png")
    (root / "pairs.csv").write_text("image,caption\nphotos/photo.jpg,a photo\nphotos/photo.png,another photo\n")
    return {"root": root, "cache": root / "cache", "run": root / "run", "captioner": root / "captioner",
            "tar": root / "tars" / "00000.tar", "config": root / "run" / "config.toml", "photos": root / "photos",
            "pairs": root / "pairs.csv", "models": models, "out": (root / "outputs" / f"o{n}" for n in itertools.count())}


@contextmanager
def replaced(*paths: Path) -> Iterator[None]:
    """Let an example damage these files; put back their bytes afterwards, so every example starts from valid ones."""
    kept = {path: path.read_bytes() for path in paths}
    try:
        yield
    finally:
        for path, content in kept.items():
            path.write_bytes(content)


# -------------------------------------------------------------------------------------------- damage


def damaged_bytes(valid: bytes) -> st.SearchStrategy[bytes]:
    """Cut short, some bytes changed (near the start, where headers are, or anywhere), or replaced by noise."""
    size = len(valid)
    position = st.one_of(st.integers(0, min(size, 4096) - 1), st.integers(0, size - 1))

    def changed(edits: list[tuple[int, int]]) -> bytes:
        raw = bytearray(valid)
        for at, value in edits:
            raw[at] = value
        return bytes(raw)

    return st.one_of(st.integers(0, size - 1).map(lambda cut: valid[:cut]),
                     st.lists(st.tuples(position, st.integers(0, 255)), min_size=1, max_size=8).map(changed),
                     st.binary(max_size=600))


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-(10**20), 10**20) | st.floats() |
                           st.text(max_size=8), lambda inner: st.lists(inner, max_size=3) |
                           st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)


def key_paths(value, prefix: tuple = ()) -> list[tuple]:
    """The path of every value inside a JSON value (the top level is ())."""
    found = [prefix]
    if isinstance(value, dict):
        found += [path for key, item in value.items() for path in key_paths(item, (*prefix, key))]
    elif isinstance(value, list):
        found += [path for index, item in enumerate(value[:4]) for path in key_paths(item, (*prefix, index))]
    return found


def with_value(value, path: tuple, new, delete: bool = False):
    """A deep copy of a JSON value with the value at `path` replaced by `new` (or removed)."""
    if not path:
        return new
    copy = json.loads(json.dumps(value))
    parent = copy
    for key in path[:-1]:
        parent = parent[key]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = new
    return copy


def damaged_json(valid) -> st.SearchStrategy:
    """A JSON value with one value replaced by another of any type, or one key or item removed."""
    paths = key_paths(valid)
    return st.one_of(st.tuples(st.sampled_from(paths), JSON_VALUES).map(lambda edit: with_value(valid, *edit)),
                     st.sampled_from(paths[1:]).map(lambda path: with_value(valid, path, None, delete=True)))


def damaged_json_file(valid: bytes) -> st.SearchStrategy[bytes]:
    return st.one_of(damaged_json(json.loads(valid)).map(lambda value: json.dumps(value).encode()),
                     damaged_bytes(valid))


HDF5_TEXT = st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",))  # what HDF5 strings can hold


def hdf5_damage(path: Path) -> st.SearchStrategy:
    """A change to an HDF5 file's structure: a dataset or attribute gone, or replaced by data of another type."""
    with h5py.File(path, "r") as handle:
        names, attributes = sorted(handle), sorted(handle.attrs)
    data = st.one_of(st.lists(st.integers(-5, 50), max_size=12).map(lambda v: np.asarray(v, np.int64)),
                     st.lists(st.floats(allow_nan=True), max_size=12).map(np.asarray),
                     st.lists(st.text(HDF5_TEXT, max_size=5), max_size=12).map(lambda v: np.asarray(v, dtype=object)),
                     st.just(np.zeros((3, 2, 2), np.float32)))
    return st.tuples(st.sampled_from([*[("dataset", name) for name in names], *[("attr", name) for name in attributes]]),
                     st.booleans(), data)


def apply_hdf5_damage(path: Path, damage) -> None:
    (where, name), remove, value = damage
    with h5py.File(path, "a") as handle:
        container = handle if where == "dataset" else handle.attrs
        del container[name]
        if not remove:
            if value.dtype == object:
                value = value.astype(h5py.string_dtype()) if where == "dataset" else json.dumps(value.tolist())
            container[name] = value


# ------------------------------------------------------------------------------- the cache's own files


def fuzz_cache_file(made, capsys, relative: str, commands) -> None:
    """Damage one file of a copy of the cache (bytes, or its JSON/HDF5 structure); every command reading it holds."""
    cache = Path(shutil.copytree(made["cache"], made["root"] / f"cache-{relative.replace('/', '-')}"))
    path, valid = cache / relative, (cache / relative).read_bytes()
    structure = damaged_json_file(valid).map(lambda raw: ("bytes", raw)) if relative.endswith(".json") else \
        hdf5_damage(path).map(lambda damage: ("hdf5", damage))

    @FUZZ
    @given(damage=st.one_of(damaged_bytes(valid).map(lambda raw: ("bytes", raw)), structure))
    def property_holds(damage):
        with replaced(path):
            if damage[0] == "bytes":
                path.write_bytes(damage[1])
            else:
                apply_hdf5_damage(path, damage[1])
            for command in commands:
                works_or_one_line([part.format(**{**made, "cache": cache}) for part in command], capsys)

    property_holds()


@pytest.mark.parametrize("relative", ["manifest.json", "index.h5", "images/shard-00000.h5", "texts/shard-00001.h5"])
def test_damaged_cache_files_work_or_fail_in_one_line(made, capsys, relative):
    fuzz_cache_file(made, capsys, relative, [["info", "{cache}"], ["verify", "{cache}"],
                                             ["eval", "{run}", "--cache", "{cache}", "--no-baselines", "--no-qbnorm"]])


@pytest.mark.parametrize("name", [query_encoder.MODEL, query_encoder.TOKENIZER])
def test_a_damaged_saved_text_encoder_works_or_fails_in_one_line(made, capsys, name):
    """The run's own cache holds the saved encoder its searches use: damaged in place, put back after each example."""
    path, record_path = made["cache"] / name, made["cache"] / query_encoder.RECORD
    valid = path.read_bytes()
    damage = damaged_json_file(valid) if name.endswith(".json") else damaged_bytes(valid)

    @FUZZ
    @given(content=damage, recorded=st.booleans())
    def property_holds(content, recorded):
        with replaced(path, record_path):
            path.write_bytes(content)
            if recorded:  # as if extract had written it so: the damage reaches tokenizers / ONNX Runtime
                record = json.loads(record_path.read_text())
                record["sha256"][name] = hashlib.sha256(content).hexdigest()
                record_path.write_text(json.dumps(record))
            works_or_one_line(["search", made["run"], next(QUERIES)], capsys)
            works_or_one_line(["verify", made["cache"]], capsys)

    property_holds()


# -------------------------------------------------------------------------------- safetensors files


def safetensors_with(raw: bytes, metadata: dict[str, str], seal: bool) -> bytes:
    """The tensors of a safetensors file with other metadata: sealed as vlmcache seals its files, or not (as an
    older vlmcache, or a hand, would write them)."""
    content = safetensors.numpy.save(safetensors.numpy.load(raw), metadata=metadata)
    if not seal:
        return content
    with tempfile.TemporaryDirectory() as folder:
        write_sealed_safetensors(Path(folder) / "sealed.safetensors", content)
        return (Path(folder) / "sealed.safetensors").read_bytes()


def damaged_metadata(raw: bytes, key: str, seal: bool) -> st.SearchStrategy[bytes]:
    """The file with the JSON held in its metadata `key` damaged (damaged_json), sealed again or not."""
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])["__metadata__"]
    kept = {name: value for name, value in header.items() if name != SEAL}
    return damaged_json(json.loads(header[key])).map(
        lambda value: safetensors_with(raw, {**kept, key: json.dumps(value)}, seal))


FRESH = object()  # in a command: a new output folder for each example


def fuzz_file(made, capsys, path: Path, damage: st.SearchStrategy[bytes], commands: list[list],
              examples: int | None = None) -> None:
    """Every command reading `path` works or fails in one line, whatever `damage` writes there (the file is put
    back after each example)."""

    @settings(FUZZ, max_examples=examples or FUZZ.max_examples)
    @given(content=damage)
    def property_holds(content):
        with replaced(path):
            path.write_bytes(content)
            for command in commands:
                works_or_one_line([next(made["out"]) if part is FRESH else part for part in command], capsys)

    property_holds()


@pytest.mark.parametrize("kind", ["alignment", "captioner"])
def test_a_damaged_checkpoint_works_or_fails_in_one_line(made, capsys, kind):
    run = Path(shutil.copytree(made[kind if kind == "captioner" else "run"], made["root"] / f"fuzz-{kind}"))
    path, valid = run / "best.safetensors", (run / "best.safetensors").read_bytes()
    # caption eval reads the checkpoint as caption does, but scores baselines too: seconds per valid example
    commands = ([["eval", run, "--no-baselines", "--no-qbnorm"], ["search", run, "a dog"], ["verify", run]]
                if kind == "alignment" else [["caption", made["photos"] / "photo.jpg", "--checkpoint", run, "--beam", "1"],
                                             ["verify", run]])
    damage = st.one_of(damaged_bytes(valid), damaged_metadata(valid, "vlmcache", seal=False),
                       damaged_metadata(valid, "vlmcache", seal=True))
    fuzz_file(made, capsys, path, damage, commands)


def test_a_damaged_search_index_works_or_fails_in_one_line(made, capsys):
    run = Path(shutil.copytree(made["run"], made["root"] / "fuzz-index"))
    path = next((run / FOLDER).glob("*.safetensors"))
    valid = path.read_bytes()
    damage = st.one_of(damaged_bytes(valid), damaged_metadata(valid, "image_ids", seal=True),
                       damaged_metadata(valid, "image_paths", seal=True))
    fuzz_file(made, capsys, path, damage, [["search", run, "a dog on the grass"], ["verify", run]])


# ------------------------------------------------------------------------- inputs: tar, TOML, images


def extract_command(made, data: Path, *options: str) -> list:
    return ["extract", data, "--out", FRESH, "--backend", "torch", "--image-model", made["models"]["image_model"],
            "--text-model", made["models"]["text_model"], *options]


def test_a_damaged_tar_shard_works_or_fails_in_one_line(made, capsys):
    fuzz_file(made, capsys, made["tar"], damaged_bytes(made["tar"].read_bytes()),
              [extract_command(made, made["tar"].parent, "--val-fraction", "0.5")])


def test_a_damaged_toml_config_works_or_fails_in_one_line(made, capsys):
    config = made["root"] / "fuzzed.toml"
    shutil.copyfile(made["config"], config)
    damage = st.one_of(damaged_bytes(config.read_bytes()), st.text(max_size=200).map(str.encode))
    fuzz_file(made, capsys, config, damage, [["train", "--config", config, "--epochs", "1", "--out", FRESH]])


@pytest.mark.parametrize(("name", "command"), [  # both commands read images with the one reader, load_rgb
    ("photo.jpg", ["classify", "{path}", "--checkpoint", "{run}", "--labels", "a dog,a cat"]),
    ("photo.png", ["caption", "{path}", "--checkpoint", "{captioner}", "--beam", "1"])])
def test_a_damaged_image_works_or_fails_in_one_line(made, capsys, name, command):
    path = made["photos"] / name
    fuzz_file(made, capsys, path, damaged_bytes(path.read_bytes()),
              [[part.format(path=path, **made) for part in command]])


def test_a_damaged_image_in_a_dataset_stops_extract_in_one_line(made, capsys):
    path = made["photos"] / "photo.png"
    fuzz_file(made, capsys, path, damaged_bytes(path.read_bytes()), [extract_command(made, made["pairs"])],
              examples=max(2, FUZZ.max_examples // 2))  # each example loads both encoders
