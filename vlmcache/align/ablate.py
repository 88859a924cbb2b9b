"""The ablation grid: caches × feature sets × projectors × losses × dims (× capacities) × seeds, plus baseline rows.

Each cell is one `train` run. Its result is saved as `<out>/cells/<config hash>.json` the moment it
finishes, so re-running an interrupted ablation only trains the missing cells. Cells are independent
and run in `jobs` worker processes, each limited to its share of the CPU threads. With `--log`, every cell
trained is one tracker run under the grid's folder, grouped by the grid, and the grid's tables and plot are one
more (vlmcache.run.tracking). With `--capacity`, each pooled projector family is trained at each target number of
trainable parameters, through its size knob (vlmcache.align.capacity).
"""

from __future__ import annotations

import csv
import ctypes
import hashlib
import io
import itertools
import json
import os
import signal
import sys
import tempfile
import time
import typing
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

from vlmcache import __version__
from vlmcache.align.capacity import LIMITS, TOLERANCE, WITHIN, Sizer, parse_capacity, reachable
from vlmcache.align.config import KNOBS, TrainConfig
from vlmcache.align.inputs import model_ranks, token_options
from vlmcache.align.load import load_model
from vlmcache.align.model import initial_model, model_parameters
from vlmcache.align.projectors import TOKEN_PROJECTORS
from vlmcache.align.train import train
from vlmcache.cache.layout import parse_sets
from vlmcache.cache.sample import read_paired_sample
from vlmcache.cache.store import FeatureCache, keep_loaded, load_features, open_cache
from vlmcache.encode import encoders
from vlmcache.errors import VlmcacheError
from vlmcache.files import FolderLock, read_sealed_json, write_json_atomic, write_sealed_json, write_text_atomic
from vlmcache.metrics.baselines import ASIF_ROW, CCA_ROW, baseline_ranks
from vlmcache.metrics.compat import DEFAULT_RANK_BY, DEFAULT_SAMPLE, score_pairs
from vlmcache.metrics.retrieval import RETRIEVAL_KEYS
from vlmcache.metrics.stats import RESAMPLES, mark_best, method, stack_seeds
from vlmcache.options import option_fields
from vlmcache.progress import make_progress
from vlmcache.run.ranks import Ranked, load_ranks, save_ranks
from vlmcache.run.tracking import TRACKING_KEYS, Tracking, check_tracking, log_kinds, tracked

UNTRAINED_LINEAR = "untrained linear"
RANKED = "ranked"  # a fresh cell's Ranked, saved as <out>/cells/<key>.npz and then dropped from its result
# The statistics columns added to each row (ablation.json, ablation.csv), per metric (see vlmcache.metrics.stats).
STATISTICS_SUFFIXES = ("_ci_low", "_ci_high", "_p_vs_best", "_mark")
# Options a grid entry may give its projector after ':' (e.g. cross-attention:queries=4, ndlinear:tokens:lr=0.01);
# the table row is labelled the same way, with the options that differ from the defaults.
PROJECTOR_OPTIONS = ("tokens", "text_tokens", "queries", "heads", "positions", "resampler_depth", "lr", "dropout")
# A family's size knobs may follow ':' too (linear:rank=8, ndlinear:ndlinear-layers=2:ndlinear-hidden=16x16); a row's
# label shows those of its own family only.
KNOB_OPTIONS = tuple(key for keys in KNOBS.values() for key in keys)
TYPES = typing.get_type_hints(TrainConfig)
PARSERS = {field.name: meaning.parse for field, meaning, _ in option_fields(TrainConfig)}
# Options added after cells were first keyed: left out of a cell's key at their defaults, so that the cells trained
# before them keep their keys.
LATER_OPTIONS = {"rank": None, "ndlinear_layers": 1, "ndlinear_hidden": None}
# Options that are axes of the grid or define the data: not tunable per cell.
NOT_TUNABLE = ("projector", "loss", "dim", "seed", "epochs", "train_split", "val_split", "select_on", "image_features",
               "text_features", "tokens", "text_tokens", "stream", "max_memory", "stream_buffer", "image_grid", "text_grid",
               "ndlinear_hidden")


