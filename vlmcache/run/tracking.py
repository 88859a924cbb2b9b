"""Experiment tracking: a run's per-step loss and learning rate, per-epoch validation metrics, resolved config and
final files (metrics log, best checkpoint's metadata, config, plots) sent to TensorBoard, MLflow and/or Weights &
Biases (`--log tensorboard,mlflow,wandb`, any subset; none by default).

One small adapter per library behind the `Tracker` protocol; `Trackers` fans out to several. Each library is an
optional extra and is imported only when asked for, so a run without `--log` imports none of them. Records go
beside the run: RUN/tensorboard (event files), RUN/mlruns (an MLflow file store; `--log-uri` for another store or a
server) and RUN/wandb (offline unless WANDB_MODE says otherwise). A resumed run continues the same MLflow and
W&B runs (their ids are kept in RUN/tracking.json) and appends to its TensorBoard folder. An ablation's cells train
in temporary folders, so their records go under the grid's folder instead, grouped by the grid (`Tracking`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

from vlmcache.errors import VlmcacheError
from vlmcache.files import read_json_file, write_json_atomic

TRACKERS = ("tensorboard", "mlflow", "wandb")  # each is also the name of its pyproject extra and of its module
TRACKING_KEYS = ("log", "log_uri")  # config keys that say where a run is recorded, not what it computes
PROJECT = "vlmcache"  # the MLflow experiment and W&B project of runs outside a grid
IDS_FILE = "tracking.json"
FLUSH_SECONDS = 5.0  # MLflow metrics are sent in batches at most this old (one file write per metric otherwise)
TEXT_LIMIT = 100_000  # characters of a text file shown in TensorBoard


def parse_log(value: str) -> str:
    """The --log option: 'MLflow, tensorboard' -> 'mlflow,tensorboard'; an unknown tracker is refused."""
    names = [name.strip().lower() for name in str(value).split(",") if name.strip()]
    unknown = [name for name in names if name not in TRACKERS]
    if unknown:
        raise VlmcacheError(f"--log {value}: unknown tracker {unknown[0]!r}; use any of {', '.join(TRACKERS)}, "
                            "comma-separated")
    return ",".join(dict.fromkeys(names))


def log_kinds(log: str | None) -> tuple[str, ...]:
    """The trackers a --log value names, in its order."""
    return tuple(name for name in (log or "").split(",") if name)


class Logged(Protocol):
    """A config with the tracking options (OptimConfig and the configs built on it)."""

    log: str | None
    log_uri: str | None


class Tracker(Protocol):
    """What a run records: its parameters once, metrics at an optimiser step, files, then close."""

    def log_params(self, params: dict) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_artifact(self, path: Path) -> None: ...

    def close(self, failed: bool = False) -> None: ...


@dataclass(frozen=True)
class Tracking:
    """What a run records and where: the trackers (`log`) and MLflow URI of its config, and the place their records
    go. Outside an ablation only `plots` is usually given; an ablation sets `folder`, `name` and `group`."""

    log: str | None = None
    uri: str | None = None  # MLflow tracking URI [default: FOLDER/mlruns]
    folder: Path | None = None  # where tensorboard/, mlruns/ and wandb/ go [default: the run folder]
    name: str | None = None  # the run's name in every tracker [default: the run folder's name]
    group: str | None = None  # an ablation grid: its cells and its own record share it
    plots: Callable[[Path], list[Path]] | None = None  # the run (or grid) folder -> PNGs to keep as artefacts

    @classmethod
    def of(cls, config: Logged, given: Tracking | None = None) -> Tracking:
        """`given` (or the defaults) with the trackers and URI a run's config asks for."""
        return replace(given or cls(), log=config.log, uri=config.log_uri)

    @property
    def kinds(self) -> tuple[str, ...]:
        return log_kinds(self.log)


@dataclass(frozen=True)
class Place:
    """Where one tracker records one run (what each adapter is opened with)."""

    folder: Path
    name: str
    group: str | None
    uri: str | None
    run_id: str | None  # the id the tracker gave this run before (a resumed run continues it)


def check_tracking(log: str | None, uri: str | None) -> None:
    """Refuse, before any work, a tracker whose library is not installed or an MLflow URI that cannot be written,
    each in one line."""
    for kind in log_kinds(log):
        if importlib.util.find_spec(kind) is None:
            raise VlmcacheError(f"--log {kind}: pip install 'vlmcache[{kind}]'")
    if uri and "mlflow" in log_kinds(log):
        _check_store(uri)


