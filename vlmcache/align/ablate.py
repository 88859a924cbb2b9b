"""The ablation grid: caches × feature sets × projectors × losses × dims × seeds, plus baseline rows.

Each cell is one `train` run. Its result is saved as `<out>/cells/<config hash>.json` the moment it
finishes, so re-running an interrupted ablation only trains the missing cells. Cells are independent
and run in `jobs` worker processes, each limited to its share of the CPU threads.
"""

from __future__ import annotations

import csv
import ctypes
import hashlib
import io
import json
import os
import signal
import sys
import tempfile
import time
import typing
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

from vlmcache import __version__
from vlmcache.align.config import TrainConfig
from vlmcache.align.inputs import evaluate_model, token_options
from vlmcache.align.load import load_model
from vlmcache.align.model import initial_model
from vlmcache.align.projectors import TOKEN_PROJECTORS
from vlmcache.align.train import train
from vlmcache.cache.layout import parse_sets
from vlmcache.cache.sample import read_paired_sample
from vlmcache.cache.store import load_features, open_cache
from vlmcache.encode import encoders
from vlmcache.errors import VlmcacheError
from vlmcache.files import FolderLock, write_json_atomic, write_text_atomic
from vlmcache.metrics.baselines import ASIF_ROW, CCA_ROW, baseline_metrics
from vlmcache.metrics.compat import DEFAULT_RANK_BY, DEFAULT_SAMPLE, score_pairs
from vlmcache.metrics.retrieval import RETRIEVAL_KEYS
from vlmcache.progress import make_progress

UNTRAINED_LINEAR = "untrained linear"
# Options a grid entry may give its projector after ':' (e.g. cross-attention:queries=4, ndlinear:tokens:lr=0.01);
# the table row is labelled the same way, with the options that differ from the defaults.
PROJECTOR_OPTIONS = ("tokens", "text_tokens", "queries", "heads", "positions", "resampler_depth", "lr", "dropout")
TYPES = typing.get_type_hints(TrainConfig)


def projector_spec(spec: str) -> dict:
    """'cross-attention:queries=4:positions' -> {'projector': 'cross-attention', 'queries': 4, 'positions': True}."""
    name, *options = spec.split(":")
    parsed: dict = {"projector": name}
    for option in options:
        key, given, value = option.partition("=")
        key = key.strip().replace("-", "_")
        if key not in PROJECTOR_OPTIONS:
            raise VlmcacheError(f"--projectors {spec}: unknown option {key!r}; use "
                                f"{', '.join(o.replace('_', '-') for o in PROJECTOR_OPTIONS)}")
        if not given:
            parsed[key] = True
        elif value.strip().lower() in ("true", "false"):
            parsed[key] = value.strip().lower() == "true"
        else:
            kind = float if TYPES[key] is float else int  # the option's own type (vlmcache.options)
            try:
                parsed[key] = kind(value)
            except ValueError:
                raise VlmcacheError(f"--projectors {spec}: {key}={value!r} is not a number or true/false") from None
    return parsed


def projector_label(config: dict) -> str:
    """A cell's projector as a grid entry: its name plus the token options that differ from the defaults."""
    defaults = TrainConfig()
    label = [config["projector"]]
    for key in PROJECTOR_OPTIONS:
        value = config.get(key, getattr(defaults, key))
        if value != getattr(defaults, key) and not (key == "tokens" and config["projector"] in TOKEN_PROJECTORS):
            label.append(key.replace("_", "-") if value is True else f"{key.replace('_', '-')}={value}")
    return ":".join(label)


@dataclass
class Cell:
    """One training run of the grid."""

    cache: str
    config: dict

    def key(self) -> str:
        """Hash of what determines the result: the cache's data and encoders, the full config and the code."""
        opened = open_cache(self.cache)
        identity = {"fingerprint": opened.fingerprint, "provenance": opened.provenance, "config": self.config,
                    "vlmcache": __version__}
        if "feature_sets" in opened.manifest:  # only caches with more sets: older cells keep their keys
            identity["feature_sets"] = {m: {n: s.provenance for n, s in opened.feature_sets(m).items()}
                                        for m in ("images", "texts")}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class AblationResult:
    """Aggregated rows (mean ± std over seeds) and where the files are."""

    rows: list[dict]
    out: Path
    cells_trained: int
    cells_reused: int
    seconds: float
    split: str = "val"
    raw: list[dict] = field(default_factory=list)
    # --image-features auto: the pairs chosen per cache by their compatibility score, best first
    selected: list[dict] = field(default_factory=list)


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)
    if sys.platform == "linux":  # die with the parent: a kill -9 of ablate must not leave workers behind
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)


