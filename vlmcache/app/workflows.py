"""Library calls that are more than one step: training followed by the run's search index.

`vlmcache.train` is this module's `train`, so a run trained from Python is searchable at once, as one
trained from the command line is.
"""

from __future__ import annotations

from pathlib import Path

from vlmcache import distributed
from vlmcache.align.config import TrainConfig
from vlmcache.align.train import TrainResult
from vlmcache.align.train import train as train_projectors
from vlmcache.app.search import build_index


def train(cache, out: str | Path, config: TrainConfig | None = None, **options) -> TrainResult:
    """Train projectors (vlmcache.align.train.train, same arguments), then write the run's search index so that
    the first `search` of the run starts without PyTorch. Under torchrun only rank 0 writes the index."""
    result = train_projectors(cache, out, config, **options)
    if distributed.is_main_process():
        build_index(result.out)
    return result
