"""A run's folder: refused when --out cannot hold a run or already holds one (unless resuming or overwriting),
locked while a run writes it, cleared of a killed run's temporaries, restored from on resume, and written
atomically: the `best` and `last` checkpoints and metrics.jsonl.

Under torchrun every rank opens the folder and keeps the books, rank 0 alone checks and writes it; each
refusal is rank 0's, raised on every rank (vlmcache.distributed.share_error).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from vlmcache import distributed
from vlmcache.files import FolderLock, remove_stale_temporaries
from vlmcache.run.checkpoint import restore, save_checkpoint, write_metrics_log
from vlmcache.run.loop import LoopState, Optimisation

LAST, BEST = "last.safetensors", "best.safetensors"


@dataclass
class RunFolder:
    """An opened run folder (see `open_run_folder`) and the metadata its checkpoints carry."""

    out: Path
    writes: bool  # False on the ranks of a torchrun other than rank 0
    resuming: bool  # resume was asked and the folder holds a `last` checkpoint
    meta: dict = field(default_factory=dict)  # the run's identity (config, cache, dims...), set by `start`

    def start(self, meta: dict, optimisation: Optimisation) -> LoopState:
        """The state a run starts from: a new one, or when resuming the one in `last`, whose weights, optimiser,
        scheduler and RNG states go into `optimisation`. metrics.jsonl is rewritten to match it."""
        self.meta = meta
        state = restore(self.out / LAST, meta, optimisation) if self.resuming else LoopState()
        self.write_log(state)  # the log always matches the checkpoint, even after a kill
        return state

    def save_last(self, state: LoopState, optimisation: Optimisation) -> None:
        """`last`: the weights with everything a resumed run needs to continue exactly."""
        if self.writes:
            save_checkpoint(self.out / LAST, {**self.meta, **state.to_meta()}, optimisation.model, optimisation)

    def save_best(self, state: LoopState, optimisation: Optimisation) -> None:
        """`best`: the weights alone, for using the model."""
        if self.writes:
            save_checkpoint(self.out / BEST, {**self.meta, **state.best_meta()}, optimisation.model)

    def write_log(self, state: LoopState) -> None:
        """metrics.jsonl: one line per epoch of the history."""
        if self.writes:
            write_metrics_log(self.out, state.history)


@contextlib.contextmanager
def open_run_folder(out: str | Path, what: str, *, resume: bool = False, overwrite: bool = False, rank: int = 0,
                    world: int = 1) -> Iterator[RunFolder]:
    """The folder `out` checked, created and locked for a run (`what` names it in a lock refusal, e.g. "train
    run"). A folder that already holds a run is refused unless `resume` (continue it) or `overwrite`."""
    out, writes = Path(out), rank == 0
    distributed.share_error(_refusal(out) if writes else None, world)
    with FolderLock(out, what) if writes else contextlib.nullcontext():
        if writes:
            remove_stale_temporaries(out)
        exists = (out / LAST).exists()
        distributed.share_error(f"{out}: already holds a run; pass --resume to continue it or --overwrite to start "
                                "again" if writes and exists and not (resume or overwrite) else None, world)
        yield RunFolder(out, writes, resuming=resume and exists)


def _refusal(out: Path) -> str | None:
    """Why `out` cannot hold a run, or None once it exists as a folder."""
    if out.exists() and not out.is_dir():
        return f"--out {out}: is a file; pass a folder for the run"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return f"--out {out}: cannot create it ({error.strerror})"
    return None
