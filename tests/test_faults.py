"""Issue #23 "Trust, round 3": faults from outside — a full disk, and a failure while a progress bar is up.

A full disk is real here: a tmpfs mounted small enough to fill during the step (tests need root, as in CI;
they skip where mounting is not permitted). Every failure must be the promised one: exit code 2, exactly
one line on stderr naming the file, no traceback, no temporaries left, what was written before intact, and
the same command run again after freeing space finishing the job as if nothing had happened.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import torch
from conftest import leftover_temporaries, make_flickr_slice, one_line_error, run_cli
from safetensors.torch import load_file

from vlmcache import extract, open_cache

REPO = Path(__file__).resolve().parents[1]
TIMING = ("seconds", "train_seconds")


class SmallDisk:
    """A tmpfs of a chosen size at `path`: filled by the step under test, then grown ("space freed")."""

    def __init__(self, path: Path):
        self.path = path
        path.mkdir()

    def mount(self, size_kb: int, remount: bool = False) -> None:
        options = f"{'remount,' if remount else ''}size={size_kb}k"
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(self.path)], capture_output=True,
                              text=True)
        if done.returncode:
            pytest.skip(f"needs permission to mount a small tmpfs (as root in CI): {done.stderr.strip()}")

    def grow(self) -> None:
        """Free space, as the user would: here, by making the file system larger."""
        self.mount(64 * 1024, remount=True)

    def fill(self) -> Path:
        """Take every free byte with a file vlmcache did not create (and so must never delete)."""
        filler = self.path / "someone-elses-file"
        with open(filler, "wb", buffering=0) as handle:
            try:
                while True:
                    handle.write(b"\0" * 4096)
            except OSError as error:
                assert error.errno == errno.ENOSPC
        return filler


@pytest.fixture
def disk(tmp_path):
    small = SmallDisk(tmp_path / "disk")
    yield small
    subprocess.run(["umount", "-l", str(small.path)], capture_output=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """6 train + 4 val Flickr8k images, copied: a test that damages one damages only its copy."""
    return make_flickr_slice(tmp_path_factory.mktemp("faults") / "flickr", 6, 4, copy=True)


@pytest.fixture(scope="module")
def models(tiny_models) -> list[str]:
    return ["--image-model", str(tiny_models["vit"]), "--text-model", str(tiny_models["distilbert"]), "--shard-size", "4"]


@pytest.fixture(scope="module")
def cache(data, tiny_models, tmp_path_factory) -> Path:
    """The reference: the same extract on a disk with room (3 image shards, 13 text shards of 4 rows)."""
    out = tmp_path_factory.mktemp("faults-cache") / "cache"
    extract(data, out, shard_size=4, progress=False, image_model=str(tiny_models["vit"]),
            text_model=str(tiny_models["distilbert"]))
    return out


def _shards_read_back(cache_dir: Path) -> None:
    """Every shard a failed run left is whole (h5py reads every dataset, checksums included)."""
    for shard in cache_dir.glob("*/shard-*.h5"):
        with h5py.File(shard, "r") as opened:
            for name in opened:
                opened[name][()]


# ---------------------------------------------------------------------------------------------- disk full


@pytest.mark.parametrize("size_kb", [100, 1000], ids=["among-the-shards", "at-the-query-encoder"])
def test_extract_on_a_full_disk_is_one_line_then_resumes_to_the_same_cache(disk, size_kb, data, models, cache,
                                                                           capsys):
    disk.mount(size_kb)
    out = disk.path / "cache"
    code, _, err = run_cli(["extract", data, "--out", out, *models], capsys)
    one_line_error(code, err, str(out), "No space left on device", "it needs", "run the same command again")
    assert leftover_temporaries(out) == [] and not (out / ".lock").exists()
    _shards_read_back(out)
    kept = sorted(out.glob("*/shard-*.h5"))

    disk.grow()
    code, stdout, err = run_cli(["extract", data, "--out", out, *models], capsys)
    assert code == 0, err
    assert f"{len(kept)} reused" in stdout  # the shards written before the disk filled are kept, not redone
    assert (out / "text-encoder.onnx").read_bytes() == (cache / "text-encoder.onnx").read_bytes()
    shards = sorted(path.relative_to(cache) for path in cache.glob("*/shard-*.h5"))
    assert sorted(path.relative_to(out) for path in out.glob("*/shard-*.h5")) == shards
    assert all((out / name).read_bytes() == (cache / name).read_bytes() for name in shards)  # bit for bit
    assert open_cache(out).manifest["status"] == "complete" and leftover_temporaries(out) == []


def _fill_after_epoch(monkeypatch, epoch: int, disk: SmallDisk) -> None:
    """Make the run machinery fill the disk once epoch `epoch` is booked (both trainings share it): the next
    save hits a full disk."""
    from vlmcache.run.epochs import Run

    real = Run.finish_epoch

    def then_fill(run, record, metrics):
        real(run, record, metrics)
        if record["epoch"] == epoch:
            disk.fill()

    monkeypatch.setattr(Run, "finish_epoch", then_fill)


def _metrics(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{key: value for key, value in json.loads(line).items() if key not in TIMING} for line in lines]


@pytest.mark.parametrize("command", ["train", "caption train"])
def test_training_into_a_disk_that_fills_mid_run_keeps_its_checkpoints_then_resumes(command, disk, cache, tmp_path,
                                                                                     monkeypatch, capsys):
    options = ([*command.split(), cache, "--epochs", "3", "--batch-size", "4"]
               + (["--width", "32", "--layers", "1"] if command == "caption train" else
                  ["--projector", "mlp", "--dim", "16"]))
    disk.mount(16 * 1024)
    run = disk.path / "run"
    with monkeypatch.context() as patched:
        _fill_after_epoch(patched, 1, disk)
        code, _, err = run_cli([*options, "--out", run], capsys)
    one_line_error(code, err, "No space left on device", "it needs")
    assert re.search(rf"{re.escape(str(run))}/(best|last)\.safetensors: cannot write it", err), err
    assert leftover_temporaries(run) == [] and not (run / ".lock").exists()
    assert load_file(str(run / "last.safetensors"))  # whole, and epoch 1's, as metrics.jsonl says
    assert json.loads((run / "last.json").read_text())["epoch"] == 1
    assert [record["epoch"] for record in _metrics(run)] == [1]

    (disk.path / "someone-elses-file").unlink()  # the user frees space
    code, _, err = run_cli([*options, "--out", run, "--resume"], capsys)
    assert code == 0, err
    code, _, err = run_cli([*options, "--out", tmp_path / "straight"], capsys)
    assert code == 0, err
    assert _metrics(run) == _metrics(tmp_path / "straight")
    resumed, straight = (load_file(str(folder / "last.safetensors")) for folder in (run, tmp_path / "straight"))
    assert all(torch.equal(resumed[name], straight[name]) for name in straight if name.startswith("model."))


def test_export_on_a_full_disk_is_one_line_keeps_whole_files_then_resumes(disk, cache, tmp_path, capsys):
    """An export is written beside --out and swapped in whole: a full disk leaves no part of it and no temporary."""
    disk.mount(40)
    out = disk.path / "export"
    code, _, err = run_cli(["export", cache, "--out", out, "--rows-per-file", "2"], capsys)
    one_line_error(code, err, str(out), "No space left on device", "rows needs at least")
    assert not out.exists() and list(disk.path.glob(".export*")) == []

    disk.grow()
    code, _, err = run_cli(["export", cache, "--out", out, "--rows-per-file", "2"], capsys)
    assert code == 0, err
    code, _, err = run_cli(["export", cache, "--out", tmp_path / "reference", "--rows-per-file", "2"], capsys)
    assert code == 0, err
    files = sorted(path.relative_to(out) for path in out.rglob("*") if path.is_file())
    assert files == sorted(path.relative_to(tmp_path / "reference") for path in (tmp_path / "reference").rglob("*")
                           if path.is_file())
    parts = [name for name in files if name.name != "vlmcache-export.json"]  # the manifest records when it was made
    assert all((out / name).read_bytes() == (tmp_path / "reference" / name).read_bytes() for name in parts)


@pytest.mark.parametrize("raised", [
    OSError(errno.ENOSPC, "No space left on device", "runs/x/plot.png"),
    OSError(errno.EDQUOT, "Disk quota exceeded"),
    RuntimeError("Unable to synchronously flush file (file write failed: time = Mon, filename = "
                 "'features/c/texts/.shard-00003.h5.tmp-123', file descriptor = 6, errno = 28, error message = "
                 "'No space left on device', buf = 0x5, total write size = 96)"),
], ids=["oserror", "quota", "h5py-wrapper"])
def test_a_full_disk_anywhere_else_is_still_one_line_naming_the_file(raised, cache, monkeypatch, capsys):
    """The CLI's one error boundary: a disk-full error a library raises outside vlmcache.files."""
    import vlmcache.cache.store
    from vlmcache.files import is_disk_full

    def full(*args, **kwargs):
        raise raised

    monkeypatch.setattr(vlmcache.cache.store, "verify_cache", full)
    assert is_disk_full(raised)
    code, _, err = run_cli(["verify", cache], capsys)
    named = {errno.ENOSPC: "runs/x/plot.png", errno.EDQUOT: "cannot write"}.get(getattr(raised, "errno", None),
                                                                                 "features/c/texts/shard-00003.h5:")
    one_line_error(code, err, named, "run the same command again")


