"""The promises of docs/reliability.md, one test per class of defect found by the hostile passes: nothing lost, nothing
silently wrong, no traceback where a one-line error is promised, and a web page that serves only what it should.

Every CLI failure here is checked the same way: exit code 2, exactly one line on stderr, no 'Traceback'.
Kill tests run the real CLI in a subprocess and send SIGKILL; the rest run the CLI in-process for speed.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import leftover_temporaries, make_flickr_slice, one_line_error, run_cli
from PIL import Image
from safetensors.torch import load_file, save_file

from vlmcache import extract, open_cache
from vlmcache.align.config import TrainConfig
from vlmcache.align.train import train
from vlmcache.cache.store import verify_cache
from vlmcache.data import datasets
from vlmcache.files import SEAL
from vlmcache.metrics.retrieval import retrieval_metrics, zero_shot_metrics

REPO = Path(__file__).resolve().parents[1]
VLMCACHE = [sys.executable, "-m", "vlmcache"]
TIMING = ("seconds", "train_seconds")  # wall-clock fields of a metrics record; everything else is deterministic


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """6 train + 4 val Flickr8k images, copied (not symlinked) so the web page may serve them."""
    return make_flickr_slice(tmp_path_factory.mktemp("trust") / "flickr", 6, 4, copy=True)


@pytest.fixture(scope="module")
def models(tiny_models) -> dict:
    return {"image_model": str(tiny_models["vit"]), "text_model": str(tiny_models["distilbert"])}


@pytest.fixture(scope="module")
def cache(data, models, tmp_path_factory) -> Path:
    """Tiny-encoder cache with 4-row shards: 3 image shards, 13 text shards."""
    out = tmp_path_factory.mktemp("trust-cache") / "cache"
    extract(data, out, shard_size=4, progress=False, **models)
    return out


@pytest.fixture(scope="module")
def run(cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trust-run") / "run"
    train(cache, out, TrainConfig(projector="linear", loss="infonce", epochs=2, batch_size=4))
    return out


@pytest.fixture
def cache_copy(cache, tmp_path) -> Path:
    """A private copy of the cache for tests that damage it."""
    return Path(shutil.copytree(cache, tmp_path / "cache"))


def cache_options(models: dict) -> list[str]:
    return ["--image-model", models["image_model"], "--text-model", models["text_model"], "--shard-size", "4"]


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def metrics_without_timing(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------- data loss


def _pairs_with_photos(folder: Path) -> Path:
    """A CSV dataset whose photos sit in <folder>/images/ — the layout `--overwrite` once wiped."""
    (folder / "images").mkdir(parents=True)
    for index, name in enumerate(("a.png", "b.png", "c.png")):
        Image.new("RGB", (40, 30), (60 * index, 90, 160)).save(folder / "images" / name)
    (folder / "pairs.csv").write_text("image,caption\nimages/a.png,a red box\nimages/b.png,a green box\n"
                                      "images/c.png,a blue box\n")
    return folder / "pairs.csv"


def test_overwrite_never_deletes_a_dataset_or_files_a_cache_did_not_create(tmp_path, models, capsys):
    pairs = _pairs_with_photos(tmp_path / "photos")
    before = sorted(p.name for p in (tmp_path / "photos").rglob("*"))
    code, _, err = run_cli(["extract", pairs, "--out", tmp_path / "photos", "--overwrite", *cache_options(models)], capsys)
    one_line_error(code, err, "--out", "contains the dataset")
    # An --out that is not the dataset's folder but holds someone's files (an images/ folder, notes) is refused too.
    other = tmp_path / "other"
    (other / "images").mkdir(parents=True)
    (other / "images" / "holiday.jpg").write_bytes(b"my photo")
    (other / "notes.txt").write_text("keep me")
    code, _, err = run_cli(["extract", pairs, "--out", other, "--overwrite", *cache_options(models)], capsys)
    one_line_error(code, err, "--out", "not part of a vlmcache cache")
    assert sorted(p.name for p in (tmp_path / "photos").rglob("*")) == before
    assert (other / "images" / "holiday.jpg").read_bytes() == b"my photo" and (other / "notes.txt").exists()


def test_a_second_train_run_on_one_out_is_refused_while_the_first_holds_it(cache, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(["sleep", "60"])  # stands for a live first `vlmcache train` on this folder
    try:
        (out / ".lock").write_text(str(holder.pid))
        code, _, err = run_cli(["train", cache, "--out", out, "--epochs", "1", "--batch-size", "4"], capsys)
        one_line_error(code, err, f"pid {holder.pid}")
        assert not (out / "metrics.jsonl").exists() and not (out / "last.safetensors").exists()
    finally:
        holder.kill()
        holder.wait()
    # Its holder gone (as after a kill -9), the lock is stale: the next run takes it over and releases it.
    code, _, err = run_cli(["train", cache, "--out", out, "--epochs", "1", "--batch-size", "4"], capsys)
    assert code == 0, err
    assert not (out / ".lock").exists()


def test_kill_9_mid_training_then_resume_gives_the_uninterrupted_metrics_and_no_temporaries(cache, tmp_path, capsys):
    options = ["--projector", "mlp", "--dim", "16", "--epochs", "12", "--batch-size", "4"]
    killed = tmp_path / "killed"
    process = subprocess.Popen([*VLMCACHE, "train", str(cache), "--out", str(killed), *options], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = killed / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 2:
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert 2 <= len(log.read_text().splitlines()) < 12, "the kill must land mid-run"
    # The worst kill points: just after a checkpoint's rename (its metrics line never written) and inside
    # a save (a large temporary left behind by the dead process).
    log.write_text("".join(log.read_text().splitlines(keepends=True)[:-1]))
    (killed / f".last.safetensors.tmp-{dead_pid()}").write_bytes(b"\0" * 100_000)

    code, _, err = run_cli(["train", cache, "--out", killed, *options, "--resume"], capsys)
    assert code == 0, err
    straight = tmp_path / "straight"
    config = TrainConfig(projector="mlp", dim=16, epochs=12, batch_size=4)
    train(cache, straight, config)
    assert metrics_without_timing(log) == metrics_without_timing(straight / "metrics.jsonl")
    assert [r["epoch"] for r in metrics_without_timing(log)] == list(range(1, 13))
    assert leftover_temporaries(killed) == [] and not (killed / ".lock").exists()


def test_a_truncated_metrics_line_does_not_crash_plot(run, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    copy = Path(shutil.copytree(run, tmp_path / "run"))
    lines = (copy / "metrics.jsonl").read_text()
    (copy / "metrics.jsonl").write_text(lines + lines.splitlines()[-1][:37])  # a kill mid-append
    code, out, err = run_cli(["plot", copy], capsys)
    assert code == 0, err
    assert (copy / "training.png").stat().st_size > 1000


def _children(pid: int) -> list[int]:
    """Pids of every live descendant of `pid`, from /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent:
                found.append(child)
                frontier.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has exited; it only waits to be reaped


