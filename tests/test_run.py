"""The run machinery shared by projector and captioner training (vlmcache.run), without training a model."""

from __future__ import annotations

import os
from dataclasses import fields

import pytest

from vlmcache.align.config import TrainConfig
from vlmcache.align.train import TrainResult
from vlmcache.caption.config import CaptionConfig
from vlmcache.caption.train import CaptionResult
from vlmcache.errors import VlmcacheError
from vlmcache.run.folder import open_run_folder
from vlmcache.run.loop import LoopState, RunResult
from vlmcache.run.options import OptimConfig

# The loop dict every checkpoint held before LoopState, in its order: the JSON keys must not change.
LEGACY_KEYS = ["epoch", "best_epoch", "best_metrics", "bad_epochs", "history", "stopped_early", "position", "loss_sum"]


def test_loop_state_keeps_the_checkpoint_keys_and_reads_a_captioner_checkpoint_without_a_position():
    assert list(LoopState().to_meta()) == LEGACY_KEYS
    saved = {"epoch": 2, "best_epoch": 1, "best_metrics": {"cider": 3.0}, "bad_epochs": 1, "history": [{}, {}],
             "stopped_early": False, "config": {}}  # a caption run's `last` before LoopState: no position, no loss_sum
    state = LoopState.from_meta(saved)
    assert (state.epoch, state.position, state.loss_sum, state.best_metrics) == (2, 0, 0.0, {"cider": 3.0})
    assert LoopState.from_meta(state.to_meta()) == state


def test_a_tie_is_no_improvement_and_patience_counts_epochs_since_the_best():
    state = LoopState()
    for score, improved in ((1.0, True), (2.0, True), (2.0, False), (1.5, False)):
        state.epoch += 1
        assert state.book({"epoch": state.epoch}, {"s": score}, "s", patience=2) is improved
    assert (state.best_epoch, state.bad_epochs, state.stopped_early, len(state.history)) == (2, 2, True, 4)
    assert state.best_meta() == {"epoch": 4, "best_epoch": 2, "best_metrics": {"s": 2.0}, "history": state.history}


def test_run_folder_refusals_lock_and_stale_temporaries(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(VlmcacheError, match="is a file"), open_run_folder(tmp_path / "file", "train run"):
        pass
    run = tmp_path / "run"
    with open_run_folder(run, "train run") as folder:
        assert folder.writes and not folder.resuming and (run / ".lock").exists()
        with pytest.raises(VlmcacheError, match="another vlmcache train run"), open_run_folder(run, "train run"):
            pass
    (run / "last.safetensors").write_bytes(b"")
    (run / ".best.safetensors.tmp-999999999").write_bytes(b"")  # a killed writer's half file (no such pid)
    with pytest.raises(VlmcacheError, match="already holds a run; pass --resume"), open_run_folder(run, "train run"):
        pass
    assert not (run / ".lock").exists()  # a refusal releases the lock
    with open_run_folder(run, "train run", resume=True) as folder:
        assert folder.resuming and not (run / ".best.safetensors.tmp-999999999").exists()
    with open_run_folder(run, "train run", overwrite=True) as folder:
        assert not folder.resuming
    assert os.listdir(run) == ["last.safetensors"]


def test_both_configs_share_the_optimiser_options_with_flat_keywords_and_their_own_defaults():
    shared = {f.name for f in fields(OptimConfig)}
    assert {"lr", "weight_decay", "epochs", "batch_size", "warmup", "schedule", "patience", "seed"} <= shared
    assert shared <= {f.name for f in fields(TrainConfig)} & {f.name for f in fields(CaptionConfig)}
    assert TrainConfig(lr=0.5).lr == 0.5 and CaptionConfig(lr=0.5, patience=2).patience == 2
    train, caption = TrainConfig(), CaptionConfig()
    assert (train.epochs, train.batch_size, train.lr, train.weight_decay, train.warmup) == (20, 256, 1e-3, 0.1, 50)
    assert (caption.epochs, caption.batch_size, caption.lr, caption.weight_decay, caption.warmup) == (4, 128, 1.5e-3,
                                                                                                      0.01, 200)
    with pytest.raises(VlmcacheError, match="--lr"):
        TrainConfig(lr=0.0)
    with pytest.raises(VlmcacheError, match="--lr 0.0: must be a finite number > 0"):
        CaptionConfig(lr=0.0)


def test_train_and_caption_results_are_run_results_with_the_same_attributes():
    names = ["out", "config", "best_epoch", "best_metrics", "history", "parameters", "seconds"]
    for kind in (RunResult, TrainResult, CaptionResult):
        assert [f.name for f in fields(kind)] == names
    assert issubclass(TrainResult, RunResult) and issubclass(CaptionResult, RunResult)
