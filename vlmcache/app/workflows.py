"""Library calls that are more than one step: training followed by the run's search index, and the plots a
tracked run (`--log`) keeps as artefacts.

`vlmcache.train` and `vlmcache.ablate` are this module's, so a run trained from Python is searchable at once and
records the same files to its trackers, as one trained from the command line does.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from vlmcache import distributed
from vlmcache.align.ablate import AblationResult
from vlmcache.align.ablate import ablate as run_ablation
from vlmcache.align.config import TrainConfig
from vlmcache.align.train import TrainResult
from vlmcache.align.train import train as train_projectors
from vlmcache.app.search import build_index
from vlmcache.caption.config import CaptionConfig
from vlmcache.caption.train import CaptionResult
from vlmcache.caption.train import train_captioner as train_caption_run
from vlmcache.run.tracking import Tracking


def tracked_plots(folder: Path) -> list[Path]:
    """The PNGs a tracked run keeps as artefacts: a run's training curves, or a grid's bars (none without matplotlib,
    the `plots` extra: tracking must not need it)."""
    from vlmcache.app.plots import plot_ablation, plot_training

    if importlib.util.find_spec("matplotlib") is None:
        return []
    return [plot_ablation(folder) if (folder / "ablation.json").is_file() else plot_training(folder)]


def train(cache, out: str | Path, config: TrainConfig | None = None, **options) -> TrainResult:
    """Train projectors (vlmcache.align.train.train, same arguments), then write the run's search index so that
    the first `search` of the run starts without PyTorch. Under torchrun only rank 0 writes the index."""
    options.setdefault("tracking", Tracking(plots=tracked_plots))
    result = train_projectors(cache, out, config, **options)
    if distributed.is_main_process():
        build_index(result.out)
    return result


def train_captioner(cache, out: str | Path, config: CaptionConfig | None = None, **options) -> CaptionResult:
    """Train a captioner (vlmcache.caption.train.train_captioner, same arguments); a tracked run keeps its plot."""
    options.setdefault("tracking", Tracking(plots=tracked_plots))
    return train_caption_run(cache, out, config, **options)


def ablate(caches, out: str | Path = "runs/ablation", **options) -> AblationResult:
    """Run an ablation grid (vlmcache.align.ablate.ablate, same arguments); a tracked grid keeps its plot."""
    options.setdefault("tracking", Tracking(plots=tracked_plots))
    return run_ablation(caches, out, **options)
