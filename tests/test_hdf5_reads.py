"""The cache package's HDF5 reads: shard by shard arrays for callers outside it, and h5py's errors as one line
naming the file and what to do."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from vlmcache.cache.hdf5 import h5py_version
from vlmcache.cache.store import open_cache
from vlmcache.cache.writer import write_or_extend_shard
from vlmcache.data.synthetic import write_synthetic_cache
from vlmcache.errors import VlmcacheError


@pytest.fixture
def cache(tmp_path):
    """A synthetic cache of 40 + 10 images (two captions each) in shards of 16 rows."""
    return open_cache(write_synthetic_cache(tmp_path / "cache", 40, val_images=10, captions_per_image=2, dim=8,
                                            shard_size=16))


def truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def test_read_shards_hands_out_each_shards_arrays_in_row_order(cache):
    shards = list(cache.read_shards("texts", ("features", "valid", "error")))
    assert [start for start, _ in shards] == [0, 16, 32, 48, 64, 80, 96]
    for field in ("features", "valid"):
        joined = np.concatenate([arrays[field] for _, arrays in shards])
        assert np.array_equal(joined, cache.read("texts", slice(0, 100), field))
    assert all(isinstance(text, str) for _, arrays in shards for text in arrays["error"])
    assert cache.manifest["libraries"]["h5py"] == h5py_version() == h5py.__version__


def test_a_missing_dataset_is_refused_in_one_line(cache):
    with h5py.File(cache.path / "images" / "shard-00001.h5", "r+") as shard:
        del shard["valid"]
    with pytest.raises(VlmcacheError, match=r"shard-00001.h5: has no 'valid' dataset; run vlmcache verify"):
        list(cache.read_shards("images", ("valid",)))
    with pytest.raises(VlmcacheError, match=r"shard-00000.h5: has no 'tokens' dataset; re-extract with .* --tokens"):
        list(cache.read_shards("images", ("tokens",)))


def test_a_truncated_shard_is_one_line_naming_it_for_every_reader(cache):
    shard = cache.path / "images" / "shard-00002.h5"
    truncate(shard)
    readers = {"read": lambda: cache.read("images", slice(0, 50)),
               "read_shards": lambda: list(cache.read_shards("images")),
               "iter_shards": lambda: list(cache.iter_shards("images")),
               "open_cache": lambda: open_cache(cache.path)}
    for name, reader in readers.items():
        with pytest.raises(VlmcacheError) as raised:
            reader()
        message = str(raised.value)
        assert message.startswith(f"{shard}: ") and "run vlmcache verify" in message and "\n" not in message, name


def test_a_truncated_index_is_one_line_saying_to_extract_again(cache):
    truncate(cache.path / "index.h5")
    with pytest.raises(VlmcacheError, match=r"index.h5: unreadable or corrupt \(.*\); delete it and run the same "
                                             "vlmcache extract"):
        open_cache(cache.path)


def test_a_truncated_shard_being_extended_says_to_delete_it(cache):
    shard = cache.path / "texts" / "shard-00000.h5"
    truncate(shard)
    arrays = {"features": np.zeros((16, 8), np.float32), "valid": np.ones(16, bool), "error": [""] * 16}
    with pytest.raises(VlmcacheError, match=r"shard-00000.h5: corrupt shard \(.*\); delete it and run the same extract"):
        write_or_extend_shard(shard, 0, cache.provenance["texts"], arrays)