def projector_spec(spec: str) -> dict:
    """'cross-attention:queries=4:positions' -> {'projector': 'cross-attention', 'queries': 4, 'positions': True}."""
    name, *options = spec.split(":")
    parsed: dict = {"projector": name}
    for option in options:
        key, given, value = option.partition("=")
        key = key.strip().replace("-", "_")
        if key not in PROJECTOR_OPTIONS + KNOB_OPTIONS:
            raise VlmcacheError(f"--projectors {spec}: unknown option {key!r}; use "
                                f"{', '.join(o.replace('_', '-') for o in PROJECTOR_OPTIONS + KNOB_OPTIONS)}")
        if key in KNOB_OPTIONS and key not in KNOBS.get(name, ()):  # it would change nothing, yet split the rows
            owner = next(family for family, keys in KNOBS.items() if key in keys)
            raise VlmcacheError(f"--projectors {spec}: {key.replace('_', '-')} sizes {owner}, not {name}")
        if not given:
            parsed[key] = True
        elif PARSERS[key] is not None:
            parsed[key] = value.strip()  # e.g. a grid '16x16': TrainConfig parses and checks it
        elif value.strip().lower() in ("true", "false"):
            parsed[key] = value.strip().lower() == "true"
        else:
            kind = float if TYPES[key] is float else int  # the option's own type (vlmcache.options)
            try:
                parsed[key] = kind(value)
            except ValueError:
                raise VlmcacheError(f"--projectors {spec}: {key}={value!r} is not a number or true/false") from None
    return parsed


def parse_tune(text: str) -> dict[str, tuple]:
    """'lr=3e-4,1e-3,weight_decay=0.01,0.1' -> {'lr': (0.0003, 0.001), 'weight_decay': (0.01, 0.1)}, each value of
    its option's type and within its range (an unknown key or a wrong value is refused naming it)."""
    grid: dict[str, list] = {}
    key = None
    for token in (part.strip() for part in text.split(",")):
        if "=" in token:
            key, _, token = (part.strip() for part in token.partition("="))
            key = key.replace("-", "_")
            if key not in TYPES or key in NOT_TUNABLE or key in grid:
                raise VlmcacheError(f"--tune {text}: {key!r} is {'given twice' if key in grid else 'not a tunable option'};"
                                    " use train options such as lr, weight_decay, dropout, batch_size, warmup")
            grid[key] = []
        if key is None or not token:
            raise VlmcacheError(f"--tune {text}: write key=value,value[,key=value,...], e.g. lr=3e-4,1e-3,3e-3")
        grid[key].append(_typed(key, token, text))
    return {key: tuple(values) for key, values in grid.items()}


def _typed(key: str, token: str, text: str):
    """A tuning value as its option's type, checked by the option's own range and choices."""
    kind = next((member for member in typing.get_args(TYPES[key]) if member is not type(None)), TYPES[key])
    readers = {bool: lambda t: {"true": True, "false": False}[t.lower()], int: int, float: float, str: str}
    try:
        value = readers[kind](token)
    except (KeyError, ValueError):
        what = {bool: "true/false", int: "an integer", float: "a number"}.get(kind, "a " + kind.__name__)
        raise VlmcacheError(f"--tune {text}: {key}={token!r} is not {what}") from None
    try:
        TrainConfig(**{key: value})
    except VlmcacheError as error:
        raise VlmcacheError(f"--tune {text}: {error}") from None
    return value


def projector_label(config: dict, knobs: bool = True) -> str:
    """A cell's projector as a grid entry: its name plus the options that differ from the defaults, its family's size
    knobs last (`knobs=False`: without them, the family a capacity row belongs to)."""
    defaults = TrainConfig()
    label = [config["projector"]]
    for key in PROJECTOR_OPTIONS + (KNOBS.get(config["projector"], ()) if knobs else ()):
        value, default = config.get(key, getattr(defaults, key)), getattr(defaults, key)
        if isinstance(value, list | tuple):  # a grid, as a tuple or as JSON's list
            value = "x".join(map(str, value))
        if value != default and not (key == "tokens" and config["projector"] in TOKEN_PROJECTORS):
            label.append(key.replace("_", "-") if value is True else f"{key.replace('_', '-')}={value}")
    return ":".join(label)


@dataclass
class Cell:
    """One training run of the grid."""

    cache: str
    config: dict
    tracking: Tracking | None = None  # where the cell's run is recorded (--log), named after the cell
    capacity: int | None = None  # the target number of trainable parameters its size knob was chosen for

    def key(self, opened: FeatureCache | None = None) -> str:
        """Hash of what determines the result: the cache's data and encoders, the config (less where it is recorded,
        which changes nothing trained) and the code. `opened`: the cell's cache, already open (else it is opened)."""
        opened = opened or open_cache(self.cache)
        config = {key: value for key, value in self.config.items() if key not in TRACKING_KEYS
                  and not (key in LATER_OPTIONS and value == LATER_OPTIONS[key])}
        identity = {"fingerprint": opened.fingerprint, "provenance": opened.provenance, "config": config,
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
    statistics: dict = field(default_factory=dict)
    selected_on: str = "val"  # where each cell's best epoch was chosen: a split, or train:N carved out of train
    # --image-features auto: the pairs chosen per cache by their compatibility score, best first
    selected: list[dict] = field(default_factory=list)
    # --capacity: the targets, the tolerance, and each (family, target) no knob value reaches, with the reason
    capacity: dict = field(default_factory=dict)


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)
    if sys.platform == "linux":  # die with the parent: a kill -9 of ablate must not leave workers behind
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)


