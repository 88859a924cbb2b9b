"""`torchrun -m vlmcache extract` on CPU (gloo): same arrays as one process, resume with another N, and a rank
that stops ends the others with one line instead of a wait."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from conftest import make_flickr_slice
from test_distributed_train import free_port
from test_extract import REPO, shard_arrays

from vlmcache import extract, open_cache
from vlmcache.data.datasets import load_dataset


def extract_command(data: Path, out: Path, tiny_models) -> list[str]:
    """`vlmcache extract` of `data` into `out` with the tiny models, two rows a shard, on the CPU."""
    return ["-m", "vlmcache", "extract", str(data), "--out", str(out), "--image-model", str(tiny_models["vit"]),
            "--text-model", str(tiny_models["distilbert"]), "--shard-size", "2", "--batch-size", "2",
            "--text-batch-size", "2", "--device", "cpu", "--workers", "0"]


def torchrun(processes: int, data: Path, out: Path, tiny_models, wait: bool = True) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               *extract_command(data, out, tiny_models)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    if wait:
        output = process.communicate(timeout=300)[0].decode()
        assert process.returncode == 0, output
    return process


def test_two_ranks_write_the_same_cache_as_one_process(tmp_path, tiny_models):
    data = make_flickr_slice(tmp_path / "flickr", 6, 4)
    torchrun(2, data, tmp_path / "dist", tiny_models)
    extract(data, tmp_path / "single", image_model=str(tiny_models["vit"]), text_model=str(tiny_models["distilbert"]),
            shard_size=2, batch_size=2, text_batch_size=2, workers=0, progress=False)
    assert open_cache(tmp_path / "dist").manifest["status"] == "complete"
    for modality in ("images", "texts"):
        assert np.array_equal(shard_arrays(tmp_path / "dist", modality), shard_arrays(tmp_path / "single", modality))


def test_killed_ranks_then_rerun_with_other_world_size_resumes(tmp_path, tiny_models):
    data = make_flickr_slice(tmp_path / "flickr", 12, 12)
    out = tmp_path / "dist"
    process = torchrun(2, data, out, tiny_models, wait=False)
    deadline = time.time() + 180
    while len(list(out.glob("*/shard-*.h5"))) < 3 and time.time() < deadline:
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)  # the launcher and both ranks
    process.wait()
    written = len(list(out.glob("*/shard-*.h5")))
    assert 3 <= written < 12 + 60
    torchrun(3, data, out, tiny_models)
    extract(data, tmp_path / "single", image_model=str(tiny_models["vit"]), text_model=str(tiny_models["distilbert"]),
            shard_size=2, batch_size=2, text_batch_size=2, workers=0, progress=False)
    for modality in ("images", "texts"):
        assert np.array_equal(shard_arrays(out, modality), shard_arrays(tmp_path / "single", modality))
    assert not list(out.glob("*/.shard-*"))


def test_a_rank_that_fails_stops_the_other_with_one_line(tmp_path, tiny_models):
    """Rank 1 refuses an unreadable image of its shard; rank 0 does not wait for it at the end but stops too.
    (Ranks are started by hand: torchrun would kill rank 0 itself as soon as rank 1 failed.)"""
    data = make_flickr_slice(tmp_path / "flickr", 6, 4)
    # Image row 2 is in image shard 1 (rows 2-3): rank 1's. The dataset names the shared file the slice links
    # to; only the link in the slice is replaced, never the shared data.
    broken = data / "Images" / Path(load_dataset(data).image_paths[2]).name
    assert broken.is_symlink()
    broken.unlink()
    broken.write_bytes(b"not an image")
    port = free_port()
    ranks = [subprocess.Popen([sys.executable, *extract_command(data, tmp_path / "cache", tiny_models)], cwd=REPO,
                              env={**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                                   "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "VLMCACHE_DIST_TIMEOUT": "60",
                                   "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    outputs = [process.communicate(timeout=240)[1] for process in ranks]
    assert [process.returncode for process in ranks] == [2, 2], outputs
    errors = [output.strip().splitlines()[-1] for output in outputs]  # rank 0 draws progress bars above its error
    assert f"{broken.name}: not an image file" in errors[1] and "--on-error skip" in errors[1]
    assert "rank 0: waiting for every rank's shards failed, another rank stopped or died" in errors[0]
    assert "shards already written are kept" in errors[0] and "run the same extract again" in errors[0]
    assert not any("Traceback" in output for output in outputs), outputs
    assert (tmp_path / "cache" / "images" / "shard-00000.h5").exists()  # rank 0's own shards are whole on disk
