"""vlmcache: run frozen vision and text encoders once, then train and compare CLIP-style projectors
on the cached features in minutes on a CPU.

    import vlmcache
    vlmcache.extract("../shared/data/flickr8k", "features/flickr8k")
    result = vlmcache.train("features/flickr8k", "runs/mlp", vlmcache.TrainConfig(projector="mlp"))

The names below are imported on first use, so `import vlmcache` (and `vlmcache --help`) stays fast:
torch and h5py load only when something needs them.
"""

import sys
import types
from importlib import import_module

__version__ = "0.2.0"

_EXPORTS = {"VlmcacheError": "vlmcache.errors", "extract": "vlmcache.extract", "ExtractConfig": "vlmcache.extract",
            "open_cache": "vlmcache.store", "verify_cache": "vlmcache.store", "TrainConfig": "vlmcache.config",
            "train": "vlmcache.train", "load_model": "vlmcache.checkpoint", "evaluate_checkpoint": "vlmcache.evaluate",
            "zero_shot": "vlmcache.evaluate", "Predictor": "vlmcache.predictor", "ablate": "vlmcache.ablate"}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vlmcache' has no attribute {name!r}")


class _Package(types.ModuleType):
    """Keeps `vlmcache.extract` / `.train` / `.ablate` the functions, as they were before imports went lazy:
    importing a submodule of the same name must not replace the function with the module."""

    def __setattr__(self, name: str, value) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