@pytest.mark.skipif(sys.platform != "linux", reason="workers die with their parent through Linux's PR_SET_PDEATHSIG")
def test_kill_9_of_ablate_leaves_no_worker_behind(cache, tmp_path):
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    process = subprocess.Popen([*VLMCACHE, "ablate", str(cache), "--out", str(tmp_path / "ab"), "--jobs", "2",
                                "--projectors", "linear", "--losses", "infonce,sigmoid", "--seeds", "0",
                                "--epochs", "100000", "--batch-size", "4", "--no-baselines"],
                               cwd=REPO, env={**os.environ, "TMPDIR": str(temporary)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while len(list(temporary.glob("vlmcache-cell-*"))) < 2 and time.time() < deadline and process.poll() is None:
            time.sleep(0.05)
        assert len(list(temporary.glob("vlmcache-cell-*"))) == 2, "both workers must be training a cell"
        workers = _children(process.pid)
        assert len(workers) >= 2
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    deadline = time.time() + 10
    while any(_alive(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.1)
    left = [pid for pid in workers if _alive(pid)]
    for pid in left:  # do not leave them to slow the rest of the suite
        os.kill(pid, signal.SIGKILL)
    assert left == [], "worker processes outlived a kill -9 of ablate"


@pytest.mark.skipif(sys.platform != "linux", reason="PR_GET_PDEATHSIG is Linux's")
def test_ablate_in_this_process_does_not_tie_the_caller_to_its_parent(cache, tmp_path):
    import ctypes

    from vlmcache.align.ablate import ablate

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    signal_number = ctypes.c_int(-1)
    libc.prctl(1, 0)  # PR_SET_PDEATHSIG 0: start clean
    ablate([cache], tmp_path / "ab", projectors=("linear",), losses=("infonce",), seeds=(0,), epochs=1, jobs=1,
           with_baselines=False, base_config={"batch_size": 4}, progress=False)
    libc.prctl(2, ctypes.byref(signal_number))  # PR_GET_PDEATHSIG
    libc.prctl(1, 0)
    assert signal_number.value == 0, "jobs=1 armed the workers' death signal on the calling process"


# ---------------------------------------------------------------------------------------- silently wrong


def test_nan_features_in_a_shard_stop_training_with_one_line(cache_copy, tmp_path, capsys):
    with h5py.File(cache_copy / "images" / "shard-00000.h5", "r+") as shard:  # rewritten with a valid checksum
        features = shard["features"][()]
        features[1, 3] = np.nan
        shard["features"][...] = features
    code, _, err = run_cli(["train", cache_copy, "--out", tmp_path / "run", "--epochs", "1", "--batch-size", "4"], capsys)
    one_line_error(code, err, "NaN or infinite image features")
    assert not (tmp_path / "run" / "best.safetensors").exists()


@pytest.mark.parametrize("option", [("--lr", "inf"), ("--lr", "nan"), ("--weight-decay", "nan"), ("--lr", "-1")])
def test_non_finite_learning_rates_are_refused(cache, tmp_path, capsys, option):
    code, _, err = run_cli(["train", cache, "--out", tmp_path / "run", "--epochs", "1", *option], capsys)
    one_line_error(code, err, option[0])
    assert not (tmp_path / "run" / "best.safetensors").exists()


def test_nan_embeddings_rank_worst_not_first():
    # 12 images with one caption each. Every similarity is NaN, so every correct item counts as tied with
    # (hence ranked below) all 11 others: rank 12 both ways, recall 0 at 1, 5 and 10.
    captions = np.arange(12)
    nan_images = torch.full((12, 8), float("nan"))
    texts = torch.randn(12, 8)
    metrics = retrieval_metrics(nan_images, texts, captions)
    assert metrics["mean_recall"] == 0.0
    assert metrics["i2t_median_rank"] == 12 and metrics["t2i_median_rank"] == 12
    inf_texts = torch.full((12, 8), float("inf"))
    assert retrieval_metrics(texts, inf_texts, captions)["mean_recall"] == 0.0
    # Zero-shot: a NaN image cannot be right.
    classes = ["a", "b", "c", "d", "e"]
    result = zero_shot_metrics(torch.full((5, 8), float("nan")), torch.arange(5), torch.eye(5, 8), classes)
    assert result["top1"] == 0.0 and result["top5"] == 100.0  # rank 5 of 5 classes: in the top 5, never top 1


def test_nan_weights_in_a_checkpoint_are_refused(run, tmp_path, capsys):
    tensors = load_file(str(run / "best.safetensors"))
    from safetensors import safe_open

    with safe_open(str(run / "best.safetensors"), "pt") as handle:
        header = unsealed(handle.metadata())
    name = next(n for n in tensors if n.startswith("model.") and tensors[n].dim() == 2)
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(tmp_path / "nan.safetensors"), metadata=header)
    code, _, err = run_cli(["eval", tmp_path / "nan.safetensors", "--no-baselines"], capsys)
    one_line_error(code, err, "NaN or infinite weights")


def unsealed(header: dict) -> dict:
    """A checkpoint's metadata without its content hash: a crafted file is written by hand, not sealed by vlmcache
    (a sealed one whose tensors were changed is refused before its metadata is read: tests/test_integrity.py)."""
    return {key: value for key, value in header.items() if key != SEAL}


def _flip_feature_byte(shard_path: Path) -> None:
    with h5py.File(shard_path, "r") as shard:
        chunk = shard["features"].id.get_chunk_info(0)
    with open(shard_path, "r+b") as handle:
        handle.seek(chunk.byte_offset + chunk.size // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))


def test_flipped_bytes_in_shard_features_fail_the_read_and_verify_names_the_shard(cache_copy, tmp_path, capsys):
    code, out, err = run_cli(["verify", cache_copy], capsys)
    assert code == 0 and "ok" in out, err
    _flip_feature_byte(cache_copy / "images" / "shard-00001.h5")
    code, _, err = run_cli(["train", cache_copy, "--out", tmp_path / "run", "--epochs", "1", "--batch-size", "4"], capsys)
    one_line_error(code, err, "images/shard-00001.h5")
    code, out, err = run_cli(["verify", cache_copy], capsys)
    one_line_error(code, err, "shard-00001.h5")
    assert [Path(shard).name for shard, _ in verify_cache(cache_copy)] == ["shard-00001.h5"]
    assert "shard-00001.h5" in out  # the table lists each bad shard


def test_a_shard_copied_over_another_is_refused(cache_copy, capsys):
    images = cache_copy / "images"
    shutil.copyfile(images / "shard-00000.h5", images / "shard-00001.h5")
    code, _, err = run_cli(["info", cache_copy], capsys)
    one_line_error(code, err, "shard-00001.h5")
    code, _, err = run_cli(["verify", cache_copy], capsys)
    one_line_error(code, err, "shard-00001.h5")
    problems = verify_cache(cache_copy)
    assert [Path(shard).name for shard, _ in problems] == ["shard-00001.h5"]


@pytest.mark.parametrize("option", [("--mlp-layers", "0"), ("--mlp-layers", "1"), ("--mlp-hidden", "0"),
                                    ("--dim", "0"), ("--epochs", "0"), ("--batch-size", "1"), ("--dropout", "1.5")])
def test_train_options_out_of_range_are_refused(cache, tmp_path, capsys, option):
    code, _, err = run_cli(["train", cache, "--out", tmp_path / "run", *option], capsys)
    one_line_error(code, err, option[0])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("option", [("--projector", "mlp", "--dim", "65536"), ("--seed", str(10**24)),
                                    ("--projector", "mlp", "--mlp-hidden", "60000", "--mlp-layers", "64")])
def test_models_too_big_to_allocate_and_seeds_torch_cannot_take_are_refused_first(cache, tmp_path, capsys, option):
    # --dim 65536 makes a 65,536² hidden layer per projector (34 GB): refused after counting on the meta device.
    code, _, err = run_cli(["train", cache, "--out", tmp_path / "run", "--epochs", "1", *option], capsys)
    one_line_error(code, err, "--dim/--mlp-hidden" if "--seed" not in option else "--seed")
    assert not (tmp_path / "run" / "last.safetensors").exists()


@pytest.mark.parametrize("option", [("--max-length", "0"), ("--max-length", "-1"), ("--workers", "1000"),
                                    ("--workers", "-1"), ("--shard-size", "0"), ("--batch-size", "-3"), ("--limit", "0")])
def test_extract_options_out_of_range_are_refused(data, models, tmp_path, capsys, option):
    code, _, err = run_cli(["extract", data, "--out", tmp_path / "cache", *cache_options(models), *option], capsys)
    one_line_error(code, err, option[0])
    assert not (tmp_path / "cache").exists()


def test_one_image_in_two_splits_is_refused_and_dot_slash_names_are_one_image(tmp_path, models, capsys):
    folder = tmp_path / "d"
    folder.mkdir()
    Image.new("RGB", (40, 30), (200, 90, 160)).save(folder / "a.png")
    Image.new("RGB", (40, 30), (20, 90, 160)).save(folder / "b.png")
    (folder / "twice.csv").write_text("image,caption,split\na.png,a pink box,train\nb.png,a blue box,train\n"
                                      "a.png,a pink square,val\n")
    code, _, err = run_cli(["extract", folder / "twice.csv", "--out", tmp_path / "c", *cache_options(models)], capsys)
    one_line_error(code, err, "a.png", "'val'", "'train'")
    (folder / "dots.csv").write_text("image,caption\n./a.png,a pink box\na.png,a pink square\nb.png,a blue box\n")
    dataset = datasets.load_dataset(folder / "dots.csv")
    assert dataset.num_images == 2 and dataset.num_captions == 3
    assert dataset.caption_image.tolist().count(dataset.caption_image[0]) == 2  # both captions on one image row


def test_zero_shot_top5_is_none_with_fewer_than_five_classes():
    # Image i lies on class i's prompt: all right at top-1. Top-5 of 3 classes would be 100 for any model.
    three = zero_shot_metrics(torch.eye(3, 4), torch.arange(3), torch.eye(3, 4), ["a", "b", "c"])
    assert three["top1"] == 100.0 and three["top5"] is None
    # With 6 classes and every image nearest the NEXT class, the true one ranks 2nd: top-1 0, top-5 100.
    rolled = torch.roll(torch.eye(6), 1, dims=0)
    six = zero_shot_metrics(rolled + 0.5 * torch.eye(6), torch.arange(6), torch.eye(6), list("abcdef"))
    assert six["top1"] == 0.0 and six["top5"] == 100.0


# ------------------------------------------------------------------------------ one line, not a traceback


def test_damaged_cache_files_give_one_line(cache_copy, capsys):
    shard = cache_copy / "texts" / "shard-00002.h5"
    shard.write_bytes(shard.read_bytes()[:300])  # truncated
    code, _, err = run_cli(["info", cache_copy], capsys)
    one_line_error(code, err, "shard-00002.h5")
    (cache_copy / "manifest.json").write_text('{"format_version": 1, "status": "comp')
    code, _, err = run_cli(["info", cache_copy], capsys)
    one_line_error(code, err, "manifest.json")
    (cache_copy / "manifest.json").write_text('["a list, not an object"]')
    code, _, err = run_cli(["info", cache_copy], capsys)
    one_line_error(code, err, "manifest.json")


def test_missing_index_gives_one_line_and_extract_repairs_it(cache_copy, data, models, tmp_path, capsys):
    (cache_copy / "index.h5").unlink()
    code, _, err = run_cli(["info", cache_copy], capsys)
    one_line_error(code, err, "index.h5")
    code, _, err = run_cli(["train", cache_copy, "--out", tmp_path / "run", "--epochs", "1"], capsys)
    one_line_error(code, err, "index.h5")
    code, _, err = run_cli(["extract", data, "--out", cache_copy, *cache_options(models)], capsys)
    assert code == 0, err
    assert len(open_cache(cache_copy).split("train").image_ids) == 6


def test_nul_in_a_caption_gives_one_line_and_leaves_no_lock_or_temporary(tmp_path, models, capsys):
    folder = tmp_path / "d"
    folder.mkdir()
    Image.new("RGB", (40, 30), (200, 90, 160)).save(folder / "a.png")
    Image.new("RGB", (40, 30), (20, 90, 160)).save(folder / "b.png")
    (folder / "pairs.jsonl").write_text(json.dumps({"image": "a.png", "caption": "a pink\u0000box"}) + "\n" +
                                        json.dumps({"image": "b.png", "caption": "a blue box"}) + "\n")
    out = tmp_path / "c"
    code, _, err = run_cli(["extract", folder / "pairs.jsonl", "--out", out, *cache_options(models)], capsys)
    one_line_error(code, err, "NUL", "a.png")
    assert not out.exists() or (not (out / ".lock").exists() and leftover_temporaries(out) == [])


def test_eval_json_output_that_cannot_be_written_fails_before_the_work(run, tmp_path, capsys, monkeypatch):
    import vlmcache.eval.evaluate

    called = []
    monkeypatch.setattr(vlmcache.eval.evaluate, "evaluate_checkpoint", lambda *a, **k: called.append(a))
    (tmp_path / "a-file").write_text("x")
    for target in (tmp_path / "no-such-folder" / "r.json", tmp_path / "a-file" / "r.json", tmp_path):
        code, _, err = run_cli(["eval", run, "--json", target], capsys)
        one_line_error(code, err, "--json")
    assert called == []


def test_bad_options_and_files_of_classify_search_train_extract_give_one_line(run, cache, data, models, tmp_path, capsys):
    image = next((data / "Images").iterdir())
    (tmp_path / "labels.txt").write_bytes(b"a dog\n\xff\xfe a cat\n")
    cases = [
        (["train", cache, "--out", tmp_path / "r", "--device", "tpu"], "--device tpu"),
        (["extract", data, "--out", tmp_path / "c", *cache_options(models), "--device", "tpu"], "--device tpu"),
        (["classify", image, "--checkpoint", run, "--labels", "a,b", "--template", "a photo"], "--template"),
        (["classify", image, "--checkpoint", run, "--labels", "a,b", "--template", "a {} of {}"], "--template"),
        (["classify", image, "--checkpoint", run, "--labels-file", tmp_path / "labels.txt"], "UTF-8"),
        (["search", run, "a dog", "--top", "-5"], "--top"),
        (["search", run, "a dog", "--split", "nope"], "nope"),
        (["ablate", cache, "--seeds", "", "--out", tmp_path / "ab"], "--seeds"),  # an empty grid
        (["info", tmp_path / "[/x]"], "[/x]"),  # rich markup in a path is printed, not parsed
        (["info", tmp_path / "a\nb"], "a\\nb"),  # a newline in a value stays on the one line
    ]
    for args, expected in cases:
        code, _, err = run_cli(args, capsys)
        one_line_error(code, err, expected)


def _rewrite_checkpoint(source: Path, target: Path, change) -> Path:
    from safetensors import safe_open

    tensors = load_file(str(source))
    with safe_open(str(source), "pt") as handle:
        header = unsealed(handle.metadata())
    meta = json.loads(header["vlmcache"])
    change(meta)
    save_file(tensors, str(target), metadata={**header, "vlmcache": json.dumps(meta)})
    return target


def test_checkpoints_whose_metadata_lies_give_one_line(run, tmp_path, capsys):
    best = run / "best.safetensors"

    def smaller_dim(meta):
        meta["config"]["dim"] = 128  # the tensors are 256 wide

    def huge_features(meta):
        meta["image_dim"] = 1 << 40

    def huge_width(meta):
        meta["config"]["dim"] = 60_000  # allowed width, but not what the tensors hold: never allocated

    for change, expected in ((smaller_dim, "disagrees with its tensors"), (huge_features, "asks for"),
                             (huge_width, "disagrees with its tensors")):
        crafted = _rewrite_checkpoint(best, tmp_path / f"{change.__name__}.safetensors", change)
        for command in (["eval", crafted, "--no-baselines"], ["search", crafted, "a dog"]):
            code, _, err = run_cli(command, capsys)
            one_line_error(code, err, expected)


# -------------------------------------------------------------------------------------------- the web page


@pytest.fixture(scope="module")
def client(run):
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from vlmcache.app.serve import create_app

    return TestClient(create_app(run))


def test_web_serves_images_only_from_the_dataset_not_a_swapped_symlink(client, cache):
    recorded = Path(open_cache(cache).split("val").image_paths[0])
    reply = client.get("/image/0")
    assert reply.status_code == 200 and reply.headers["content-type"] == "image/jpeg"
    original = recorded.read_bytes()
    try:
        recorded.unlink()
        recorded.symlink_to("/etc/passwd")
        reply = client.get("/image/0")
        assert reply.status_code == 404 and "root:" not in reply.text
        recorded.unlink()
        recorded.write_text("root:x:0:0:root:/root:/bin/bash\n")  # a regular file in place, but not an image
        assert client.get("/image/0").status_code == 404
    finally:
        recorded.unlink(missing_ok=True)
        recorded.write_bytes(original)
    assert client.get("/image/0").status_code == 200


def test_web_page_escapes_the_checkpoint_path_and_search_shows_no_server_paths(run, client, data, tmp_path):
    from starlette.testclient import TestClient

    from vlmcache.app.serve import create_app

    hostile = Path(shutil.copytree(run, tmp_path / "run<script>alert(1)<"))
    page = TestClient(create_app(hostile)).get("/").text
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)" in page
    reply = client.get("/search", params={"q": "a dog", "top": 3})
    assert reply.status_code == 200 and len(reply.json()["hits"]) == 3
    assert str(data) not in reply.text and str(Path.home()) not in reply.text and '"/' not in reply.text


def test_web_refuses_a_huge_chunked_upload_without_reading_it_all(client):
    from vlmcache.app.serve import MAX_UPLOAD_BYTES

    offered, chunk = 50 * 1024 * 1024, 64 * 1024
    head = (b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="big.jpg"\r\n'
            b"Content-Type: image/jpeg\r\n\r\n\xff\xd8")
    read = 0
    messages = []

    async def receive():
        nonlocal read
        body = head if read == 0 else b"0" * chunk
        read += len(body)
        return {"type": "http.request", "body": body, "more_body": read < offered}

    async def send(message):
        messages.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/classify", "raw_path": b"/classify", "root_path": "", "query_string": b"",
             "headers": [(b"content-type", b"multipart/form-data; boundary=xyz"), (b"transfer-encoding", b"chunked")],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}
    asyncio.run(client.app(scope, receive, send))
    start = next(m for m in messages if m["type"] == "http.response.start")
    assert start["status"] == 413
    assert read <= MAX_UPLOAD_BYTES + 64 * 1024 + 2 * chunk, f"read {read:,} of {offered:,} bytes before refusing"


def test_web_bounds_the_labels_of_one_request(client, data):
    photo = next((data / "Images").iterdir()).read_bytes()
    labels = ", ".join(f"label {n}" for n in range(101))
    reply = client.post("/classify", files={"image": ("p.jpg", photo, "image/jpeg")}, data={"labels": labels})
    assert reply.status_code == 400 and "at most 100" in reply.json()["error"]
    reply = client.post("/classify", files={"image": ("p.jpg", photo, "image/jpeg")}, data={"labels": "a dog, a cat"})
    assert reply.status_code == 200 and len(reply.json()["rows"]) == 2
