"""`vlmcache train`: every projector × loss, exact resume, safe checkpoints, refusal of bad caches."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file, save_file

from vlmcache import extract
from vlmcache.align.config import TrainConfig
from vlmcache.align.inputs import evaluate_model
from vlmcache.align.load import load_model
from vlmcache.align.model import initial_model
from vlmcache.align.train import train
from vlmcache.errors import VlmcacheError
from vlmcache.run.checkpoint import read_checkpoint


@pytest.fixture
def tiny_cache(flickr_slice, tmp_path, tiny_models):
    extract(flickr_slice, tmp_path / "cache", image_model=str(tiny_models["vit"]),
            text_model=str(tiny_models["distilbert"]), progress=False)
    return tmp_path / "cache"


@pytest.mark.parametrize("projector", ["linear", "mlp", "ndlinear"])
@pytest.mark.parametrize("loss", ["infonce", "sigmoid"])
def test_every_projector_and_loss_trains_and_checkpoints(tiny_cache, tmp_path, projector, loss):
    result = train(tiny_cache, tmp_path / "run", TrainConfig(projector=projector, loss=loss, epochs=3, batch_size=4))
    recalls = [record["val_mean_recall"] for record in result.history]
    assert len(result.history) == 3 and result.best_epoch == 1 + recalls.index(max(recalls))  # first best epoch
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    assert {"train_loss", "logit_scale", "val_i2t_r1", "val_t2i_r10", "val_mean_recall"} <= set(json.loads(lines[0]))
    model, meta = load_model(tmp_path / "run")
    assert meta["best_epoch"] == result.best_epoch and meta["config"]["projector"] == projector
    assert model.embed_images(torch.zeros(2, 32)).shape == (2, 256)


def test_interrupted_then_resumed_run_ends_with_the_same_weights(tiny_cache, tmp_path):
    config = TrainConfig(projector="mlp", loss="infonce", epochs=4, batch_size=4, dropout=0.2, sampling="caption")
    train(tiny_cache, tmp_path / "straight", config)

    def interrupt_after_second_epoch(record):
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_cache, tmp_path / "resumed", config, on_epoch=interrupt_after_second_epoch)
    torch.manual_seed(1234)  # a different global RNG state must not matter: resume restores it
    result = train(tiny_cache, tmp_path / "resumed", config, resume=True)
    assert [r["epoch"] for r in result.history] == [1, 2, 3, 4]
    straight = load_file(str(tmp_path / "straight" / "last.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "last.safetensors"))
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def test_existing_run_needs_resume_or_overwrite_and_resume_needs_same_config(tiny_cache, tmp_path):
    train(tiny_cache, tmp_path / "run", TrainConfig(epochs=1, batch_size=4))
    with pytest.raises(VlmcacheError, match="already holds a run; pass --resume"):
        train(tiny_cache, tmp_path / "run", TrainConfig(epochs=1, batch_size=4))
    with pytest.raises(VlmcacheError, match="different config"):
        train(tiny_cache, tmp_path / "run", TrainConfig(epochs=2, batch_size=8), resume=True)
    train(tiny_cache, tmp_path / "run", TrainConfig(epochs=1, batch_size=8), overwrite=True)


def test_checkpoints_are_safetensors_and_foreign_files_are_refused(tiny_cache, tmp_path):
    train(tiny_cache, tmp_path / "run", TrainConfig(epochs=1, batch_size=4))
    tensors, header = read_checkpoint(tmp_path / "run" / "last.safetensors")
    assert "rng.torch" in tensors and "optim.0.exp_avg" in tensors and header["vlmcache"]["epoch"] == 1
    (tmp_path / "pickle.safetensors").write_bytes(b"\x80\x04\x95" + b"\x00" * 64)  # a pickle, not safetensors
    with pytest.raises(VlmcacheError, match="not a readable safetensors checkpoint"):
        read_checkpoint(tmp_path / "pickle.safetensors")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(VlmcacheError, match="not a vlmcache checkpoint"):
        read_checkpoint(tmp_path / "other.safetensors")
    with pytest.raises(VlmcacheError, match="no checkpoint here"):
        read_checkpoint(tmp_path / "nothing")


def test_refuses_missing_split_bad_grid_and_other_dataset_text_cache(tiny_cache, tmp_path, tiny_models):
    with pytest.raises(VlmcacheError, match="has no split 'test'"):
        train(tiny_cache, tmp_path / "r1", TrainConfig(val_split="test"))
    with pytest.raises(VlmcacheError, match="do not multiply"):
        train(tiny_cache, tmp_path / "r2", TrainConfig(projector="ndlinear", image_grid=(5, 5)))
    from conftest import make_flickr_slice

    other = make_flickr_slice(tmp_path / "other-data", 3, 3)
    extract(other, tmp_path / "other", image_model=str(tiny_models["vit"]), text_model=str(tiny_models["distilbert"]),
            progress=False)
    with pytest.raises(VlmcacheError, match="built from different datasets"):
        train(tiny_cache, tmp_path / "r3", TrainConfig(epochs=1), text_cache=tmp_path / "other")


def test_cli_train_prints_a_table_and_errors_cleanly(tiny_cache, tmp_path, capsys):
    code, out, err = run_cli(["train", tiny_cache, "--projector", "linear", "--loss", "sigmoid", "--epochs", "2",
                              "--batch-size", "4", "--out", tmp_path / "run"], capsys)
    assert code == 0, err
    flat = " ".join(out.split())  # rich wraps long titles at the 80-column test console
    assert "(validation recall, %)" in flat and "best epoch" in flat and "t→i" in flat
    code, _, err = run_cli(["train", tiny_cache, "--projector", "conv", "--out", tmp_path / "run2"], capsys)
    assert code == 2 and "--projector conv: use one of linear, mlp, ndlinear" in err


def test_training_beats_the_untrained_projector_on_real_features(real_cache, tmp_path):
    config = TrainConfig(projector="linear", loss="infonce", epochs=10, batch_size=128)
    result = train(real_cache, tmp_path / "run", config)
    from vlmcache import open_cache

    untrained = evaluate_model(initial_model(config, 1280, 384), open_cache(real_cache).split("val"))
    assert untrained["mean_recall"] < 12  # 200 val images: chance is a few percent
    assert result.best_metrics["mean_recall"] > untrained["mean_recall"] + 20