def run_cell(cell: Cell) -> dict:
    """Train one cell in a temporary folder and return its metrics on the evaluation split."""
    config = TrainConfig.from_dict(cell.config)
    opened = open_cache(cell.cache)
    split = opened.default_split()
    started, cpu_started = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory(prefix="vlmcache-cell-") as folder:
        result = train(opened, folder, config)
        training_seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
        if split == config.val_split:
            metrics = result.best_metrics  # selected and reported on dev, as in the README's protocol
        else:
            model, _ = load_model(Path(folder) / "best.safetensors")
            metrics = evaluate_model(model, load_features(opened, split, None, config.image_sets, config.text_sets,
                                                          **token_options(config)))
    return {"cache": cell.cache, "config": cell.config, "metrics": metrics, "parameters": result.parameters,
            "best_epoch": result.best_epoch, "seconds": training_seconds, "cpu_seconds": cpu_seconds, "split": split}


def baseline_rows(cache: str, dim: int, seeds: list[int], features: tuple[str | None, str | None] = (None, None)) -> list[dict]:
    """Untrained linear projectors (per seed), CCA and ASIF on one cache's (image, text) feature sets, as raw cells."""
    opened = open_cache(cache)
    split = opened.default_split()
    sets = {"image_sets": parse_sets(features[0]), "text_sets": parse_sets(features[1])}
    train_split, evaluated = load_features(opened, "train", **sets), load_features(opened, split, **sets)
    chosen = {"image_features": features[0], "text_features": features[1]}
    image_dim, text_dim = train_split.image_features.shape[1], train_split.text_features.shape[1]
    raw = []
    for seed in seeds:
        started = time.perf_counter()
        model = initial_model(TrainConfig(projector="linear", dim=dim, seed=seed), image_dim, text_dim)
        raw.append({"cache": cache, "config": {"projector": UNTRAINED_LINEAR, "loss": "—", "dim": dim, "seed": seed,
                                               **chosen},
                    "metrics": evaluate_model(model, evaluated), "parameters": model.projector_parameters(),
                    "seconds": time.perf_counter() - started, "split": split})
    started = time.perf_counter()
    fitted = baseline_metrics(train_split, evaluated, dim)
    seconds = (time.perf_counter() - started) / len(fitted)
    for name, parameters in ((CCA_ROW, (image_dim + text_dim) * dim), (ASIF_ROW, 0)):
        raw.append({"cache": cache, "config": {"projector": name, "loss": "—", "dim": dim, "seed": 0, **chosen},
                    "metrics": fitted[name], "parameters": parameters, "seconds": seconds, "split": split})
    return raw


AUTO = "auto"
DEFAULT_TOP = 3


def best_pairs(cache: str, top: int, text_features: tuple[str | None, ...], split: str = "train") -> list[dict]:
    """The `top` (image features, text features) pairs of a cache by compatibility score on its training split
    (vlmcache compat's defaults), among the text sets asked for (all when `text_features` is (None,))."""
    opened = open_cache(cache)
    texts = [name for combo in text_features for name in parse_sets(combo) or ()] or None
    if texts is not None and any(len(parse_sets(combo) or ()) != 1 for combo in text_features):
        raise VlmcacheError("--image-features auto: give --text-features as single sets (or leave it out for all)")
    paired = read_paired_sample(opened, split, DEFAULT_SAMPLE, 0, text_sets=texts)
    scores = score_pairs(paired.images, paired.texts, rank_by=DEFAULT_RANK_BY)[:top]
    return [{"cache": cache, "image_features": s.image_features, "text_features": s.text_set,
             "rank_by": DEFAULT_RANK_BY, "score": s.score(DEFAULT_RANK_BY)} for s in scores]


