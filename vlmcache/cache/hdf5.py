"""HDF5 reads with one-line errors, and h5py's version: what the rest of vlmcache needs of h5py.

Only the cache package opens HDF5 files (tests/test_layers.py checks it). Everything else reads features
through `FeatureCache` and records h5py's version through `h5py_version`, so how the store fails, and what
the user is told to do about it, is decided in this package alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py

from vlmcache.errors import VlmcacheError

# What h5py raises for a file that is missing, truncated or not HDF5 (OSError), a chunk whose fletcher32
# checksum fails (OSError), a dataset or attribute that is not there (KeyError) and bad JSON in an
# attribute or an unreadable selection (ValueError).
HDF5_ERRORS = (OSError, KeyError, ValueError)


def h5py_version() -> str:
    """The version of h5py that writes and reads the shards, as a manifest's `libraries` records it."""
    return h5py.__version__


@contextmanager
def read_hdf5(path: Path, problem: str, advice: str) -> Iterator[h5py.File]:
    """`path` opened read-only. h5py's errors raised while it is open become one VlmcacheError line,
    "<path>: <problem> (<h5py's message>); <advice>"; a VlmcacheError raised in the block passes as it is.

    Keep the block to reads of this file: any OSError, KeyError or ValueError in it is blamed on the file.
    """
    try:
        with h5py.File(path, "r") as handle:
            yield handle
    except HDF5_ERRORS as error:
        raise VlmcacheError(f"{path}: {problem} ({error}); {advice}") from None