# The caches this process has opened for the running grid, each keeping the splits it has read (keep_loaded): a
# process opens each cache once and reads each input once, however many cells it keys and trains on it. Emptied
# when a grid starts and when it ends (workers are new processes per grid), so a cache changed between two grids is
# read afresh and no split outlives its grid in the caller's memory.
_OPENED: dict[str, FeatureCache] = {}


def opened_for_grid(cache: str) -> FeatureCache:
    """This process's open `cache` for the running grid, keeping what it loads."""
    if cache not in _OPENED:
        _OPENED[cache] = keep_loaded(open_cache(cache))
    return _OPENED[cache]


@contextmanager
def released_at_end() -> Iterator[None]:
    """Drop the grid's open caches and the splits they keep when the grid ends, however it ends."""
    try:
        yield
    finally:
        _OPENED.clear()


def run_cell(cell: Cell) -> dict:
    """Train one cell in a temporary folder and return its metrics (and per-query ranks) on the evaluation split."""
    config = TrainConfig.from_dict(cell.config)
    opened = opened_for_grid(cell.cache)
    split = opened.default_split()
    started, cpu_started = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory(prefix="vlmcache-cell-") as folder:
        result = train(opened, folder, config, tracking=cell.tracking)
        training_seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
        # The best epoch's model ranks the evaluated split once more: its metrics and its per-query ranks
        # (kept for intervals and paired tests) then come from the same numbers.
        model, _ = load_model(Path(folder) / "best.safetensors")
        evaluated = load_features(opened, split, None, config.image_sets, config.text_sets, **token_options(config))
        ranked = Ranked.of(model_ranks(model, evaluated), evaluated)
    return {"cache": cell.cache, "config": cell.config, "metrics": ranked.metrics(), "parameters": result.parameters,
            "best_epoch": result.best_epoch, "seconds": training_seconds, "cpu_seconds": cpu_seconds, "split": split,
            "items": ranked.items, "selection_metrics": result.best_metrics, RANKED: ranked}


def baseline_rows(cache: str, dim: int, seeds: list[int], features: tuple[str | None, str | None] = (None, None)) -> list[dict]:
    """Untrained linear projectors (per seed), CCA and ASIF on one cache's (image, text) feature sets, as raw cells."""
    opened = opened_for_grid(cache)
    split = opened.default_split()
    sets = {"image_sets": parse_sets(features[0]), "text_sets": parse_sets(features[1])}
    train_split, evaluated = load_features(opened, "train", **sets), load_features(opened, split, **sets)
    chosen = {"image_features": features[0], "text_features": features[1]}
    image_dim, text_dim = train_split.image_features.shape[1], train_split.text_features.shape[1]
    def row(name: str, seed: int, ranks: tuple, parameters: int, seconds: float) -> dict:
        ranked = Ranked.of(ranks, evaluated)
        return {"cache": cache, "config": {"projector": name, "loss": "—", "dim": dim, "seed": seed, **chosen},
                "metrics": ranked.metrics(), "parameters": parameters, "seconds": seconds, "split": split,
                "items": ranked.items, RANKED: ranked}

    raw = []
    for seed in seeds:
        started = time.perf_counter()
        model = initial_model(TrainConfig(projector="linear", dim=dim, seed=seed), image_dim, text_dim)
        raw.append(row(UNTRAINED_LINEAR, seed, model_ranks(model, evaluated), model.projector_parameters(),
                       time.perf_counter() - started))
    started = time.perf_counter()
    fitted = baseline_ranks(train_split, evaluated, dim)
    seconds = (time.perf_counter() - started) / len(fitted)
    for name, parameters in ((CCA_ROW, (image_dim + text_dim) * dim), (ASIF_ROW, 0)):
        raw.append(row(name, 0, fitted[name], parameters, seconds))
    return raw


AUTO = "auto"
DEFAULT_TOP = 3


