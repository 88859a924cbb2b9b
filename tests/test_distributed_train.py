"""Training on several processes (gloo on CPU): global-batch loss and gradients equal one process's, torchrun
end to end, ranks with different caches refused, a dead rank stops the others."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from vlmcache.align.config import TrainConfig
from vlmcache.align.model import initial_model
from vlmcache.data.synthetic import write_synthetic_cache
from vlmcache.distributed import gather, reduce_gradients
from vlmcache.run.checkpoint import read_checkpoint

REPO = Path(__file__).resolve().parents[1]
LOSSES = (("infonce", False), ("sigmoid", False), ("infonce", True))  # (loss, with same-image masking ids)


def free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


def inputs():
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(256, 16, generator=generator), torch.randn(256, 12, generator=generator),
            torch.randint(0, 200, (256,), generator=generator))


def step(loss: str, masked: bool, rows: slice, world: int):
    """(loss, gradients) of one step of an MLP pair on `rows` of the fixed batch, gathered over `world` ranks."""
    images, texts, ids = inputs()
    model = initial_model(TrainConfig(projector="mlp", loss=loss, dropout=0.0), 16, 12)
    value = model.loss(gather(model.project_images(images[rows]), world), gather(model.project_texts(texts[rows]), world),
                       gather(ids[rows], world) if masked else None)
    value.backward()
    reduce_gradients(model, model.loss, world)
    return value.detach(), {name: p.grad for name, p in model.named_parameters()}


def rank_main(rank: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    for loss, masked in LOSSES:
        value, grads = step(loss, masked, slice(128 * rank, 128 * (rank + 1)), 2)
        save_file({"loss": value[None], **grads}, f"{folder}/{loss}-{masked}-{rank}.safetensors")
    dist.destroy_process_group()


def test_two_ranks_of_128_give_the_loss_and_gradients_of_one_process_of_256(tmp_path):
    mp.spawn(rank_main, args=(free_port(), str(tmp_path)), nprocs=2)
    for loss, masked in LOSSES:
        value, grads = step(loss, masked, slice(0, 256), 1)
        for rank in range(2):
            got = load_file(str(tmp_path / f"{loss}-{masked}-{rank}.safetensors"))
            torch.testing.assert_close(got["loss"][0], value, rtol=1e-5, atol=1e-6)
            for name, grad in grads.items():
                torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6, msg=f"{loss} {name}")
        # The test can fail: half the batch alone gives another loss and other gradients.
        half, half_grads = step(loss, masked, slice(0, 128), 1)
        assert not torch.allclose(half, value, rtol=1e-3)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_synthetic_cache(tmp_path_factory.mktemp("dist") / "cache", 2048, val_images=128, dim=16,
                                 text_dim=12, shard_size=128)


def rank_process(rank: int, port: int, cache: Path, out: Path, *extra: str, timeout: str = "60") -> subprocess.Popen:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank),
           "WORLD_SIZE": "2", "VLMCACHE_DIST_TIMEOUT": timeout, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "vlmcache", "train", str(cache), "--out", str(out),
                             "--projector", "linear", "--batch-size", "64", *extra], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_torchrun_trains_and_only_rank_0_writes(cache, tmp_path):
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "vlmcache", "train", str(cache), "--out", str(tmp_path / "run"), "--epochs", "2",
                             "--projector", "linear", "--batch-size", "64"], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    meta = read_checkpoint(tmp_path / "run" / "last.safetensors")[1]["vlmcache"]
    assert meta["streamed"]["ranks"] == 2 and [r["epoch"] for r in meta["history"]] == [1, 2]
    assert meta["history"][1]["val_mean_recall"] > meta["history"][0]["val_mean_recall"] > 5  # learns (chance ≈ 4)
    assert result.stdout.count("best epoch") == 1  # one rank printed
    assert not list((tmp_path / "run").glob(".*tmp-*"))


def test_ranks_with_different_caches_are_refused_before_training(cache, tmp_path):
    other = write_synthetic_cache(tmp_path / "other", 2048, val_images=128, dim=16, text_dim=12, shard_size=128, seed=1)
    port = free_port()
    ranks = [rank_process(0, port, cache, tmp_path / "run"), rank_process(1, port, other, tmp_path / "run")]
    for process in ranks:
        _, err = process.communicate(timeout=120)
        assert process.returncode == 2, err
        assert "ranks 1 see a different cache or options than rank 0" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "last.safetensors").exists()


def test_a_rank_dying_mid_epoch_stops_the_other_with_an_error(cache, tmp_path):
    port = free_port()
    out = tmp_path / "run"
    ranks = [rank_process(r, port, cache, out, "--epochs", "500", timeout="30") for r in range(2)]
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip():
        assert time.time() < deadline and ranks[0].poll() is None, ranks[0].communicate()[1]
        time.sleep(0.2)
    ranks[1].send_signal(signal.SIGKILL)
    started = time.time()
    _, err = ranks[0].communicate(timeout=90)
    assert ranks[0].returncode == 2, err
    assert "another rank stopped or died" in err and "--resume" in err and len(err.strip().splitlines()) == 1
    assert time.time() - started < 60
    ranks[1].wait()
