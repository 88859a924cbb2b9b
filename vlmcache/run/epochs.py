"""The epoch loop every training run shares: optimiser steps, then validation, then the books (history,
`best` by one validation score, early stopping), checkpoints and metrics log, and what the run's trackers
record (vlmcache.run.tracking: each step's loss and lr, each epoch's record, then the best metrics and the run's
files). What differs between runs (how an epoch's batches make a loss, how a model is validated) comes in as
functions.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from vlmcache.run.folder import RunFolder
from vlmcache.run.loop import LoopState, Optimisation, RunResult
from vlmcache.run.options import OptimConfig
from vlmcache.run.tracking import Tracker, Trackers, Tracking, numbers, run_files, run_params, tracked

Result = TypeVar("Result", bound=RunResult)


@dataclass
class Run:
    """A run in progress: its folder, its optimiser, where it is, and what picks its best epoch."""

    folder: RunFolder
    optimisation: Optimisation
    state: LoopState
    score: str  # the validation metric that picks `best` (higher is better)
    patience: int | None = None  # epochs without a better score that stop the run (None: never)
    tracker: Tracker = field(default_factory=Trackers)  # set by run_epochs; records nothing without --log

    @classmethod
    def start(cls, folder: RunFolder, meta: dict, optimisation: Optimisation, score: str,
              patience: int | None) -> Run:
        """A run from its first epoch, or, when the folder is resuming, from its `last` checkpoint."""
        return cls(folder, optimisation, folder.start(meta, optimisation), score, patience)

    def step(self, loss: torch.Tensor, after_backward: Callable[[], None] | None = None) -> None:
        """One optimiser step on `loss`, counted in the running epoch and recorded with the lr it took."""
        lr = self.optimisation.lr
        self.optimisation.step(loss, after_backward)
        value = float(loss.detach())
        self.state.add_step(value)
        self.tracker.log_metrics({"step/loss": value, "step/lr": lr}, self.optimisation.steps)

    def save_last(self) -> None:
        """Save `last` now (a streamed epoch saves mid-epoch too, with its position)."""
        self.folder.save_last(self.state, self.optimisation)

    def finish_epoch(self, record: dict, metrics: dict) -> None:
        """Book a validated epoch: `best` when its score improved, then `last`, then metrics.jsonl. Every rank
        keeps the books; only a writing folder saves."""
        if self.state.book(record, metrics, self.score, self.patience):
            self.folder.save_best(self.state, self.optimisation)
        self.save_last()
        self.folder.write_log(self.state)

    def result(self, kind: type[Result], config: OptimConfig, started: float) -> Result:
        """The run's result as `kind` (TrainResult, CaptionResult); `started` is its time.perf_counter()."""
        return kind(self.folder.out, config, self.state.best_epoch, self.state.best_metrics, self.state.history,
                    self.folder.meta["parameters"], time.perf_counter() - started)


def run_epochs(run: Run, epochs: int, train_epoch: Callable[[], None], validate: Callable[[], dict], *,
               extras: Callable[[], dict] | None = None, on_epoch: Callable[[dict], None] | None = None,
               tracking: Tracking | None = None) -> None:
    """Epochs until `epochs` are done or patience runs out. `train_epoch()` takes the running epoch's steps
    (through `run.step`), `validate()` returns the validation metrics, `extras()` more values for the epoch's
    record (after its train loss). `on_epoch(record)` follows each epoch where the folder is written, and there
    the trackers `tracking` asks for record the run."""
    with tracked(tracking if run.folder.writes else None, run.folder.out, run.folder.resuming) as tracker:
        run.tracker = tracker
        tracker.log_params(run_params(run.folder.meta))
        while run.state.running(epochs):
            started = time.perf_counter()
            train_epoch()
            train_loss = run.state.close_epoch()
            train_seconds = time.perf_counter() - started
            metrics = validate()
            record = {"epoch": run.state.epoch, "train_loss": train_loss, **(extras() if extras else {}),
                      "lr": run.optimisation.lr,
                      **{f"val_{name}": value for name, value in metrics.items() if value is not None},  # no METEOR: no java
                      "train_seconds": train_seconds, "seconds": time.perf_counter() - started}
            run.finish_epoch(record, metrics)
            tracker.log_metrics(numbers(record, "epoch"), run.optimisation.steps)
            if on_epoch is not None and run.folder.writes:
                on_epoch(record)
        _record_results(run, tracker, tracking)
    run.tracker = Trackers()


def _record_results(run: Run, tracker: Tracker, tracking: Tracking | None) -> None:
    """The best epoch's metrics, then the run's files and plots as artefacts."""
    if tracking is None or not tracking.kinds or not run.folder.writes:
        return
    tracker.log_metrics({**numbers(run.state.best_metrics, "best"), "best/epoch": run.state.best_epoch},
                        run.optimisation.steps)
    plots = tracking.plots(run.folder.out) if tracking.plots else []
    for path in [*run_files(run.folder.out), *plots]:
        tracker.log_artifact(path)