def best_pairs(cache: str, top: int, text_features: tuple[str | None, ...], split: str = "train") -> list[dict]:
    """The `top` (image features, text features) pairs of a cache by compatibility score on its training split
    (vlmcache compat's defaults), among the text sets asked for (all when `text_features` is (None,))."""
    opened = opened_for_grid(cache)
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
    resamples: int = RESAMPLES,
    tune: dict[str, tuple] | None = None,
    tracking: Tracking | None = None,
    top: int | None = None,
    capacity: str | typing.Sequence[int] | None = None,
) -> AblationResult:
    """Run the grid (skipping cells already in `out/cells`), then write ablation.json and ablation.csv.

    `image_features`/`text_features`: feature-set combinations of each cache to compare ('a+b'; None is
    the default set), so "which encoders?" is an axis of the table. Every cell's per-query ranks are kept
    in `out/cells/<key>.npz`; each row gets a 95% interval per metric (bootstrap over the evaluated images
    and the seeds, `resamples` replicates) and a paired test against the best row (see add_statistics).
    `tune` ({option: values}, see parse_tune): each cell is trained with every combination of the values, and
    each row reports the combination with the best mean recall on the selection split (`--select-on`,
    which must not be the reported split), averaged over seeds.
    `base_config`'s `log` (and `log_uri`) record each cell trained and the grid's tables to trackers;
    `tracking.plots` makes the grid's plots.
    `image_features=("auto",)` trains only the `top` (default 3) pairs of each cache that score best by
    compatibility (vlmcache compat), among the text sets of `text_features` (all of them when it is (None,)).
    `capacity` ('2k,30k,400k,2M' or integers, see parse_capacity): train each projector family at each target number
    of trainable parameters instead of at its default size (see capacity_plan); rows gain `capacity` (the target),
    `family` and `knob`, and the targets a family cannot reach are listed in the result's `capacity`.
    """
    started = time.perf_counter()
    _OPENED.clear()
    if not caches:
        raise VlmcacheError("give at least one cache folder")
    empty = [option for option, values in (("--projectors", projectors), ("--losses", losses), ("--seeds", seeds),
                                           ("--dims", dims)) if not values]
    if empty:  # an empty grid would train nothing and validate nothing
        raise VlmcacheError(f"{empty[0]}: no values; give at least one, comma-separated")
    targets = () if capacity is None else parse_capacity(capacity)
    caches = [str(Path(c).resolve()) for c in caches]
    shared = TrainConfig(**{**(base_config or {}), "epochs": epochs})  # the options every cell has: checked once
    for cache in caches:  # fail now, with the cache and set named, not inside a worker
        opened = opened_for_grid(cache)
        check_selection(shared, opened)
        if tune and shared.selection[0] == opened.default_split():
            raise VlmcacheError(f"--tune: each cell's values would be chosen on the reported split "
                                f"{opened.default_split()!r} of {opened.path}; choose them elsewhere, e.g. "
                                f"--select-on {shared.train_split}:1000")
        for modality, combos in (("images", image_features), ("texts", text_features)):
            for name in {n for combo in combos for n in parse_sets(combo) or ()} - {AUTO}:
                opened.feature_set(modality, name)
    pairs = {cache: feature_pairs(cache, image_features, text_features, top) for cache in caches}
    if jobs is not None and not 1 <= jobs <= 64:
        raise VlmcacheError(f"--jobs {jobs}: must be between 1 and 64")
    out = Path(out)
    tune = tune or {}
    clash = [spec for spec in projectors if set(projector_spec(spec)) & set(tune)]
    if clash:
        raise VlmcacheError(f"--projectors {clash[0]}: sets an option --tune also sets; tune it in one place")
    combos = [dict(zip(tune, values, strict=True)) for values in itertools.product(*tune.values())]
    sizes, unreachable = capacity_plan(caches, pairs, projectors, dims, targets, {**(base_config or {}), "epochs": epochs},
                                       combos)
    cells = [Cell(cache, asdict(TrainConfig(**{**(base_config or {}), **projector_spec(projector), **combo, **knob,
                                               "loss": loss, "dim": dim, "seed": seed, "epochs": epochs,
                                               "image_features": pair["image_features"],
                                               "text_features": pair["text_features"]})), capacity=target)
             for cache in caches for index, pair in enumerate(pairs[cache])
             for projector in projectors for loss in losses for dim in dims for combo in combos
             for target, knob in sizes[cache, index, projector, dim] for seed in seeds]
    grid = grid_tracking(cells[0].config, out, tracking)  # a missing tracker library is refused before any folder
    try:
        (out / "cells").mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise VlmcacheError(f"--out {out}: cannot create it ({error.strerror})") from None
    with FolderLock(out, "ablation"), released_at_end():
        # Cells by their file: two capacities whose knob is the same (or a projector given twice) train it once.
        raw, pending = [], {}
        for cell in cells:
            key = cell.key(opened_for_grid(cell.cache))
            path = out / "cells" / f"{key}.json"
            finished = _read_cell(path)
            if finished is not None and tune and "selection_metrics" not in finished:
                finished = None  # from before selection metrics were kept: trained again
            cell.tracking = None if grid is None else replace(grid, name=cell_name(cell, key), plots=None)
            raw.append(_sized(finished, cell)) if finished is not None else pending.setdefault(path, []).append(cell)
        reused = len(raw)
        jobs = max(1, min(jobs or os.cpu_count() or 1, len(pending) or 1))
        # On a machine shared with other work, 1 thread per cell can be several times faster than 2
        # (OpenMP threads wait on each other when the cores are oversubscribed): `threads` overrides.
        threads = threads or max(1, (os.cpu_count() or 1) // jobs)
        with make_progress(progress) as bars:
            task = bars.add_task("ablation cells", total=len(cells), completed=reused, unit="cell")
            if jobs == 1:  # in this process: no death signal, which would kill the caller with its parent
                torch.set_num_threads(threads)
                for path, group in pending.items():
                    kept = _keep(run_cell(group[0]), path)
                    raw += [_sized(kept, cell) for cell in group]
                    bars.advance(task, len(group))
            elif pending:
                with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=_worker_init,
                                         initargs=(threads,)) as pool:
                    futures = {pool.submit(run_cell, group[0]): path for path, group in pending.items()}
                    for future in as_completed(futures):
                        kept, group = _keep(future.result(), futures[future]), pending[futures[future]]
                        raw += [_sized(kept, cell) for cell in group]
                        bars.advance(task, len(group))
        for item in raw if tune else ():  # trained cells only so far
            item["tuned"] = {key: item["config"][key] for key in tune}
        if with_baselines:
            for cache in caches:
                opened = opened_for_grid(cache)
                for pair in pairs[cache]:
                    for dim in dims:
                        raw += [_keep_ranks(item, out / "cells" / f"{Cell(cache, item['config']).key(opened)}.npz", out)
                                for item in baseline_rows(cache, dim, list(seeds),
                                                          (pair["image_features"], pair["text_features"]))]
        reported = choose_tuned(raw) if tune else raw
        rows = aggregate(reported, caches)
        statistics = add_statistics(rows, reported, out, resamples)
        selected = [pair for cache in caches for pair in pairs[cache] if "score" in pair]
        result = AblationResult(rows, out, len(pending), reused, time.perf_counter() - started,
                                raw[0]["split"] if raw else "val", raw, statistics, shared.select_on or shared.val_split,
                                selected, {"targets": list(targets), "tolerance": float(TOLERANCE),
                                           "unreachable": unreachable} if targets else {})
        _write(result)
        if grid is not None:
            _record_grid(result, grid, {"caches": caches, "projectors": projectors, "losses": losses, "seeds": seeds,
                                        "dims": dims, "image_features": image_features, "text_features": text_features,
                                        "epochs": epochs, **({"capacity": targets} if targets else {}),
                                        **(base_config or {})})
    return result


