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
                          noise: float = 1.0, seed: int = 0, dtype: str = "float16",
                          extra_image_sets: dict[str, float] | None = None,
                          extra_text_sets: dict[str, float] | None = None) -> Path:
    """Write a complete synthetic cache of `images` train + `val_images` val images (see the module docstring).

    `extra_image_sets`/`extra_text_sets` (name → noise) add further feature sets of the same rows (`dim`- and
    `text_dim`-wide), each another fixed random map of the same latents plus its own noise level, so a set with
    less noise shares more structure with the other side. Features are generated shard by shard, so writing
    needs memory for one shard, not the cache.
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
    widths = {"images": dim, "texts": text_dim}
    specs = [("images", "synthetic-images", noise), ("texts", "synthetic-texts", noise),
             *[("images", name, level) for name, level in (extra_image_sets or {}).items()],
             *[("texts", name, level) for name, level in (extra_text_sets or {}).items()]]
    sets = [PendingSet(modality, name, None, "synthetic", _provenance(modality, name, widths[modality], level, seed,
                                                                      dtype, shard_size, fingerprint))
            for modality, name, level in specs]
    provenance = {modality: sets[index].provenance for index, modality in enumerate(MODALITIES)}
    manifest = {"format_version": FORMAT_VERSION, "status": "incomplete", "created": now_iso(),
                "dataset": {"format": "synthetic", "root": str(out.resolve()), "fingerprint": fingerprint,
                            "images": total, "captions": len(caption_image), "splits": dataset.split_counts(),
                            "limit_per_split": None},
                "provenance": provenance, "libraries": {"python": platform.python_version(), "numpy": np.__version__,
                                                        "h5py": h5py_version()}}
    out.mkdir(parents=True, exist_ok=True)
    with FolderLock(out, "synthetic cache"):
        prepare_cache(out, dataset, manifest, sets, overwrite=True)
        plans = {"images": shard_ranges(total, shard_size), "texts": shard_ranges(len(caption_image), shard_size)}
        # The default sets draw their maps and noise from the streams they always used, so existing caches
        # (and the tests built on them) stay bit for bit the same; each further set has streams of its own.
        maps = np.random.default_rng([seed, 2])
        default_maps = [maps.standard_normal((LATENT, widths[m])).astype(np.float32) / np.sqrt(LATENT) for m in MODALITIES]
        for number, (chosen, (_, _, level)) in enumerate(zip(sets, specs, strict=True)):
            stream = [seed] if number < len(MODALITIES) else [seed, 6, number]
            feature_map = default_maps[number] if number < len(MODALITIES) else np.random.default_rng(
                [*stream, 2]).standard_normal((LATENT, widths[chosen.modality])).astype(np.float32) / np.sqrt(LATENT)
            _write_set(out / chosen.folder, chosen, plans[chosen.modality], caption_image, feature_map,
                       (stream, seed, level))
        finalize_cache(out, manifest, plans, sets, ExtractResult(out, total, len(caption_image), 0, 0))
    return out


def _provenance(modality: str, name: str, width: int, noise: float, seed: int, dtype: str, shard_size: int,
                fingerprint: str) -> dict:
    encoder = {"name": name, "pooling": "none", "dim": width, "precision": dtype,
               "weights_sha256": f"synthetic seed {seed} noise {noise}",
               **({"max_length": None, "tokenizer": None} if modality == "texts" else {})}
    return {"encoder": encoder, "dataset_fingerprint": fingerprint, "dtype": dtype, "tokens": False,
            "shard_size": shard_size, "compute_path": "synthetic"}


def _write_set(folder: Path, chosen: PendingSet, plan: list[tuple[int, int]], caption_image: np.ndarray,
               feature_map: np.ndarray, noise: tuple[list[int], int, float]) -> None:
    """Every shard of one set: `feature_map` of each row's latent (its image's, for a caption) plus noise.

    `noise`: (the set's random stream, the cache seed that fixes the latents, the noise level)."""
    stream, seed, level = noise
    width, images = feature_map.shape[1], chosen.modality == "images"
    for number, (start, stop) in enumerate(plan):
        if images:
            latent = _latents(seed, start, stop)
        else:
            owners = caption_image[start:stop]
            first = int(owners[0]) if len(owners) else 0
            latent = _latents(seed, first, int(owners[-1]) + 1)[owners - first]
        features = latent @ feature_map + level * np.random.default_rng(
            [*stream, 3 if images else 4, number]).standard_normal((stop - start, width), dtype=np.float32)
        _write(folder / shard_name(number), start, chosen.provenance, features, images)


def _latents(seed: int, start: int, stop: int) -> np.ndarray:
    """The latents of image rows [start, stop), generated in fixed blocks so any range reads the same values."""
    block = 4096
    parts = [np.random.default_rng([seed, 5, b]).standard_normal((block, LATENT), dtype=np.float32)
             for b in range(start // block, (stop - 1) // block + 1)]
    joined = np.concatenate(parts) if parts else np.zeros((0, LATENT), np.float32)
    offset = (start // block) * block
    return joined[start - offset:stop - offset]


def _write(path: Path, start: int, provenance: dict, features: np.ndarray, images: bool) -> None:
    rows = len(features)
    arrays = {"features": features, "valid": np.ones(rows, bool), "error": [""] * rows}
    if not images:
        arrays["truncated"] = np.zeros(rows, bool)
    write_shard(path, start, provenance, arrays, provenance["dtype"])
