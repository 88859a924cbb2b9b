"""Issue #23 "Trust, round 3": every artefact vlmcache writes and later trusts is checked against a SHA-256 recorded
when it was written; every file kind is read by one reader that refuses bad input in one line; `caption`'s numeric
options are range-checked in one place.

Each CLI failure is checked as the project promises it: exit 2, exactly one line on stderr naming the file or
option, never a traceback. The cache and runs are built once per module; a test that damages one works on a copy.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import safetensors.torch
from conftest import make_flickr_slice, one_line_error, run_cli
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from vlmcache import extract
from vlmcache.align.ablate import ablate
from vlmcache.align.config import TrainConfig
from vlmcache.align.train import train
from vlmcache.app.predictor import Predictor
from vlmcache.app.search import build_index, search_images
from vlmcache.app.search_index import FOLDER
from vlmcache.cache import query_encoder
from vlmcache.caption.config import CaptionConfig
from vlmcache.caption.train import train_captioner
from vlmcache.encode.prompts import PromptStore, prompt_folder
from vlmcache.files import SEAL, write_sealed_safetensors
from vlmcache.run.checkpoint import read_checkpoint

QUERY = "a dog runs on the grass"
TINY_CAPTIONER = {"width": 32, "layers": 1, "heads": 2, "min_count": 1, "batch_size": 8, "max_length": 8, "epochs": 1}


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_models) -> dict[str, Path]:
    """A tiny cache (with its saved ONNX text encoder), an alignment run with its search index, a captioner."""
    root = tmp_path_factory.mktemp("integrity")
    data = make_flickr_slice(root / "flickr", 6, 4)
    extract(data, root / "cache", image_model=str(tiny_models["vit"]), text_model=str(tiny_models["distilbert"]),
            shard_size=4, progress=False)
    train(root / "cache", root / "run", TrainConfig(projector="linear", epochs=1, batch_size=4))
    build_index(root / "run")
    train_captioner(root / "cache", root / "captioner", CaptionConfig(**TINY_CAPTIONER))
    return {"data": data, "cache": root / "cache", "run": root / "run", "captioner": root / "captioner",
            "photo": next((data / "Images").iterdir())}


def retarget(run: Path, cache: Path) -> None:
    """Point a copied run's checkpoints at a copied cache (a run records its cache's absolute path)."""
    for name in ("best", "last"):
        tensors, header = read_checkpoint(run / f"{name}.safetensors")
        meta = {**header["vlmcache"], "cache": str(cache)}
        metadata = {key: value for key, value in header.items() if key not in ("path", "vlmcache", SEAL)}
        write_sealed_safetensors(run / f"{name}.safetensors",
                                 safetensors.torch.save(tensors, metadata={**metadata, "vlmcache": json.dumps(meta)}))


@pytest.fixture
def copied(built, tmp_path) -> dict[str, Path]:
    """Private copies of the cache and the run (the run reading the copied cache, with its index rebuilt)."""
    cache, run = Path(shutil.copytree(built["cache"], tmp_path / "cache")), Path(shutil.copytree(built["run"], tmp_path / "run"))
    retarget(run, cache)
    shutil.rmtree(run / FOLDER)
    build_index(run)
    return {**built, "cache": cache, "run": run}


def the_index(run: Path) -> Path:
    return next((run / FOLDER).glob("*.safetensors"))


def flip_byte(path: Path, offset: int) -> None:
    """Flip one byte of a file (negative offsets count from the end)."""
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))


def same_hits(first, second) -> None:
    assert [hit.image_id for hit in first] == [hit.image_id for hit in second]
    assert np.allclose([hit.score for hit in first], [hit.score for hit in second], atol=1e-5)


# ----------------------------------------------------------------------- 1. integrity of written artefacts


@pytest.mark.parametrize("damage", ["flipped", "truncated"])
def test_a_damaged_search_index_is_refused_in_one_line_never_searched(copied, capsys, damage):
    index = the_index(copied["run"])
    if damage == "flipped":  # the last bytes are image embeddings: a silent change of every result before
        flip_byte(index, -5)
    else:
        index.write_bytes(index.read_bytes()[:len(index.read_bytes()) // 2])
    code, _, err = run_cli(["search", copied["run"], QUERY], capsys)
    one_line_error(code, err, index.name, "delete it")
    code, _, err = run_cli(["verify", copied["run"]], capsys)
    one_line_error(code, err, index.name)
    index.unlink()  # as the message says: the next search rebuilds it
    same_hits(search_images(copied["run"], QUERY, 3), Predictor(copied["run"]).search(QUERY, 3))
    assert run_cli(["verify", copied["run"]], capsys)[0] == 0


def test_an_index_written_before_indexes_were_sealed_is_rebuilt_not_trusted(copied):
    index = the_index(copied["run"])
    arrays = load_file(str(index))
    with safe_open(str(index), "np") as handle:
        metadata = {key: value for key, value in handle.metadata().items() if key != SEAL}
    wrong = np.random.default_rng(0).standard_normal(arrays["images"].shape).astype(np.float32)
    save_file({**arrays, "images": wrong}, str(index), metadata=metadata)  # as an older vlmcache wrote it, altered
    same_hits(search_images(copied["run"], QUERY, 3), Predictor(copied["run"]).search(QUERY, 3))
    with safe_open(str(index), "np") as handle:
        assert SEAL in handle.metadata()  # the search that found it unsealed wrote it again, sealed


def test_a_checkpoint_whose_weights_changed_is_refused_and_verify_names_it(copied, capsys):
    assert run_cli(["verify", copied["run"]], capsys)[0] == 0
    flip_byte(copied["run"] / "best.safetensors", -7)  # inside the last tensor: once silently different weights
    for command in (["eval", copied["run"], "--no-baselines"], ["verify", copied["run"]]):
        code, _, err = run_cli(command, capsys)
        one_line_error(code, err, "best.safetensors", "SHA-256")


@pytest.mark.parametrize("name", [query_encoder.MODEL, query_encoder.TOKENIZER])
def test_a_truncated_saved_text_encoder_is_found_by_verify_refused_by_search_and_rebuilt_by_extract(
        copied, tiny_models, capsys, name):
    saved = copied["cache"] / name
    saved.write_bytes(saved.read_bytes()[:1000])
    code, out, err = run_cli(["verify", copied["cache"]], capsys)
    one_line_error(code, err, name)
    code, _, err = run_cli(["search", copied["run"], "a query never encoded before"], capsys)
    one_line_error(code, err, name, query_encoder.RECORD)
    (copied["cache"] / query_encoder.RECORD).unlink()  # as the message says, then the same extract again
    extract(copied["data"], copied["cache"], image_model=str(tiny_models["vit"]),
            text_model=str(tiny_models["distilbert"]), shard_size=4, progress=False)
    assert run_cli(["verify", copied["cache"]], capsys)[0] == 0
    assert run_cli(["search", copied["run"], "a query never encoded before"], capsys)[0] == 0


def test_a_saved_text_encoder_without_recorded_hashes_is_not_used_and_extract_seals_it(copied, tiny_models, capsys):
    record = json.loads((copied["cache"] / query_encoder.RECORD).read_text())
    del record["sha256"]  # as an older vlmcache wrote it
    (copied["cache"] / query_encoder.RECORD).write_text(json.dumps(record))
    (copied["cache"] / query_encoder.MODEL).write_bytes(b"not an onnx model")
    code, _, err = run_cli(["search", copied["run"], "another query never encoded"], capsys)
    assert code == 0, err  # the text model itself encoded the query
    assert run_cli(["verify", copied["cache"]], capsys)[0] == 0  # nothing recorded, nothing used: nothing to report
    extract(copied["data"], copied["cache"], image_model=str(tiny_models["vit"]),
            text_model=str(tiny_models["distilbert"]), shard_size=4, progress=False)
    assert query_encoder.is_vouched_for(query_encoder.read_record(copied["cache"]))
    assert not query_encoder.problems(copied["cache"])


def test_verify_finds_a_changed_index_h5(copied, capsys):
    with h5py.File(copied["cache"] / "index.h5", "a") as index:
        index["caption"][0] = "a caption nobody wrote"
    code, _, err = run_cli(["verify", copied["cache"]], capsys)
    one_line_error(code, err, "index.h5", "SHA-256")


def test_a_damaged_prompt_store_record_is_encoded_again_not_used(copied):
    meta = Predictor(copied["run"]).meta
    store = PromptStore(meta["text_encoder"], prompt_folder(meta))
    first = store.encode(["a red car", "a small boat"]).copy()
    flip_byte(store.path, 40)  # a byte of the first record's features
    again = PromptStore(meta["text_encoder"], prompt_folder(meta))
    assert len(again.known) == 1
    assert np.array_equal(again.encode(["a red car", "a small boat"]), first)


def test_a_changed_ablation_cell_is_trained_again_not_reported(copied, tmp_path):
    grid = {"projectors": ("linear",), "losses": ("infonce",), "seeds": (0,), "epochs": 1, "jobs": 1,
            "with_baselines": False, "base_config": {"batch_size": 4}, "progress": False}
    first = ablate([str(copied["cache"])], tmp_path / "ab", **grid)
    cell = next((tmp_path / "ab" / "cells").glob("*.json"))
    result = json.loads(cell.read_text())
    result["metrics"]["mean_recall"] = 99.9
    cell.write_text(json.dumps(result))
    again = ablate([str(copied["cache"])], tmp_path / "ab", **grid)
    assert again.cells_trained == 1 and again.rows[0]["mean_recall"] == first.rows[0]["mean_recall"]


# ---------------------------------------------------------------- 2. one reader per file kind, one line


def _rewrite_manifest(cache: Path, change) -> None:
    manifest = json.loads((cache / "manifest.json").read_text())
    change(manifest)
    (cache / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(("change", "expected"), [
    (lambda m: m["shards"].update(images={"file": "shard-00000.h5"}), "shards.images"),  # a dict where a list is
    (lambda m: m.update(skipped={}), "skipped"),
    (lambda m: m.update(libraries=["torch"]), "libraries"),
    (lambda m: m["dataset"]["splits"]["train"].update(images="6"), "dataset.splits.train.images"),
    (lambda m: m["shards"]["images"][0].update(file="../../index.h5"), "shard-00000.h5"),
])
def test_a_manifest_of_the_wrong_shape_is_refused_naming_the_key(copied, capsys, change, expected):
    _rewrite_manifest(copied["cache"], change)
    for command in ("info", "verify"):
        code, _, err = run_cli([command, copied["cache"]], capsys)
        one_line_error(code, err, "manifest.json", expected)


def _caption_of_no_image(index: h5py.File) -> None:
    index["caption_image"][0] = 99


def _labels_of_no_class(index: h5py.File) -> None:
    index.create_dataset("image_label", data=np.arange(10) + 5)
    index.attrs["classes"] = json.dumps(["a", "b"])


def _no_captions(index: h5py.File) -> None:
    del index["caption"]


@pytest.mark.parametrize("damage", [_caption_of_no_image, _labels_of_no_class, _no_captions])
def test_an_index_h5_that_disagrees_with_the_manifest_is_refused_up_front(copied, tmp_path, capsys, damage):
    with h5py.File(copied["cache"] / "index.h5", "a") as index:
        damage(index)
    code, _, err = run_cli(["train", copied["cache"], "--out", tmp_path / "r", "--epochs", "1"], capsys)
    one_line_error(code, err, "index.h5", "delete it")


def _rewrite_checkpoint_meta(run: Path, change) -> None:
    tensors, header = read_checkpoint(run)
    change(header["vlmcache"])
    metadata = {key: value for key, value in header.items() if key not in ("path", "vlmcache", SEAL)}
    write_sealed_safetensors(run / "best.safetensors", safetensors.torch.save(
        tensors, metadata={**metadata, "vlmcache": json.dumps(header["vlmcache"])}))


@pytest.mark.parametrize(("change", "command"), [
    (lambda meta: meta.update(text_encoder=["minilm"]), ["search", "{run}", "a never seen query"]),
    (lambda meta: meta["text_encoder"].pop("weights_sha256"), ["classify", "{photo}", "--checkpoint", "{run}",
                                                                "--labels", "a,b"]),
    (lambda meta: meta.update(image_encoders={"name": "x"}), ["classify", "{photo}", "--checkpoint", "{run}",
                                                              "--labels", "a,b"]),
    (lambda meta: meta.update(cache=7), ["eval", "{run}", "--no-baselines"]),
])
def test_checkpoint_metadata_of_the_wrong_shape_is_refused_naming_the_file(copied, capsys, change, command):
    _rewrite_checkpoint_meta(copied["run"], change)
    code, _, err = run_cli([part.format(**copied) for part in command], capsys)
    one_line_error(code, err, "best.safetensors")


def _seal_text_encoder_file(cache: Path, name: str, content: bytes) -> None:
    """Replace a saved text encoder file and record its hash, as if extract had written it so."""
    (cache / name).write_bytes(content)
    record = json.loads((cache / query_encoder.RECORD).read_text())
    record["sha256"][name] = hashlib.sha256(content).hexdigest()
    (cache / query_encoder.RECORD).write_text(json.dumps(record))


@pytest.mark.parametrize(("name", "content", "expected"), [
    (query_encoder.TOKENIZER, b'{"version": "1.0", "model": 5}', "tokenizers"),
    (query_encoder.TOKENIZER, b"[" * 100_000, "tokenizers"),
    (query_encoder.MODEL, b"\x08\x07" + bytes(range(256)), "ONNX Runtime"),
])
def test_files_the_libraries_cannot_load_are_refused_naming_the_file(copied, capsys, name, content, expected):
    _seal_text_encoder_file(copied["cache"], name, content)
    code, _, err = run_cli(["search", copied["run"], "yet another new query"], capsys)
    one_line_error(code, err, name, expected)


@pytest.mark.parametrize(("file", "content", "command"), [
    ("names.json", "[" * 100_000, ["eval", "{run}", "--no-baselines", "--class-names", "{file}"]),
    ("names.json", '{"dog": 3}', ["eval", "{run}", "--no-baselines", "--class-names", "{file}"]),
    ("config.toml", "a = " + "[" * 100_000, ["train", "{cache}", "--config", "{file}"]),
    ("karpathy.json", '{"images": {"a": 1}}', ["extract", "{file}", "--out", "{out}"]),
])
def test_malformed_input_files_give_one_line(copied, tmp_path, capsys, file, content, command):
    (tmp_path / file).write_text(content)
    values = {**copied, "file": tmp_path / file, "out": tmp_path / "out"}
    code, _, err = run_cli([part.format(**values) for part in command], capsys)
    one_line_error(code, err, file)


def test_a_metrics_log_line_of_the_wrong_types_is_skipped_by_plot(copied, tmp_path, capsys):
    log = copied["run"] / "metrics.jsonl"
    record = json.loads(log.read_text().splitlines()[0])
    log.write_text(log.read_text() + json.dumps({**record, "epoch": 2, "logit_scale": "high"}) + "\n")
    pytest.importorskip("matplotlib")
    code, _, err = run_cli(["plot", copied["run"], "--out", tmp_path / "p.png"], capsys)
    assert code == 0, err


# ----------------------------------------------------------------------- 3. caption's numeric options


def test_a_captioner_checkpoint_with_a_config_of_the_wrong_type_is_refused(built, tmp_path, capsys):
    run = Path(shutil.copytree(built["captioner"], tmp_path / "captioner"))
    _rewrite_checkpoint_meta(run, lambda meta: meta["config"].update(epochs="four"))
    code, _, err = run_cli(["caption", built["photo"], "--checkpoint", run], capsys)
    one_line_error(code, err, "best.safetensors", "--epochs")


@pytest.mark.parametrize("beam", ["0", "-3", "65"])
def test_caption_beam_out_of_range_is_one_line_on_every_path(built, capsys, beam):
    for command in (["caption", built["photo"], "--checkpoint", built["captioner"], "--beam", beam],
                    ["caption", "eval", built["captioner"], "--beam", beam]):
        code, _, err = run_cli(command, capsys)
        one_line_error(code, err, f"--beam {beam}")


@pytest.mark.parametrize("option", [("--lr", "nan"), ("--seed", str(10**30)), ("--width", "100000"),
                                    ("--layers", "1000"), ("--prefix-tokens", "0"), ("--epochs", "0"),
                                    ("--batch-size", "-1")])
def test_every_numeric_caption_train_option_is_range_checked_before_any_work(built, tmp_path, capsys, option):
    code, _, err = run_cli(["caption", "train", built["cache"], "--out", tmp_path / "c", *option], capsys)
    one_line_error(code, err, option[0])
    assert not (tmp_path / "c").exists()