def capacity_plan(caches: list[str], pairs: dict[str, list[dict]], projectors: tuple[str, ...], dims: tuple[int, ...],
                  targets: tuple[int, ...], base: dict, combos: list[dict]) -> tuple[dict[tuple, list], list[dict]]:
    """What each (cache, feature pair's index, projector, dim) of the grid trains: [(target, knob options)], or
    [(None, {})] without targets. Each family gets, per target, its knob value with the closest trainable-parameter
    count (vlmcache.align.capacity.Sizer); a family more than ±25% away is listed as unreachable (second value),
    and a target no family of the grid reaches is refused naming the range that can be reached."""
    if not targets:
        return {(cache, index, projector, dim): [(None, {})] for cache in caches for index in range(len(pairs[cache]))
                for projector in projectors for dim in dims}, []
    for given, keys in (("--", base), ("--tune ", combos[0])):
        for key in sorted(set(keys) & set(KNOB_OPTIONS)):
            raise VlmcacheError(f"{given}{key.replace('_', '-')}: --capacity chooses it per cell; leave it out")
    plan, unreachable = {}, []
    for cache in caches:
        opened = opened_for_grid(cache)
        for index, pair in enumerate(pairs[cache]):
            widths = [sum(opened.set_dims(modality, parse_sets(pair[key])))
                      for modality, key in (("images", "image_features"), ("texts", "text_features"))]
            for dim in dims:
                reached, spans = set(), []
                for projector in projectors:
                    spec = projector_spec(projector)
                    config = TrainConfig(**{**base, **spec, "dim": dim})
                    _check_sizable(projector, spec, config, combos, widths)
                    sizer = Sizer(config, *widths)
                    spans.append(sizer.span())
                    plan[cache, index, projector, dim] = []
                    for target in targets:
                        sized = sizer.closest(target)
                        if sized.reached:
                            plan[cache, index, projector, dim].append((target, sized.knob))
                            reached.add(target)
                            continue
                        label = projector_label({**asdict(config), **sized.knob})
                        unreachable.append({
                            "cache": cache, "image_features": pair["image_features"],
                            "text_features": pair["text_features"], "dim": dim, "projector": projector,
                            "capacity": target, "closest": label, "parameters": sized.parameters,
                            "reason": f"{projector} spans {spans[-1][0]:,} to {spans[-1][1]:,} trainable parameters "
                                      f"here ({LIMITS[config.projector]}); its closest, {label} with "
                                      f"{sized.parameters:,}, is more than {WITHIN} from {target:,}"})
                missing = [target for target in targets if target not in reached]
                if missing:
                    low, high = reachable(min(span[0] for span in spans), max(span[1] for span in spans))
                    raise VlmcacheError(
                        f"--capacity {missing[0]}: no projector of the grid ({', '.join(projectors)}) comes within "
                        f"{WITHIN} of {missing[0]:,} trainable parameters on {Path(cache).name}"
                        f"{_features_note(pair)} at --dim {dim}; reachable: {low:,} to {high:,}")
    return plan, unreachable


