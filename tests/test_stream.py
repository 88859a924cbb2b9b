"""Streaming reader: epoch coverage, determinism, exact resume, bounded windows, ranks, errors, thread shutdown."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from vlmcache.cache.store import open_cache
from vlmcache.cache.stream import ShardStream
from vlmcache.data.synthetic import write_synthetic_cache
from vlmcache.errors import VlmcacheError


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = write_synthetic_cache(tmp_path_factory.mktemp("stream") / "cache", 1000, val_images=200,
                                 captions_per_image=(1, 4), dim=16, text_dim=8, shard_size=128)
    return open_cache(path)


def rows_of(batches, split):
    """Split-local (image row, caption row) of every streamed pair, found by matching features exactly."""
    image_row = {split.image_features[i].tobytes(): i for i in range(len(split.image_features))}
    caption_row = {split.text_features[j].tobytes(): j for j in range(len(split.text_features))}
    images = [image_row[row.numpy().tobytes()] for batch in batches for row in batch.images]
    captions = [caption_row[row.numpy().tobytes()] for batch in batches for row in batch.texts]
    return np.asarray(images), np.asarray(captions)


def test_an_epoch_pairs_every_image_once_with_one_of_its_own_captions(cache):
    split = cache.split("train")
    stream = ShardStream(cache, "train", 64, seed=3, buffer=256)
    batches = list(stream.epoch(0))
    assert [len(b.images) for b in batches] == [64] * 15 + [40] and stream.steps_per_epoch(0) == 16
    images, captions = rows_of(batches, split)
    assert sorted(images.tolist()) == list(range(1000))
    assert (split.caption_image[captions] == images).all()
    assert all(b.image_ids is None for b in batches)


def test_caption_sampling_visits_every_caption_once_with_image_ids(cache):
    split = cache.split("train")
    batches = list(ShardStream(cache, "train", 100, seed=0, buffer=256, sampling="caption").epoch(0))
    images, captions = rows_of(batches, split)
    assert sorted(captions.tolist()) == list(range(len(split.text_features)))
    assert (torch.cat([b.image_ids for b in batches]).numpy() == images).all()


def test_same_seed_same_batches_other_seed_or_epoch_other_order(cache):
    def first(seed, epoch):
        return next(iter(ShardStream(cache, "train", 32, seed=seed, buffer=256).epoch(epoch))).images

    assert torch.equal(first(0, 0), first(0, 0))
    assert not torch.equal(first(0, 0), first(1, 0)) and not torch.equal(first(0, 0), first(0, 1))


@pytest.mark.parametrize("start", [1, 5, 7, 15])
def test_resume_mid_epoch_gives_exactly_the_remaining_batches(cache, start):
    stream = ShardStream(cache, "train", 64, seed=5, buffer=200)
    whole = list(stream.epoch(2))
    resumed = list(stream.epoch(2, start=start))
    assert len(resumed) == len(whole) - start
    for a, b in zip(whole[start:], resumed, strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.texts, b.texts)


def test_a_batch_only_mixes_images_from_the_shards_of_its_window(cache):
    # buffer = one shard: a batch holds images of at most two shards (one window and the start of the next).
    split = cache.split("train")
    batches = list(ShardStream(cache, "train", 32, seed=0, buffer=128).epoch(0))
    image_row = {split.image_features[i].tobytes(): i for i in range(len(split.image_features))}
    shards = [{image_row[r.numpy().tobytes()] // 128 for r in b.images} for b in batches]
    assert max(len(s) for s in shards) <= 2
    # In memory (buffer ≥ split) batches draw from nearly every shard.
    whole = list(ShardStream(cache, "train", 32, seed=0, buffer=1000).epoch(0))
    assert max(len({image_row[r.numpy().tobytes()] // 128 for r in b.images}) for b in whole) >= 6


def test_ranks_read_disjoint_shards_and_take_equal_full_batches(cache):
    split = cache.split("train")
    ranks = [ShardStream(cache, "train", 32, seed=1, buffer=128, rank=r, world=2) for r in range(2)]
    steps = ranks[0].steps_per_epoch(0)
    assert steps == ranks[1].steps_per_epoch(0) == min(r.rows_per_epoch(0) // 32 for r in ranks)
    seen = []
    for stream in ranks:
        batches = list(stream.epoch(0))
        assert len(batches) == steps and all(len(b.images) == 32 for b in batches)
        seen.append(set(rows_of(batches, split)[0].tolist()))
    assert not seen[0] & seen[1]
    assert {i // 128 for i in seen[0]}.isdisjoint({i // 128 for i in seen[1]})
    assert len(seen[0] | seen[1]) >= 1000 - 2 * 31


def test_val_split_and_extra_fields(cache):
    split = cache.split("val")
    stream = ShardStream(cache, "val", 50, seed=0, extra_fields={"texts": ("valid",)})
    batches = list(stream.epoch(0))
    images, captions = rows_of(batches, split)
    assert sorted(images.tolist()) == list(range(200)) and (split.caption_image[captions] == images).all()
    assert all(b.extra["texts.valid"].dtype == torch.bool and len(b.extra["texts.valid"]) == len(b.texts) for b in batches)


def test_a_shard_missing_mid_stream_is_named_and_the_thread_ends(tmp_path):
    path = write_synthetic_cache(tmp_path / "cache", 600, dim=8, shard_size=100)
    stream = ShardStream(open_cache(path), "train", 50, seed=0, buffer=100)
    order = [w[0] for w in stream.windows(0)]
    (path / "images" / f"shard-{order[2]:05d}.h5").unlink()
    batches = stream.epoch(0)
    assert len([next(batches) for _ in range(4)]) == 4  # the first two windows were whole
    with pytest.raises(VlmcacheError, match=f"shard-{order[2]:05d}.h5: shard missing mid-stream.*vlmcache verify"):
        list(batches)
    assert not [t for t in threading.enumerate() if t.name == "vlmcache-stream"]


def test_closing_the_iterator_stops_the_reader_thread(cache):
    batches = ShardStream(cache, "train", 16, seed=0, buffer=128, prefetch=1).epoch(0)
    next(batches)
    assert any(t.name == "vlmcache-stream" for t in threading.enumerate())
    batches.close()
    assert not [t for t in threading.enumerate() if t.name == "vlmcache-stream"]