def _check_store(uri: str) -> None:
    """Create a local MLflow store's folder now, or refuse it in one line (a server says so itself when used)."""
    try:
        folder = _store_folder(uri)
        if folder is None:
            return
        folder.mkdir(parents=True, exist_ok=True)
    except (OSError, ValueError) as error:  # ValueError: a malformed URL, a NUL byte in a path
        reason = getattr(error, "strerror", None) or error
        raise VlmcacheError(f"--log-uri {uri}: cannot write there ({reason}); give a writable folder or an MLflow "
                            "server URI") from None
    if not os.access(folder, os.W_OK):
        raise VlmcacheError(f"--log-uri {uri}: not writable; give a writable folder or an MLflow server URI")


def _store_folder(uri: str) -> Path | None:
    """The local folder an MLflow URI writes to (a file store, or a SQLite file's folder); None for a server."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(parsed.path if parsed.scheme else uri)
    if parsed.scheme == "sqlite":
        return Path(parsed.path).parent
    return None


def _mlflow_uri(uri: str | None, folder: Path) -> str:
    """A local path as an absolute file URI (MLflow reads a relative one against its own working folder)."""
    if not uri:
        return (folder / "mlruns").resolve().as_uri()
    return Path(uri).resolve().as_uri() if urlparse(uri).scheme == "" else uri


class TensorBoardTracker:
    """Event files in FOLDER/tensorboard (a grid's cell: FOLDER/tensorboard/<cell>) for `tensorboard --logdir`;
    text files become text summaries and PNGs images."""

    def __init__(self, place: Place):
        from torch.utils.tensorboard import SummaryWriter

        logdir = place.folder / "tensorboard" / (safe_name(place.name) if place.group else "")
        if place.run_id is None:  # a new run (or --overwrite) starts clean curves; a resumed one appends
            for stale in logdir.glob("events.out.tfevents.*"):
                stale.unlink()
        self.writer = SummaryWriter(str(logdir))
        self.run_id = str(logdir)

    def log_params(self, params: dict) -> None:
        rows = "\n".join(f"| {key} | {str(value).replace('|', '&#124;')} |" for key, value in params.items())
        self.writer.add_text("config", "| option | value |\n|---|---|\n" + rows)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def log_artifact(self, path: Path) -> None:
        if path.suffix == ".png":
            import numpy as np
            from PIL import Image

            with Image.open(path) as image:
                self.writer.add_image(f"files/{path.name}", np.asarray(image.convert("RGB")), dataformats="HWC")
            return
        text = path.read_text(encoding="utf-8", errors="replace")[:TEXT_LIMIT]
        self.writer.add_text(f"files/{path.name}", "    " + text.replace("\n", "\n    "))  # Markdown code block

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class MlflowTracker:
    """One MLflow run in the experiment of its grid (or "vlmcache"), through MlflowClient: no global active run,
    so several runs in one process never mix."""

    def __init__(self, place: Place):
        # MLflow 3 refuses a file store unless asked for one; a local store beside the run is what --log mlflow is.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=_mlflow_uri(place.uri, place.folder))
        self.run_id = self._saved_run(place.run_id)
        self.resumed = self.run_id is not None
        if not self.resumed:
            tags = {"vlmcache.grid": place.group} if place.group else {}
            self.run_id = self.client.create_run(_experiment(self.client, place.group or PROJECT), run_name=place.name,
                                                 tags=tags).info.run_id
        self.pending: list = []
        self.flushed = time.monotonic()

    def _saved_run(self, run_id: str | None) -> str | None:
        """The run a resumed run recorded to, if this store still has it (else the resumed run starts a new one)."""
        if run_id is None:
            return None
        try:
            return self.client.get_run(run_id).info.run_id
        except Exception:  # MlflowException for a missing run; the store's own errors otherwise
            return None

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        if not self.resumed:  # MLflow parameters are write-once; a resumed run logged the same ones
            self.client.log_batch(self.run_id, params=[Param(key, str(value)[:6000]) for key, value in params.items()])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(key, float(value), now, step) for key, value in metrics.items()]
        if len(self.pending) >= 1000 or time.monotonic() - self.flushed > FLUSH_SECONDS:
            self._flush()

    def log_artifact(self, path: Path) -> None:
        self._flush()
        self.client.log_artifact(self.run_id, str(path))

    def close(self, failed: bool = False) -> None:
        self._flush()
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")

    def _flush(self) -> None:
        for start in range(0, len(self.pending), 1000):  # MLflow's most metrics per batch
            self.client.log_batch(self.run_id, metrics=self.pending[start:start + 1000])
        self.pending, self.flushed = [], time.monotonic()


def _experiment(client, name: str) -> str:
    """The id of the experiment `name`, created when missing (two cells of a grid may race to create it)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # created by another process in between: MLflow's error type depends on the store
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


class WandbTracker:
    """One W&B run in FOLDER/wandb, offline unless WANDB_MODE is set (`wandb sync` uploads it later), in project
    WANDB_PROJECT (default "vlmcache"); the cells of a grid share its group."""

    def __init__(self, place: Place):
        import wandb

        # console off: the command line's live table owns the terminal; silent: no banner around it.
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), dir=str(place.folder),
                              name=place.name, group=place.group, id=place.run_id,
                              resume="allow" if place.run_id else None,
                              mode=None if os.environ.get("WANDB_MODE") else "offline",
                              settings=wandb.Settings(silent=True, console="off"), reinit="create_new")
        self.run_id = self.run.id

    def log_params(self, params: dict) -> None:
        self.run.config.update(params, allow_val_change=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_artifact(self, path: Path) -> None:
        # A copy, not W&B's default symlink: an ablation cell's run folder is deleted when the cell ends.
        copy = Path(self.run.dir) / path.name
        shutil.copyfile(path, copy)
        self.run.save(str(copy), base_path=self.run.dir, policy="now")

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


ADAPTERS = {"tensorboard": TensorBoardTracker, "mlflow": MlflowTracker, "wandb": WandbTracker}


class Trackers:
    """Several trackers as one; with none it records nothing (a run without --log, a torchrun rank other than 0)."""

    def __init__(self, trackers: list | None = None):
        self.trackers: list = trackers or []

    def log_params(self, params: dict) -> None:
        for tracker in self.trackers:
            tracker.log_params(params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.log_metrics(metrics, step)

    def log_artifact(self, path: Path) -> None:
        for tracker in self.trackers:
            tracker.log_artifact(path)

    def close(self, failed: bool = False) -> None:
        """Close every tracker, even when one of them fails to."""
        with contextlib.ExitStack() as stack:
            for tracker in self.trackers:
                stack.callback(tracker.close, failed)


@contextlib.contextmanager
def tracked(tracking: Tracking | None, run_folder: Path, resuming: bool = False) -> Iterator[Trackers]:
    """The trackers `tracking` asks for, open for the block and closed after it (as failed when it raises). A
    resumed run continues the tracker runs recorded in RUN/tracking.json."""
    if tracking is None or not tracking.kinds:
        yield Trackers()
        return
    check_tracking(tracking.log, tracking.uri)
    run_folder = Path(run_folder)
    ids = _read_ids(run_folder) if resuming else {}
    folder = Path(tracking.folder or run_folder)
    name = tracking.name or run_folder.resolve().name
    opened = Trackers()
    try:
        for kind in tracking.kinds:
            opened.trackers.append(_open(kind, Place(folder, name, tracking.group, tracking.uri, ids.get(kind))))
        write_json_atomic(run_folder / IDS_FILE, dict(zip(tracking.kinds, (t.run_id for t in opened.trackers),
                                                          strict=True)))
        yield opened
    except BaseException:
        opened.close(failed=True)
        raise
    opened.close()


def _open(kind: str, place: Place):
    """One adapter; its library's failure to start (a store it cannot create, a W&B login) in one line."""
    try:
        return ADAPTERS[kind](place)
    except Exception as error:  # each library raises its own types; the user needs the reason, not the trace
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        where = f" at {place.uri}" if kind == "mlflow" and place.uri else ""
        raise VlmcacheError(f"--log {kind}: cannot record{where} ({reason[:300]})") from None


def _read_ids(run_folder: Path) -> dict:
    """The tracker run ids a resumed run continues; none when the file is missing or not a JSON object."""
    try:
        return read_json_file(run_folder / IDS_FILE, "tracker run ids", "delete it", shape=dict)
    except VlmcacheError:
        return {}


def safe_name(name: str) -> str:
    """A run name as a folder name (TensorBoard shows a grid's cells by their folder)."""
    return re.sub(r"[^A-Za-z0-9._=+-]+", "-", name).strip("-") or "run"


def run_params(meta: dict) -> dict:
    """What a run logs as parameters: its resolved config (without the tracking options) and the scalar facts of
    its checkpoint metadata (cache, fingerprint, dims, parameter count, version)."""
    config = {key: value for key, value in meta.get("config", {}).items() if key not in TRACKING_KEYS}
    facts = {key: value for key, value in meta.items() if isinstance(value, str | int | float | bool)}
    return {**config, **facts}


def numbers(values: dict, prefix: str) -> dict[str, float]:
    """The numeric entries of a record as metrics named `prefix/key`."""
    return {f"{prefix}/{key}": float(value) for key, value in values.items()
            if isinstance(value, int | float) and not isinstance(value, bool)}


def run_files(folder: Path) -> list[Path]:
    """A finished run's files worth keeping beside its metrics: config, metrics log, best checkpoint's metadata."""
    return [path for path in (folder / name for name in ("config.toml", "metrics.jsonl", "best.json")) if path.is_file()]