def _features_note(pair: dict) -> str:
    sets = [name for name in (pair["image_features"], pair["text_features"]) if name]
    return f" ({' + '.join(sets)})" if sets else ""


def _check_sizable(projector: str, spec: dict, config: TrainConfig, combos: list[dict], widths: list[int]) -> None:
    """Refuse a grid entry --capacity cannot size: no knob, token states, a knob it sets itself, or tuned options
    that change its parameter count (the rows of a tuned cell must share one size)."""
    if config.projector not in KNOBS or config.tokens or config.text_tokens:
        raise VlmcacheError(f"--capacity: --projectors {projector} has no size knob; it sizes "
                            f"{', '.join(KNOBS)} on pooled features")
    if set(spec) & set(KNOB_OPTIONS):
        raise VlmcacheError(f"--projectors {projector}: sets its size, which --capacity chooses; drop one")
    if config.projector == "mlp" and config.residual:
        raise VlmcacheError("--capacity: --residual fixes the MLP's hidden width at --dim; leave it off")
    counts = {model_parameters(replace(config, **combo), *widths) for combo in combos}
    if len(counts) > 1:
        raise VlmcacheError(f"--tune {', '.join(combos[0])}: changes the number of trainable parameters, which "
                            "--capacity matches; tune it without --capacity")


def check_selection(config: TrainConfig, opened) -> None:
    """Refuse a --select-on that overlaps the split the table reports, or carves more images than train has."""
    name, carved = config.selection
    reported = opened.default_split()
    if config.select_on and name == reported:
        raise VlmcacheError(f"--select-on {config.select_on}: overlaps the reported split {reported!r} of {opened.path}; "
                            f"select on another split, or carve one out of the training split ({config.train_split}:1000)")
    if carved and name in opened.splits and carved >= opened.manifest["dataset"]["splits"][name]["images"]:
        raise VlmcacheError(f"--select-on {config.select_on}: split {name!r} of {opened.path} has only "
                            f"{opened.manifest['dataset']['splits'][name]['images']} images; carve fewer")


def grid_tracking(config: dict, out: Path, given: Tracking | None) -> Tracking | None:
    """Where a grid's runs are recorded when its config asks (`log`): under the grid's folder (a cell's own folder
    is temporary), grouped by the folder's name. None without `log`; a missing tracker library is refused now."""
    if not log_kinds(config.get("log")):
        return None
    check_tracking(config["log"], config.get("log_uri"))
    folder = out.resolve()
    return replace(given or Tracking(), log=config["log"], uri=config.get("log_uri"), folder=folder, group=folder.name)


def cell_name(cell: Cell, key: str) -> str:
    """A cell's run name in the trackers: its cache, projector, loss, dim, seed and feature sets, then its key."""
    config = cell.config
    parts = [Path(cell.cache).name, projector_label(config), config["loss"], f"d{config['dim']}", f"s{config['seed']}",
             config.get("image_features"), config.get("text_features"), key[:8]]
    return " ".join(str(part) for part in parts if part)


