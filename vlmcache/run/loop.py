"""A training run's loop in memory: where it is (LoopState, saved in every checkpoint under the JSON keys it
always had), the optimiser step (Optimisation) and what a finished run returns (RunResult).

No files here: vlmcache.run.folder reads and writes them, vlmcache.run.epochs runs the epochs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from vlmcache.run.options import OptimConfig
from vlmcache.run.schedule import lr_factor

# What every `last` checkpoint holds; `position` and `loss_sum` are optional (see LoopState.from_meta).
LOOP_KEYS = ("epoch", "best_epoch", "best_metrics", "bad_epochs", "history", "stopped_early")
BEST_KEYS = ("epoch", "best_epoch", "best_metrics", "history")  # what a `best` checkpoint tells of its run


@dataclass
class LoopState:
    """Where a run is. `last` checkpoints hold all of it, so a resumed run continues from there."""

    epoch: int = 0  # epochs finished
    best_epoch: int = 0  # 0 until an epoch has been validated
    best_metrics: dict = field(default_factory=dict)
    bad_epochs: int = 0  # epochs since the best one, towards `patience`
    history: list[dict] = field(default_factory=list)  # one record per finished epoch (metrics.jsonl)
    stopped_early: bool = False
    position: int = 0  # optimiser steps done in the running epoch (a streamed run saves `last` mid-epoch)
    loss_sum: float = 0.0  # their summed training loss

    @classmethod
    def from_meta(cls, saved: dict) -> LoopState:
        """The state in a checkpoint's metadata. `position` and `loss_sum` default to an epoch boundary: the
        `last` checkpoints of captioner runs before this class did not hold them."""
        return cls(**{key: saved[key] for key in LOOP_KEYS}, position=saved.get("position", 0),
                   loss_sum=saved.get("loss_sum", 0.0))

    def to_meta(self) -> dict:
        """All of the state as checkpoint metadata (a `last` checkpoint)."""
        return asdict(self)

    def best_meta(self) -> dict:
        """The part a `best` checkpoint holds (no resume position: `best` is for using the model)."""
        return {key: getattr(self, key) for key in BEST_KEYS}

    def running(self, epochs: int) -> bool:
        """Whether another epoch is due."""
        return self.epoch < epochs and not self.stopped_early

    def add_step(self, loss: float) -> None:
        """Count one optimiser step of the running epoch and its loss."""
        self.position, self.loss_sum = self.position + 1, self.loss_sum + loss

    def close_epoch(self) -> float:
        """Count the running epoch as finished; returns its mean training loss."""
        mean = self.loss_sum / max(1, self.position)
        self.epoch, self.position, self.loss_sum = self.epoch + 1, 0, 0.0
        return mean

    def book(self, record: dict, metrics: dict, score: str, patience: int | None) -> bool:
        """Add a finished epoch's record to the history; True when `metrics[score]` beat the best so far (a tie
        does not), else one more epoch towards `patience` (None: never stop early)."""
        self.history.append(record)
        if metrics[score] > self.best_metrics.get(score, -1.0):
            self.best_epoch, self.best_metrics, self.bad_epochs = self.epoch, metrics, 0
            return True
        self.bad_epochs += 1
        self.stopped_early = patience is not None and self.bad_epochs >= patience
        return False


@dataclass
class Optimisation:
    """AdamW over a run's weights with its learning-rate schedule, and the generator that orders its batches:
    with the weights, what a `last` checkpoint restores so a resumed run continues exactly."""

    model: nn.Module  # the weights checkpoints hold (of a captioner: its trainable parts)
    optimizer: torch.optim.AdamW
    scheduler: torch.optim.lr_scheduler.LambdaLR
    generator: torch.Generator
    grad_clip: float  # 0: no clipping

    @classmethod
    def start(cls, config: OptimConfig, model: nn.Module, total_steps: int, generator: torch.Generator,
              parameters: Iterable[nn.Parameter] | None = None) -> Optimisation:
        """AdamW at `config.lr` over `parameters` (default: all of `model`'s), scheduled over `total_steps`."""
        optimizer = torch.optim.AdamW(model.parameters() if parameters is None else parameters, lr=config.lr,
                                      weight_decay=config.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(config, step, total_steps))
        return cls(model, optimizer, scheduler, generator, config.grad_clip)

    @property
    def lr(self) -> float:
        """The learning rate the next step takes."""
        return self.optimizer.param_groups[0]["lr"]

    @property
    def steps(self) -> int:
        """Optimiser steps taken over the whole run (the scheduler's count, restored on resume)."""
        return self.scheduler.last_epoch

    def step(self, loss: torch.Tensor, after_backward: Callable[[], None] | None = None) -> None:
        """One optimiser step on `loss`. `after_backward` runs before clipping (torchrun's gradient all-reduce:
        the clip must see the global gradient)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if after_backward is not None:
            after_backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()


@dataclass
class RunResult:
    """A finished (or early-stopped) run: where it is, its config, its best epoch and metrics, its history."""

    out: Path
    config: OptimConfig
    best_epoch: int
    best_metrics: dict
    history: list[dict] = field(default_factory=list)
    parameters: int = 0  # trained parameters
    seconds: float = 0.0
