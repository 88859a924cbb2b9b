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
# checksum fails (OSError), a dataset or attribute that is not there (KeyError), bad JSON in an attribute or
# an unreadable selection (ValueError), damage inside a file that opened ("bad symbol table node signature":
# RuntimeError), a dataset of the wrong type or shape (TypeError, IndexError) and a crafted deep nesting.
HDF5_ERRORS = (OSError, KeyError, ValueError, RuntimeError, TypeError, IndexError, RecursionError)


def h5py_version() -> str:
    """The version of h5py that writes and reads the shards, as a manifest's `libraries` records it."""
    return h5py.__version__


@contextmanager
def read_hdf5(path: Path, hint: str, problem: str = "unreadable or corrupt") -> Iterator[h5py.File]:
    """`path` (a shard, index.h5) opened read-only: the one reader of HDF5 files. A file that is missing, cut
    short or corrupt (a failed fletcher32 checksum), or lacks a dataset or attribute, or holds one of the wrong
    type, is refused in one VlmcacheError line, "<path>: <problem> (<h5py's message>); <hint>"; a VlmcacheError
    raised in the block passes as it is.

    Keep the block to reads of this file: any of HDF5_ERRORS in it is blamed on the file.
    """
    try:
        with h5py.File(path, "r") as handle:
            yield handle
    except FileNotFoundError:
        raise VlmcacheError(f"{path}: missing; {hint}") from None
    except HDF5_ERRORS as error:
        raise VlmcacheError(f"{path}: {problem} ({str(error)[:200]}); {hint}") from None
