"""The ablation grid: caches × projectors × losses × dims × seeds, plus training-free baseline rows.

Each cell is one `train` run. Its result is saved as `<out>/cells/<config hash>.json` the moment it
finishes, so re-running an interrupted ablation only trains the missing cells. Cells are independent
and run in `jobs` worker processes, each limited to its share of the CPU threads.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

from vlmcache import baselines, encoders
from vlmcache.errors import VlmcacheError
from vlmcache.inference import default_split
from vlmcache.progress import make_progress
from vlmcache.store import open_cache
from vlmcache.train import TrainConfig, evaluate_model, initial_model, load_features, load_model, train

METRICS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mean_recall")


@dataclass
class Cell:
    """One training run of the grid."""

    cache: str
    config: dict

    def key(self) -> str:
        """Hash of what determines the result: the cache's data and encoders, and the full config."""
        opened = open_cache(self.cache)
        identity = {"fingerprint": opened.fingerprint, "provenance": opened.provenance, "config": self.config}
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


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def run_cell(cell: Cell) -> dict:
    """Train one cell in a temporary folder and return its metrics on the evaluation split."""
    config = TrainConfig.from_dict(cell.config)
    opened = open_cache(cell.cache)
    split = default_split(opened)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vlmcache-cell-") as folder:
        result = train(opened, folder, config)
        training_seconds = time.perf_counter() - started
        if split == config.val_split:
            metrics = result.best_metrics  # selected and reported on dev, as in the README's protocol
        else:
            model, _ = load_model(Path(folder) / "best.safetensors")
            metrics = evaluate_model(model, opened.split(split))
    return {"cache": cell.cache, "config": cell.config, "metrics": metrics, "parameters": result.parameters,
            "best_epoch": result.best_epoch, "seconds": training_seconds, "split": split}


def baseline_rows(cache: str, dim: int, seeds: list[int]) -> list[dict]:
    """Untrained linear projectors (per seed), CCA and ASIF on one cache, as raw cells."""
    opened = open_cache(cache)
    split = default_split(opened)
    train_split, evaluated = load_features(opened, "train"), load_features(opened, split)
    raw = []
    for seed in seeds:
        started = time.perf_counter()
        config = TrainConfig(projector="linear", dim=dim, seed=seed)
        model = initial_model(config, train_split.image_features.shape[1], train_split.text_features.shape[1])
        raw.append({"cache": cache, "config": {"projector": "untrained linear", "loss": "—", "dim": dim, "seed": seed},
                    "metrics": evaluate_model(model, evaluated), "parameters": model.projector_parameters(),
                    "seconds": time.perf_counter() - started, "split": split})
    image_dim, text_dim = train_split.image_features.shape[1], train_split.text_features.shape[1]
    for name, compute, parameters in (
            ("CCA (closed form)", lambda: baselines.cca_metrics(train_split, evaluated, dim), (image_dim + text_dim) * dim),
            ("ASIF (no training)", lambda: baselines.asif_metrics(train_split, evaluated), 0)):
        started = time.perf_counter()
        metrics = compute()
        raw.append({"cache": cache, "config": {"projector": name, "loss": "—", "dim": dim, "seed": 0},
                    "metrics": metrics, "parameters": parameters, "seconds": time.perf_counter() - started,
                    "split": split})
    return raw


def ablate(
    caches: list[str | Path],
    out: str | Path = "runs/ablation",
    *,
    projectors: tuple[str, ...] = ("linear", "mlp", "ndlinear"),
    losses: tuple[str, ...] = ("infonce", "sigmoid"),
    seeds: tuple[int, ...] = (0, 1, 2),
    dims: tuple[int, ...] = (256,),
    epochs: int = 20,
    jobs: int | None = None,
    with_baselines: bool = True,
    base_config: dict | None = None,
    progress: bool = True,
) -> AblationResult:
    """Run the grid (skipping cells already in `out/cells`), then write ablation.json and ablation.csv."""
    started = time.perf_counter()
    if not caches:
        raise VlmcacheError("give at least one cache folder")
    caches = [str(Path(c).resolve()) for c in caches]
    for cache in caches:
        open_cache(cache)  # fail now, with the cache named, not inside a worker
    out = Path(out)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    cells = [Cell(cache, asdict(TrainConfig(**{**(base_config or {}), "projector": projector, "loss": loss,
                                               "dim": dim, "seed": seed, "epochs": epochs})))
             for cache in caches for projector in projectors for loss in losses for dim in dims for seed in seeds]
    done, pending = [], []
    for cell in cells:
        path = out / "cells" / f"{cell.key()}.json"
        (done if path.exists() else pending).append((cell, path))
    raw = [json.loads(path.read_text()) for _, path in done]
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(pending) or 1))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with make_progress(progress) as bars:
        task = bars.add_task("ablation cells", total=len(cells), completed=len(done), unit="cell")
        if jobs == 1:
            _worker_init(threads)
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
            for dim in dims:
                raw += baseline_rows(cache, dim, list(seeds))
    rows = aggregate(raw, caches)
    result = AblationResult(rows, out, len(pending), len(done), time.perf_counter() - started,
                            raw[0]["split"] if raw else "val", raw)
    _write(result)
    return result


def _keep(cell_result: dict, path: Path) -> dict:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(json.dumps(cell_result))
    os.replace(temporary, path)
    return cell_result


def encoder_pair(cache: str) -> str:
    """'image encoder + text encoder' of a cache, for table rows."""
    provenance = open_cache(cache).provenance
    return f"{encoders.describe(provenance['images']['encoder'])} + {encoders.describe(provenance['texts']['encoder'])}"


def aggregate(raw: list[dict], caches: list[str]) -> list[dict]:
    """One row per (cache, projector, loss, dim): mean and std of each metric over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for item in raw:
        config = item["config"]
        groups.setdefault((item["cache"], config["projector"], config["loss"], config["dim"]), []).append(item)
    rows = []
    for (cache, projector, loss, dim), items in groups.items():
        row = {"cache": cache, "encoders": encoder_pair(cache), "projector": projector, "loss": loss, "dim": dim,
               "seeds": sorted(item["config"]["seed"] for item in items), "parameters": items[0]["parameters"],
               "seconds": float(np.mean([item["seconds"] for item in items]))}
        for metric in METRICS:
            values = [item["metrics"][metric] for item in items]
            row[metric] = float(np.mean(values))
            row[f"{metric}_std"] = float(np.std(values))
        rows.append(row)
    order = {cache: index for index, cache in enumerate(caches)}
    trained_first = {"untrained linear": 2, "CCA (closed form)": 3, "ASIF (no training)": 4}
    return sorted(rows, key=lambda r: (order[r["cache"]], trained_first.get(r["projector"], 1), -r["mean_recall"]))


def _write(result: AblationResult) -> None:
    (result.out / "ablation.json").write_text(json.dumps(
        {"split": result.split, "rows": result.rows, "cells": result.raw, "seconds": result.seconds}, indent=2))
    with open(result.out / "ablation.csv", "w", newline="") as handle:
        columns = ["encoders", "projector", "loss", "dim", *[c for m in METRICS for c in (m, f"{m}_std")],
                   "parameters", "seconds", "seeds"]
        writer = csv.DictWriter(handle, columns, extrasaction="ignore")
        writer.writeheader()
        for row in result.rows:
            writer.writerow({**row, "seeds": " ".join(map(str, row["seeds"]))})
