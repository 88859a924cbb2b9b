"""vlmcache: run frozen vision and text encoders once, then train and compare CLIP-style projectors
on the cached features in minutes on a CPU.

    import vlmcache
    vlmcache.extract("../shared/data/flickr8k", "features/flickr8k")
    result = vlmcache.train("features/flickr8k", "runs/mlp", vlmcache.TrainConfig(projector="mlp"))

The names below are imported on first use, so `import vlmcache` (and `vlmcache --help`) stays fast:
torch and h5py load only when something needs them.
"""

from importlib import import_module

__version__ = "0.2.0"

_EXPORTS = {"VlmcacheError": "vlmcache.errors", "extract": "vlmcache.encode.extract",
            "ExtractConfig": "vlmcache.encode.config", "open_cache": "vlmcache.cache.store",
            "verify_cache": "vlmcache.cache.store", "TrainConfig": "vlmcache.align.config", "train": "vlmcache.app.workflows",
            "load_model": "vlmcache.align.load", "evaluate_checkpoint": "vlmcache.eval.evaluate",
            "zero_shot": "vlmcache.eval.evaluate", "Predictor": "vlmcache.app.predictor", "ablate": "vlmcache.app.workflows",
            "compare": "vlmcache.eval.compare", "compat": "vlmcache.eval.compat"}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vlmcache' has no attribute {name!r}")