def feature_pairs(cache: str, image_features: tuple[str | None, ...], text_features: tuple[str | None, ...],
                  top: int | None) -> list[dict]:
    """The (image, text) feature pairs of one cache to train: every combination asked for, or with
    `image_features=("auto",)` the `top` best-scoring pairs (see `best_pairs`)."""
    if AUTO not in image_features:
        if top is not None:
            raise VlmcacheError(f"--top {top}: picks pairs for --image-features auto; give that too, or drop --top")
        return [{"image_features": image, "text_features": text} for image in image_features for text in text_features]
    if len(image_features) > 1:
        raise VlmcacheError("--image-features auto: chooses the image sets itself; give it alone")
    if top is not None and top < 1:
        raise VlmcacheError(f"--top {top}: must be at least 1")
    return best_pairs(cache, top or DEFAULT_TOP, text_features)


def ablate(
    caches: list[str | Path],
    out: str | Path = "runs/ablation",
    *,
    projectors: tuple[str, ...] = ("linear", "mlp", "ndlinear"),
    losses: tuple[str, ...] = ("infonce", "sigmoid"),
    seeds: tuple[int, ...] = (0, 1, 2),
    dims: tuple[int, ...] = (256,),
    image_features: tuple[str | None, ...] = (None,),
    text_features: tuple[str | None, ...] = (None,),
    epochs: int = 20,
    jobs: int | None = None,
    with_baselines: bool = True,
    base_config: dict | None = None,
    progress: bool = True,
    threads: int | None = None,
    top: int | None = None,
) -> AblationResult:
    """Run the grid (skipping cells already in `out/cells`), then write ablation.json and ablation.csv.

    `image_features`/`text_features`: feature-set combinations of each cache to compare ('a+b'; None is
    the default set), so "which encoders?" is an axis of the table. `image_features=("auto",)` trains
    only the `top` (default 3) pairs of each cache that score best by compatibility (vlmcache compat),
    among the text sets of `text_features` (all of them when it is (None,)).
    """
    started = time.perf_counter()
    if not caches:
        raise VlmcacheError("give at least one cache folder")
    empty = [option for option, values in (("--projectors", projectors), ("--losses", losses), ("--seeds", seeds),
                                           ("--dims", dims)) if not values]
    if empty:  # an empty grid would train nothing and validate nothing
        raise VlmcacheError(f"{empty[0]}: no values; give at least one, comma-separated")
    caches = [str(Path(c).resolve()) for c in caches]
    for cache in caches:  # fail now, with the cache and set named, not inside a worker
        opened = open_cache(cache)
        for modality, combos in (("images", image_features), ("texts", text_features)):
            for name in {n for combo in combos for n in parse_sets(combo) or ()} - {AUTO}:
                opened.feature_set(modality, name)
    pairs = {cache: feature_pairs(cache, image_features, text_features, top) for cache in caches}
    if jobs is not None and not 1 <= jobs <= 64:
        raise VlmcacheError(f"--jobs {jobs}: must be between 1 and 64")
    out = Path(out)
    try:
        (out / "cells").mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise VlmcacheError(f"--out {out}: cannot create it ({error.strerror})") from None
    cells = [Cell(cache, asdict(TrainConfig(**{**(base_config or {}), **projector_spec(projector), "loss": loss,
                                               "dim": dim, "seed": seed, "epochs": epochs,
                                               "image_features": pair["image_features"],
                                               "text_features": pair["text_features"]})))
             for cache in caches for pair in pairs[cache]
             for projector in projectors for loss in losses for dim in dims for seed in seeds]
    with FolderLock(out, "ablation"):
        raw, pending = [], []
        for cell in cells:
            path = out / "cells" / f"{cell.key()}.json"
            finished = _read_cell(path)
            raw.append(finished) if finished is not None else pending.append((cell, path))
        reused = len(raw)
        jobs = max(1, min(jobs or os.cpu_count() or 1, len(pending) or 1))
        # On a machine shared with other work, 1 thread per cell can be several times faster than 2
        # (OpenMP threads wait on each other when the cores are oversubscribed): `threads` overrides.
        threads = threads or max(1, (os.cpu_count() or 1) // jobs)
        with make_progress(progress) as bars:
            task = bars.add_task("ablation cells", total=len(cells), completed=reused, unit="cell")
            if jobs == 1:  # in this process: no death signal, which would kill the caller with its parent
                torch.set_num_threads(threads)
                for cell, path in pending:
                    raw.append(_keep(run_cell(cell), path))
                    bars.advance(task)
            elif pending:
                with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=_worker_init,
                                         initargs=(threads,)) as pool:
                    futures = {pool.submit(run_cell, cell): path for cell, path in pending}
                    for future in as_completed(futures):
                        raw.append(_keep(future.result(), futures[future]))
                        bars.advance(task)
        if with_baselines:
            for cache in caches:
                for pair in pairs[cache]:
                    for dim in dims:
                        raw += baseline_rows(cache, dim, list(seeds), (pair["image_features"], pair["text_features"]))
        rows = aggregate(raw, caches)
        selected = [pair for cache in caches for pair in pairs[cache] if "score" in pair]
        result = AblationResult(rows, out, len(pending), reused, time.perf_counter() - started,
                                raw[0]["split"] if raw else "val", raw, selected)
        _write(result)
    return result


