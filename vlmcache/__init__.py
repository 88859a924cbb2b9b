"""vlmcache: run frozen vision and text encoders once, then train and compare CLIP-style projectors
on the cached features in minutes on a CPU.

    import vlmcache
    vlmcache.extract("../shared/data/flickr8k", "features/flickr8k")
    result = vlmcache.train("features/flickr8k", "runs/mlp", vlmcache.TrainConfig(projector="mlp"))
"""

__version__ = "0.1.0"

from vlmcache.errors import VlmcacheError  # noqa: E402
from vlmcache.extract import extract  # noqa: E402
from vlmcache.store import open_cache  # noqa: E402
from vlmcache.train import TrainConfig, train  # noqa: E402

__all__ = ["TrainConfig", "VlmcacheError", "__version__", "extract", "open_cache", "train"]
