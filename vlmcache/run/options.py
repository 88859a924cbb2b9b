"""The options every training run shares (projector training and captioner training): the optimiser, its
learning-rate schedule, early stopping, the seed, the splits a run trains and validates on, and the experiment
trackers it records to (vlmcache.run.tracking).

Defined once here, each with its type, range and help (vlmcache.options); TrainConfig (vlmcache.align.config)
and CaptionConfig (vlmcache.caption.config) inherit them, so `TrainConfig(lr=...)`, the CLI options, TOML keys
and checkpoint config keys stay flat. CaptionConfig re-declares the five whose measured defaults differ.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlmcache.options import option
from vlmcache.run.tracking import TRACKERS, parse_log

SCHEDULES = ("cosine", "onecycle", "constant")


@dataclass
class OptimConfig:
    """AdamW, its schedule and the epoch loop's settings (the defaults are projector training's)."""

    epochs: int = option(20, "Passes over the training images.", low=1, high=100_000)
    batch_size: int = option(256, "Image–caption pairs per step.", low=2, high=1 << 20)
    lr: float = option(1e-3, "Peak AdamW learning rate.", low=0.0, high=10.0, open_low=True)
    weight_decay: float = option(0.1, "AdamW weight decay.", low=0.0, high=100.0)
    warmup: int = option(50, "Linear warm-up steps (cosine schedule).", low=0, high=1 << 30)
    schedule: str = option("cosine", "cosine | onecycle | constant", choices=SCHEDULES)
    grad_clip: float = option(1.0, "Gradient norm clip.", low=0.0, high=1e6, cli=False)
    seed: int = option(0, "Seed for initialisation, sampling and dropout.", low=-(1 << 63), high=(1 << 63) - 1)
    patience: int | None = option(None, "Stop after N epochs without a better validation score.", low=1,
                                  high=100_000)
    train_split: str = option("train", "Split to train on.")
    val_split: str = option("val", "Split to validate on each epoch.")
    log: str | None = option(None, f"Record the run with {', '.join(TRACKERS)} (any of them, comma-separated): "
                             "per-step loss and lr, per-epoch validation, config, tables, plots. Each is an extra, e.g. "
                             "pip install 'vlmcache[mlflow]'.", parse=parse_log)
    log_uri: str | None = option(None, "MLflow tracking URI: a folder (a local file store) or a server; RUN/mlruns "
                                 "when not given.")
