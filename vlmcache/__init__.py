"""vlmcache: run frozen vision and text encoders once, then train and compare CLIP-style projectors
on the cached features in minutes on a CPU."""

__version__ = "0.1.0"

from vlmcache.errors import VlmcacheError  # noqa: E402
from vlmcache.extract import extract  # noqa: E402
from vlmcache.store import open_cache  # noqa: E402

__all__ = ["VlmcacheError", "__version__", "extract", "open_cache"]
