"""`torchrun -m vlmcache extract` on CPU (gloo): same arrays as one process, and resume with another N."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from conftest import make_flickr_slice
from test_extract import REPO, shard_arrays

from vlmcache import extract, open_cache


def torchrun(processes: int, data: Path, out: Path, tiny_models, wait: bool = True) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "vlmcache", "extract", str(data), "--out", str(out), "--image-model", str(tiny_models["vit"]),
               "--text-model", str(tiny_models["distilbert"]), "--shard-size", "2", "--batch-size", "2",
               "--text-batch-size", "2", "--device", "cpu", "--workers", "0"]
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