def _record_grid(result: AblationResult, grid: Tracking, definition: dict) -> None:
    """The grid as one more tracker run: its axes as parameters, its tables and plots as files."""
    with tracked(replace(grid, name="grid"), result.out) as tracker:
        tracker.log_params({key: value for key, value in definition.items() if key not in TRACKING_KEYS})
        plots = grid.plots(result.out) if grid.plots else []
        for path in (result.out / "ablation.json", result.out / "ablation.csv", *plots):
            tracker.log_artifact(path)


# What a finished cell's result holds (vlmcache.files.shape_error): a file of another shape is trained again.
CELL = {"cache": str, "config": dict, "metrics": {str: (int, float)}, "parameters": int, "seconds": (int, float),
        "split": str}


def _read_cell(path: Path) -> dict | None:
    """A finished cell's result, or None when it is missing, was cut short, differs from the SHA-256 sealed into it
    (damaged, or written before cells were sealed) or lacks its ranks: the cell is then trained again."""
    finished = read_sealed_json(path, "ablation cell", CELL)
    ranks = path.with_suffix(".npz")
    if finished is None or not ranks.is_file():
        return None
    return {**finished, "ranks": str(ranks.relative_to(path.parent.parent))}


def _keep_ranks(item: dict, path: Path, out: Path) -> dict:
    """Save a fresh result's ranks to `path` (an .npz under `out`); the result then names that file instead."""
    save_ranks(path, {item["config"]["projector"]: item.pop(RANKED)})
    return {**item, "ranks": str(path.relative_to(out))}


def _sized(item: dict, cell: Cell) -> dict:
    """A cell's result with the capacity its knob was chosen for (a cell file is keyed by what it trains, so
    two targets that choose one knob share it)."""
    return item if cell.capacity is None else {**item, "capacity": cell.capacity}


def _keep(cell_result: dict, path: Path) -> dict:
    """Save a trained cell: its ranks first, then its sealed JSON (whose presence marks the cell finished)."""
    kept = _keep_ranks(cell_result, path.with_suffix(".npz"), path.parent.parent)
    write_sealed_json(path, kept)
    return kept


def encoder_pair(cache: str, image_features: str | None = None, text_features: str | None = None) -> str:
    """'image encoder(s) + text encoder(s)' of a cache's feature sets, for table rows."""
    opened = opened_for_grid(cache)
    sides = []
    for modality, combo in (("images", image_features), ("texts", text_features)):
        chosen = [opened.feature_set(modality, name).provenance["encoder"] for name in parse_sets(combo) or (None,)]
        sides.append(" & ".join(encoders.describe(encoder) for encoder in chosen))
    return " + ".join(sides)


def _row_config(item: dict) -> dict:
    """A raw cell's config as its row shows it: tuned options at their defaults (a row's chosen values are in its
    own column)."""
    defaults = TrainConfig()
    return {**item["config"], **{key: getattr(defaults, key) for key in item.get("tuned", {})}}


def _cell_row(item: dict) -> tuple:
    """The table row a raw cell belongs to: (cache, feature sets, projector label, loss, dim, capacity target)."""
    config = _row_config(item)
    features = (config.get("image_features"), config.get("text_features"))
    return item["cache"], features, projector_label(config), config["loss"], config["dim"], item.get("capacity")


def choose_tuned(raw: list[dict]) -> list[dict]:
    """The cells a table reports: per row, those of the tuned values with the best selection-split mean recall
    (mean over seeds; the first such values of the grid on a tie); untuned cells all. Marks each tuned
    cell `chosen` or not."""
    rows: dict[tuple, dict[tuple, list[dict]]] = {}
    for item in raw:
        if "tuned" in item:
            rows.setdefault(_cell_row(item), {}).setdefault(tuple(item["tuned"].items()), []).append(item)
    for combos in rows.values():
        best = max(combos.values(), key=lambda items: np.mean([i["selection_metrics"]["mean_recall"] for i in items]))
        for items in combos.values():
            for item in items:
                item["chosen"] = items is best
    return [item for item in raw if item.get("chosen", True)]


def _row_key(row: dict) -> tuple:
    """A row's (cache, feature sets, projector label, loss, dim, capacity), as `_cell_row` gives for its cells."""
    return (row["cache"], (row["image_features"], row["text_features"]), row["projector"], row["loss"], row["dim"],
            row.get("capacity"))


