"""The learning-rate schedule and early stopping, by hand."""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import pytest

from vlmcache.align.config import TrainConfig
from vlmcache.align.load import load_model
from vlmcache.align.train import train
from vlmcache.metrics.retrieval import RETRIEVAL_KEYS
from vlmcache.run.schedule import lr_factor

REPO = Path(__file__).resolve().parents[1]
ablate_module = importlib.import_module("vlmcache.align.ablate")  # `vlmcache.ablate` is the function
train_module = importlib.import_module("vlmcache.align.train")





def test_learning_rate_schedule_values():
    cosine = TrainConfig(warmup=4, schedule="cosine")
    assert [lr_factor(cosine, step, 24) for step in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_factor(cosine, 4 + 10, 24) == pytest.approx(0.5)  # halfway through the 20 cosine steps
    assert lr_factor(cosine, 24, 24) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(cosine, 23, 24) == pytest.approx(0.5 * (1 + math.cos(math.pi * 19 / 20)))
    onecycle = TrainConfig(schedule="onecycle")  # peak at 30% of 20 steps = step 6
    assert [lr_factor(onecycle, step, 20) for step in (0, 3, 6)] == [0.0, 0.5, 1.0]
    assert lr_factor(onecycle, 6 + 7, 20) == pytest.approx(0.5) and lr_factor(onecycle, 20, 20) == pytest.approx(0.0)
    assert {lr_factor(TrainConfig(schedule="constant"), step, 10) for step in range(10)} == {1.0}


def test_training_follows_the_schedule(vit_cache, tmp_path):
    # 6 images, batch 4: 2 steps per epoch, 4 in all. With no warm-up, after epoch 1 (2 steps) the cosine is
    # at its midpoint and after epoch 2 at its end.
    result = train(vit_cache, tmp_path / "run", TrainConfig(projector="linear", epochs=2, batch_size=4, warmup=0,
                                                            lr=0.02))
    assert [record["lr"] for record in result.history] == pytest.approx([0.01, 0.0], abs=1e-12)


@pytest.mark.parametrize(("recalls", "patience", "epochs_run", "best_epoch"), [
    ([10.0] * 10, 3, 4, 1),                      # never improves after epoch 1: stops after patience + 1 epochs
    ([10.0, 20.0, 20.0, 15.0] + [99.0] * 6, 2, 4, 2),  # a tie is not an improvement
    ([10.0, 20.0, 15.0, 30.0, 5.0, 5.0, 5.0] + [99.0] * 3, 2, 6, 4),  # an improvement resets the count
])
def test_patience_stops_after_exactly_n_epochs_without_improvement(vit_cache, tmp_path, monkeypatch, recalls, patience,
                                                                   epochs_run, best_epoch):
    scripted = iter(recalls)

    def evaluate_model(model, split, device="cpu"):
        value = next(scripted)
        return {**{key: value for key in RETRIEVAL_KEYS}, "i2t_median_rank": 1.0, "t2i_median_rank": 1.0}

    monkeypatch.setattr(train_module, "evaluate_model", evaluate_model)
    result = train(vit_cache, tmp_path / "run", TrainConfig(projector="linear", epochs=10, batch_size=4,
                                                            patience=patience))
    assert len(result.history) == epochs_run and result.best_epoch == best_epoch
    assert result.best_metrics["mean_recall"] == recalls[best_epoch - 1]
    assert load_model(tmp_path / "run")[1]["best_epoch"] == best_epoch


