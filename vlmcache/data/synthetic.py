"""Synthetic feature caches for tests and scale benchmarks, written through the real store API.

Each image has a hidden latent z (64-d, standard normal); its image features are one fixed random
linear map of z plus noise, each of its captions another fixed map of the same z plus its own noise.
So image and text features share structure a projector can learn (a linear pair recovers z), while
any single feature row is noisy. The result is an ordinary cache: index.h5, manifest.json and
fletcher32-checked HDF5 shards, readable by `open_cache`, `train`, `eval` and `search`.
"""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np

from vlmcache.cache.hdf5 import h5py_version
from vlmcache.cache.layout import MODALITIES
from vlmcache.cache.store import FORMAT_VERSION, now_iso, shard_name, shard_ranges, write_shard
from vlmcache.cache.writer import ExtractResult, PendingSet, finalize_cache, prepare_cache
from vlmcache.data.datasets import PairDataset
from vlmcache.errors import VlmcacheError
from vlmcache.files import FolderLock

LATENT = 64


def synthetic_captions(images: int, captions_per_image: int | tuple[int, int], seed: int) -> np.ndarray:
    """caption → image index: a fixed count per image, or a count drawn from [low, high] per image (≥ 1)."""
    if isinstance(captions_per_image, int):
        return np.repeat(np.arange(images, dtype=np.int64), captions_per_image)
    low, high = captions_per_image
    counts = np.random.default_rng([seed, 1]).integers(low, high + 1, images)
    return np.repeat(np.arange(images, dtype=np.int64), counts)


def write_synthetic_cache(out: str | Path, images: int, *, val_images: int = 0, captions_per_image: int | tuple = 1,
                          dim: int = 512, text_dim: int | None = None, shard_size: int = 65_536,
                          noise: float = 1.0, seed: int = 0, dtype: str = "float16") -> Path:
    """Write a complete synthetic cache of `images` train + `val_images` val images (see the module docstring).

    Features are generated shard by shard, so writing needs memory for one shard, not the cache.
    """
    out, text_dim = Path(out), text_dim or dim
    if images < 1 or val_images < 0:
        raise VlmcacheError("synthetic cache: give at least one train image")
    total = images + val_images
    caption_image = synthetic_captions(total, captions_per_image, seed)
    dataset = PairDataset(
        format="synthetic", root=out.resolve(), image_paths=[f"synthetic/{i:09d}.jpg" for i in range(total)],
        image_ids=[f"{i:09d}" for i in range(total)], image_splits=["train"] * images + ["val"] * val_images,
        captions=[f"synthetic caption {j}" for j in range(len(caption_image))], caption_image=caption_image)
    fingerprint = dataset.fingerprint()
    provenance = {modality: {"encoder": {"name": f"synthetic-{modality}", "pooling": "none", "dim": width,
                                         "precision": dtype, "weights_sha256": f"synthetic seed {seed} noise {noise}",
                                         **({"max_length": None, "tokenizer": None} if modality == "texts" else {})},
                             "dataset_fingerprint": fingerprint, "dtype": dtype, "tokens": False,
                             "shard_size": shard_size, "compute_path": "synthetic"}
                  for modality, width in (("images", dim), ("texts", text_dim))}
    manifest = {"format_version": FORMAT_VERSION, "status": "incomplete", "created": now_iso(),
                "dataset": {"format": "synthetic", "root": str(out.resolve()), "fingerprint": fingerprint,
                            "images": total, "captions": len(caption_image), "splits": dataset.split_counts(),
                            "limit_per_split": None},
                "provenance": provenance, "libraries": {"python": platform.python_version(), "numpy": np.__version__,
                                                        "h5py": h5py_version()}}
    maps = np.random.default_rng([seed, 2])
    image_map = maps.standard_normal((LATENT, dim)).astype(np.float32) / np.sqrt(LATENT)
    text_map = maps.standard_normal((LATENT, text_dim)).astype(np.float32) / np.sqrt(LATENT)
    out.mkdir(parents=True, exist_ok=True)
    with FolderLock(out, "synthetic cache"):
        sets = [PendingSet(modality, provenance[modality]["encoder"]["name"], None, "synthetic", provenance[modality])
                for modality in MODALITIES]
        prepare_cache(out, dataset, manifest, sets, overwrite=True)
        plans = {"images": shard_ranges(total, shard_size), "texts": shard_ranges(len(caption_image), shard_size)}
        for number, (start, stop) in enumerate(plans["images"]):
            latent = _latents(seed, start, stop)
            features = latent @ image_map + noise * np.random.default_rng([seed, 3, number]).standard_normal(
                (stop - start, dim), dtype=np.float32)
            _write(out / "images" / shard_name(number), start, provenance["images"], features, dtype)
        for number, (start, stop) in enumerate(plans["texts"]):
            owners = caption_image[start:stop]
            first = int(owners[0]) if len(owners) else 0
            latent = _latents(seed, first, int(owners[-1]) + 1)[owners - first]
            features = latent @ text_map + noise * np.random.default_rng([seed, 4, number]).standard_normal(
                (stop - start, text_dim), dtype=np.float32)
            _write(out / "texts" / shard_name(number), start, provenance["texts"], features, dtype)
        finalize_cache(out, manifest, plans, sets, ExtractResult(out, total, len(caption_image), 0, 0))
    return out


def _latents(seed: int, start: int, stop: int) -> np.ndarray:
    """The latents of image rows [start, stop), generated in fixed blocks so any range reads the same values."""
    block = 4096
    parts = [np.random.default_rng([seed, 5, b]).standard_normal((block, LATENT), dtype=np.float32)
             for b in range(start // block, (stop - 1) // block + 1)]
    joined = np.concatenate(parts) if parts else np.zeros((0, LATENT), np.float32)
    offset = (start // block) * block
    return joined[start - offset:stop - offset]


def _write(path: Path, start: int, provenance: dict, features: np.ndarray, dtype: str) -> None:
    rows = len(features)
    arrays = {"features": features, "valid": np.ones(rows, bool), "error": [""] * rows}
    if path.parent.name == "texts":
        arrays["truncated"] = np.zeros(rows, bool)
    write_shard(path, start, provenance, arrays, dtype)