def aggregate(raw: list[dict], caches: list[str]) -> list[dict]:
    """One row per (cache, projector, loss, dim): mean and std of each metric over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for item in raw:
        groups.setdefault(_cell_row(item), []).append(item)
    rows = []
    for (cache, features, projector, loss, dim, capacity), items in groups.items():
        row = {"cache": cache, "image_features": features[0], "text_features": features[1],
               "encoders": encoder_pair(cache, *features), "projector": projector, "loss": loss, "dim": dim,
               "seeds": sorted(item["config"]["seed"] for item in items), "parameters": items[0]["parameters"],
               "seconds": float(np.mean([item["seconds"] for item in items]))}
        if all("cpu_seconds" in item for item in items):  # CPU beside wall time: runs on a shared machine
            row["cpu_seconds"] = float(np.mean([item["cpu_seconds"] for item in items]))
        if len({item.get("items") for item in items}) == 1 and items[0].get("items"):
            row["items"] = items[0]["items"]
        if "tuned" in items[0]:
            row["tuned"] = items[0]["tuned"]
        if capacity is not None:  # the target; `parameters` is the count trained, `knob` what was chosen for it
            config = _row_config(items[0])
            row.update(capacity=capacity, family=projector_label(config, knobs=False),
                       knob={key: list(config[key]) if isinstance(config[key], tuple) else config[key]
                             for key in KNOBS[config["projector"]]})
        for metric in RETRIEVAL_KEYS:
            values = [item["metrics"][metric] for item in items]
            row[metric] = float(np.mean(values))
            row[f"{metric}_std"] = float(np.std(values))
        rows.append(row)
    order = {cache: index for index, cache in enumerate(caches)}
    trained_first = {UNTRAINED_LINEAR: 2, CCA_ROW: 3, ASIF_ROW: 4}
    return sorted(rows, key=lambda r: (order[r["cache"]], r["encoders"], trained_first.get(r["projector"], 1),
                                       r.get("capacity", 0), -r["mean_recall"]))


def add_statistics(rows: list[dict], raw: list[dict], out: Path, resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """Add each row's interval and comparison with the best row, per metric (keys <metric>_ci_low,
    _ci_high, _p_vs_best, _mark), from the cells' stored ranks; returns how they were computed.

    Rows are compared within groups evaluated on the same items (all rows of one dataset, whatever the
    encoders): each row's seeds are stacked, and vlmcache.metrics.stats.mark_best gives the 95%
    intervals (images and seeds resampled), the Holm-corrected paired p-values against the group's best
    row and the marks (best / tied: not distinguishable from the best at 5% / worse).
    """
    started = time.perf_counter()
    cells: dict[tuple, list[dict]] = {}
    for item in raw:
        cells.setdefault(_cell_row(item), []).append(item)
    groups: dict[str, list[dict]] = {}
    for row in rows:
        if "items" in row:
            groups.setdefault(row["items"], []).append(row)
    for members in groups.values():
        hits = [stack_seeds([next(iter(load_ranks(out / item["ranks"]).values())).hits()
                             for item in sorted(cells[_row_key(row)], key=lambda item: item["config"]["seed"])])
                for row in members]
        table = mark_best(hits, resamples, seed=seed)
        for index, row in enumerate(members):
            row.update(table.row(index))
    return {**method("the evaluated images (each with its captions) and the seeds", resamples, seed),
            "seconds": time.perf_counter() - started}


def tuned_text(row: dict) -> str:
    """A row's chosen tuning values as 'lr=0.001 weight_decay=0.1' ('' for an untuned row)."""
    return " ".join(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"
                    for key, value in row.get("tuned", {}).items())


def _write(result: AblationResult) -> None:
    write_json_atomic(result.out / "ablation.json",
                      {"split": result.split, "rows": result.rows, "cells": result.raw, "seconds": result.seconds,
                       "statistics": result.statistics, "selected_on": result.selected_on,
                       **({"selected": result.selected} if result.selected else {}),
                       **({"capacity": result.capacity} if result.capacity else {})})
    buffer = io.StringIO()
    columns = ["encoders", "projector", "loss", "dim", *[c for m in RETRIEVAL_KEYS for c in (m, f"{m}_std")],
               "parameters", *(["capacity", "family"] if result.capacity else []), "seconds", "seeds",
               *[f"{m}{suffix}" for m in RETRIEVAL_KEYS for suffix in STATISTICS_SUFFIXES], "tuned"]
    writer = csv.DictWriter(buffer, columns, extrasaction="ignore")
    writer.writeheader()
    for row in result.rows:
        writer.writerow({**row, "seeds": " ".join(map(str, row["seeds"])), "tuned": tuned_text(row)})
    write_text_atomic(result.out / "ablation.csv", buffer.getvalue())
