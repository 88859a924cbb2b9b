"""The learning-rate schedule shared by projector training and captioner training."""

from __future__ import annotations

import math

from vlmcache.run.options import OptimConfig


def lr_factor(config: OptimConfig, step: int, total_steps: int) -> float:
    """The learning-rate multiplier at optimiser step `step` (0-based) of `total_steps`: `config.schedule` is
    "cosine" (`config.warmup` steps of linear warm-up, then cosine to 0), "onecycle" or "constant"."""
    if config.schedule == "constant":
        return 1.0
    if config.schedule == "onecycle":  # linear up over the first 30%, cosine down to 0
        peak = max(1, int(0.3 * total_steps))
        return step / peak if step < peak else 0.5 * (1 + math.cos(math.pi * (step - peak) / max(1, total_steps - peak)))
    if step < config.warmup:
        return (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, total_steps - config.warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

