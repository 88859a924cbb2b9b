"""The options every training run shares (projector training and captioner training): the optimiser, its
learning-rate schedule, early stopping, the seed and the splits a run trains and validates on.

Defined once here; TrainConfig (vlmcache.align.config) and CaptionConfig (vlmcache.caption.config) inherit
them, so `TrainConfig(lr=...)`, the CLI options, TOML keys and checkpoint config keys stay flat. Each
subclass validates them with its own ranges, and CaptionConfig keeps its own measured defaults.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class OptimConfig:
    """AdamW, its schedule and the epoch loop's settings (the defaults are projector training's)."""

    epochs: int = 20
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 50  # optimiser steps of linear warm-up
    schedule: str = "cosine"
    grad_clip: float = 1.0
    seed: int = 0
    patience: int | None = None  # stop after this many epochs without a better validation score
    train_split: str = "train"
    val_split: str = "val"