def _read_cell(path: Path) -> dict | None:
    """A finished cell's result, or None when it is missing or was cut short (it is trained again)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _keep(cell_result: dict, path: Path) -> dict:
    write_json_atomic(path, cell_result)
    return cell_result


def encoder_pair(cache: str, image_features: str | None = None, text_features: str | None = None) -> str:
    """'image encoder(s) + text encoder(s)' of a cache's feature sets, for table rows."""
    opened = open_cache(cache)
    sides = []
    for modality, combo in (("images", image_features), ("texts", text_features)):
        chosen = [opened.feature_set(modality, name).provenance["encoder"] for name in parse_sets(combo) or (None,)]
        sides.append(" & ".join(encoders.describe(encoder) for encoder in chosen))
    return " + ".join(sides)


def aggregate(raw: list[dict], caches: list[str]) -> list[dict]:
    """One row per (cache, projector, loss, dim): mean and std of each metric over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for item in raw:
        config = item["config"]
        features = (config.get("image_features"), config.get("text_features"))
        groups.setdefault((item["cache"], features, projector_label(config), config["loss"], config["dim"]), []).append(item)
    rows = []
    for (cache, features, projector, loss, dim), items in groups.items():
        row = {"cache": cache, "image_features": features[0], "text_features": features[1],
               "encoders": encoder_pair(cache, *features), "projector": projector, "loss": loss, "dim": dim,
               "seeds": sorted(item["config"]["seed"] for item in items), "parameters": items[0]["parameters"],
               "seconds": float(np.mean([item["seconds"] for item in items]))}
        if all("cpu_seconds" in item for item in items):  # CPU beside wall time: runs on a shared machine
            row["cpu_seconds"] = float(np.mean([item["cpu_seconds"] for item in items]))
        for metric in RETRIEVAL_KEYS:
            values = [item["metrics"][metric] for item in items]
            row[metric] = float(np.mean(values))
            row[f"{metric}_std"] = float(np.std(values))
        rows.append(row)
    order = {cache: index for index, cache in enumerate(caches)}
    trained_first = {UNTRAINED_LINEAR: 2, CCA_ROW: 3, ASIF_ROW: 4}
    return sorted(rows, key=lambda r: (order[r["cache"]], r["encoders"], trained_first.get(r["projector"], 1),
                                       -r["mean_recall"]))


def _write(result: AblationResult) -> None:
    write_json_atomic(result.out / "ablation.json",
                      {"split": result.split, "rows": result.rows, "cells": result.raw, "seconds": result.seconds,
                       **({"selected": result.selected} if result.selected else {})})
    buffer = io.StringIO()
    columns = ["encoders", "projector", "loss", "dim", *[c for m in RETRIEVAL_KEYS for c in (m, f"{m}_std")],
               "parameters", "seconds", "seeds"]
    writer = csv.DictWriter(buffer, columns, extrasaction="ignore")
    writer.writeheader()
    for row in result.rows:
        writer.writerow({**row, "seeds": " ".join(map(str, row["seeds"]))})
    write_text_atomic(result.out / "ablation.csv", buffer.getvalue())
