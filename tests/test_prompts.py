"""The prompt store: prompts encoded once, appended, a truncated tail ignored, bounded growth."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest

from vlmcache import open_cache
from vlmcache.encode.prompts import PromptStore

REPO = Path(__file__).resolve().parents[1]
ablate_module = importlib.import_module("vlmcache.align.ablate")  # `vlmcache.ablate` is the function
train_module = importlib.import_module("vlmcache.align.train")





# --- the prompt store ----------------------------------------------------------------------------------------------


@pytest.fixture
def counted_encoder(monkeypatch) -> list[list[str]]:
    """Each call of the frozen text encoder (whichever kind the store loads), with the prompts it was given."""
    calls: list[list[str]] = []
    loaded = PromptStore.encoder

    class Counting:
        def __init__(self, encoder):
            self.encoder = encoder

        def encode(self, texts, *args, **kwargs):
            calls.append(list(texts))
            return self.encoder.encode(texts, *args, **kwargs)

    monkeypatch.setattr(PromptStore, "encoder", property(lambda store: Counting(loaded.fget(store))))
    return calls


def test_prompt_store_encodes_once_and_appends(vit_cache, tmp_path, counted_encoder):
    provenance = open_cache(vit_cache).provenance["texts"]["encoder"]
    store = PromptStore(provenance, tmp_path)
    record = PromptStore(provenance, None).record.itemsize  # key, features and check
    first = store.encode(["a dog", "a cat", "a dog"])
    assert counted_encoder == [["a dog", "a cat"]] and first.shape == (3, 32) and np.array_equal(first[0], first[2])
    assert store.path.stat().st_size == 2 * record
    before, inode = store.path.read_bytes(), store.path.stat().st_ino
    again = store.encode(["a cat", "a dog"])
    assert len(counted_encoder) == 1 and np.array_equal(again, first[[1, 0]])  # no encoder call for known prompts
    store.encode(["a car", "a dog"])
    assert counted_encoder[-1] == ["a car"]
    # Appended: the first two records are untouched bytes of the same file, plus exactly one record.
    assert store.path.stat().st_size == 3 * record and store.path.stat().st_ino == inode
    assert store.path.read_bytes()[:2 * record] == before
    # Another process reads them back without the encoder.
    reloaded = PromptStore(provenance, tmp_path)
    assert np.array_equal(reloaded.encode(["a dog", "a cat", "a car"]), store.encode(["a dog", "a cat", "a car"]))
    assert len(counted_encoder) == 2


def test_prompt_store_ignores_a_truncated_tail_and_keeps_appending(vit_cache, tmp_path, counted_encoder):
    provenance = open_cache(vit_cache).provenance["texts"]["encoder"]
    record = PromptStore(provenance, None).record.itemsize  # key, features and check
    store = PromptStore(provenance, tmp_path)
    features = store.encode(["a dog", "a cat"])
    with open(store.path, "ab") as handle:  # a record cut short by a kill: its key and half its features
        handle.write(store.path.read_bytes()[:32 + 2 * provenance["dim"]])
    reloaded = PromptStore(provenance, tmp_path)
    assert len(reloaded.known) == 2
    assert np.array_equal(reloaded.encode(["a dog", "a cat"]), features) and len(counted_encoder) == 1
    reloaded.encode(["a bird"])  # appended after the cut: must be read back, not misaligned by the tail
    third = PromptStore(provenance, tmp_path)
    assert len(third.known) == 3 and store.path.stat().st_size == 3 * record
    third.encode(["a bird", "a dog"])
    assert len(counted_encoder) == 2


def test_prompt_store_stops_growing_at_max_rows(vit_cache, tmp_path, counted_encoder):
    provenance = open_cache(vit_cache).provenance["texts"]["encoder"]
    record = PromptStore(provenance, None).record.itemsize  # key, features and check
    store = PromptStore(provenance, tmp_path, max_rows=3)
    prompts = ["one", "two", "three", "four", "five"]
    features = store.encode(prompts)
    assert features.shape == (5, 32) and store.path.stat().st_size == 3 * record and len(store.known) == 3
    unbounded = PromptStore(provenance, None)  # no file: the same features for all five
    assert np.allclose(unbounded.encode(prompts), features, atol=1e-6)
    store.encode(["six"])
    assert store.path.stat().st_size == 3 * record
    assert len(PromptStore(provenance, tmp_path, max_rows=3).known) == 3


