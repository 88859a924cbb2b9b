"""`train --stream` / `--max-memory`: exact mid-epoch resume, chunked validation, automatic choice, refusals."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import run_cli, train_killed_at_step
from safetensors.torch import load_file

from vlmcache.align.config import TrainConfig
from vlmcache.align.inputs import evaluate_model
from vlmcache.align.model import initial_model
from vlmcache.align.train import train
from vlmcache.cache.store import open_cache
from vlmcache.cache.stream import BASE_BYTES, embed_split, feature_bytes, in_memory_bytes
from vlmcache.data.synthetic import write_synthetic_cache
from vlmcache.metrics.retrieval import retrieval_metrics
from vlmcache.run.checkpoint import read_checkpoint


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_synthetic_cache(tmp_path_factory.mktemp("train-stream") / "cache", 640, val_images=96,
                                 captions_per_image=(1, 3), dim=16, text_dim=12, shard_size=64)


def test_killed_mid_epoch_then_resumed_equals_uninterrupted(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules["vlmcache.align.train"], "CHECKPOINT_STEPS", 3)
    config = TrainConfig(projector="mlp", epochs=2, batch_size=32, dropout=0.2, stream=True, stream_buffer=128)
    train(cache, tmp_path / "straight", config)
    # epoch 2, step 5 (20 steps per epoch): after the checkpoint at 3
    train_killed_at_step(monkeypatch, 25, cache, tmp_path / "resumed", config)
    saved = read_checkpoint(tmp_path / "resumed" / "last.safetensors")[1]["vlmcache"]
    assert (saved["epoch"], saved["position"]) == (1, 3)  # mid-epoch: epoch 2 at batch 3
    torch.manual_seed(99)  # resume restores every RNG
    result = train(cache, tmp_path / "resumed", config, resume=True)
    assert [r["epoch"] for r in result.history] == [1, 2]
    straight = load_file(str(tmp_path / "straight" / "last.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "last.safetensors"))
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    first = read_checkpoint(tmp_path / "straight" / "last.safetensors")[1]["vlmcache"]["history"]
    assert first[1]["train_loss"] == result.history[1]["train_loss"]  # the epoch's loss kept its resumed part


def test_chunked_validation_equals_in_memory_evaluation(cache):
    opened = open_cache(cache)
    model = initial_model(TrainConfig(projector="linear"), 16, 12)
    expected = evaluate_model(model, opened.split("val"))
    assert retrieval_metrics(*embed_split(model, opened, "val", chunk=17)) == pytest.approx(expected, abs=1e-9)


def test_max_memory_streams_only_when_the_splits_would_not_fit(cache, tmp_path):
    needed = in_memory_bytes(open_cache(cache), ("train", "val"), None, None)
    fits = train(cache, tmp_path / "fits", TrainConfig(projector="linear", epochs=1, max_memory=f"{needed}B"))
    assert read_checkpoint(fits.out)[1]["vlmcache"]["streamed"] is None
    streams = train(cache, tmp_path / "streams", TrainConfig(projector="linear", epochs=1, batch_size=32,
                                                             max_memory=f"{needed - 1}B"))
    per_image = feature_bytes(open_cache(cache), "train", None, None, itemsize=2) / 640  # float16 store
    # The window shrinks to what the budget left after the base cost holds, about four times over.
    assert read_checkpoint(streams.out)[1]["vlmcache"]["streamed"] == {
        "buffer": int((needed - 1 - BASE_BYTES) // (4 * per_image)), "ranks": 1}


def test_cli_stream_and_max_memory_refusals(cache, tmp_path, capsys):
    code, out, err = run_cli(["train", cache, "--out", tmp_path / "run", "--stream", "--epochs", "1",
                              "--batch-size", "32", "--projector", "linear"], capsys)
    assert code == 0, err
    assert read_checkpoint(tmp_path / "run")[1]["vlmcache"]["streamed"] == {"buffer": 65536, "ranks": 1}
    code, out, err = run_cli(["train", cache, "--out", tmp_path / "small", "--max-memory", "1MB"], capsys)
    assert code == 2 and "--max-memory 1MB: too small for one batch of 256 pairs" in err
    assert len(err.strip().splitlines()) == 1
    code, out, err = run_cli(["train", cache, "--out", tmp_path / "bad", "--max-memory", "lots"], capsys)
    assert code == 2 and "--max-memory lots: give a size such as 4GB" in err
    code, out, err = run_cli(["train", cache, "--out", tmp_path / "std", "--stream", "--standardize"], capsys)
    assert code == 2 and "--stream: streaming does not support --standardize" in err