def test_errors_that_are_not_a_full_disk_are_not_taken_for_one():
    from vlmcache.files import DiskFullError, is_disk_full

    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(RuntimeError("Unable to open file (errno = 2, error message = 'No such file')"))
    assert "it needs 1.5 MB" in str(DiskFullError("x.h5", "No space left on device", 1_500_000))


# ---------------------------------------------------------------------------------------------- progress bars


def test_an_extract_failing_mid_way_leaves_one_line_on_stderr_and_no_progress_bar(data, models, tmp_path):
    """stderr a pipe (as in CI or `2>log`): the bar's last frame used to stay above the error line."""
    broken = Path(shutil.copytree(data, tmp_path / "data"))
    victim = sorted((broken / "Images").iterdir())[7]  # the 8th image: the bar is up and has advanced
    victim.write_bytes(victim.read_bytes()[:2000])
    done = subprocess.run([sys.executable, "-m", "vlmcache", "extract", str(broken), "--out", str(tmp_path / "cache"),
                           *models, "--batch-size", "2", "--on-error", "fail"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    one_line_error(done.returncode, done.stderr, victim.name, "--on-error skip")


def test_an_export_failing_on_a_full_disk_leaves_one_line_on_stderr(disk, cache):
    """The same through a real process whose stderr is a pipe: the export's bar must not stay above the error."""
    disk.mount(40)
    done = subprocess.run([sys.executable, "-m", "vlmcache", "export", str(cache), "--out", str(disk.path / "export"),
                           "--rows-per-file", "2"], cwd=REPO, capture_output=True, text=True, timeout=300)
    one_line_error(done.returncode, done.stderr, str(disk.path / "export"), "No space left on device")
