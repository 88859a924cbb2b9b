"""The feature cache on disk: sharded HDF5 plus a JSON manifest, and the reader every other module uses.

Layout of a cache folder:

    manifest.json          provenance (dataset fingerprint, encoders, store settings, library versions),
                           status "incomplete" while extracting and "complete" after, shard list,
                           skipped items with reasons, truncated-caption count
    index.h5               image ids, paths, splits, labels/classes; captions, caption→image index
    images/shard-NNNNN.h5  rows [N*shard_size, (N+1)*shard_size) of the image rows
    texts/shard-NNNNN.h5   the same for caption rows

Each shard holds `features` (rows, dim) in the cache dtype, `valid` (rows,) bool, `error` (rows,)
strings ("" when fine), for texts `truncated` (rows,) bool, optionally `tokens`/`token_mask`, and the
attributes `row_start`, `rows` and `provenance` (JSON, the same as the manifest's for that modality).
Row order is the dataset's (see vlmcache.datasets). A shard is written to a temporary name and renamed
when complete, so a shard file that exists is whole.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import h5py
import numpy as np
import torch

from vlmcache.errors import VlmcacheError

MODALITIES = ("images", "texts")
FORMAT_VERSION = 1
_STRING = h5py.string_dtype("utf-8")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.h5"


def shard_ranges(rows: int, shard_size: int) -> list[tuple[int, int]]:
    """The [start, stop) row range of each shard."""
    return [(start, min(start + shard_size, rows)) for start in range(0, rows, shard_size)]


def write_json_atomic(path: Path, value: dict) -> None:
    """Write JSON to a temporary name, then rename: readers never see half a file."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(json.dumps(value, indent=2, ensure_ascii=False))
    os.replace(temporary, path)


def write_shard(path: Path, row_start: int, provenance: dict, arrays: dict[str, np.ndarray], dtype: str) -> None:
    """Write one complete shard atomically (temporary name, fsync, rename).

    `arrays` holds features, valid, error (list of str) and optionally truncated, tokens, token_mask.
    Features and tokens are stored in `dtype` ("float16" or "float32").
    """
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with h5py.File(temporary, "w", track_order=True) as shard:
        shard.attrs["row_start"] = row_start
        shard.attrs["rows"] = len(arrays["valid"])
        shard.attrs["provenance"] = json.dumps(provenance, sort_keys=True)
        for name, value in arrays.items():
            if name == "error":
                shard.create_dataset(name, data=np.asarray(value, dtype=object), dtype=_STRING)
            elif name in ("features", "tokens"):
                shard.create_dataset(name, data=np.asarray(value, dtype=dtype))
            else:
                shard.create_dataset(name, data=np.asarray(value))
        shard.flush()
        os.fsync(shard.id.get_vfd_handle())
    os.replace(temporary, path)


def write_index(path: Path, dataset) -> None:
    """Write the dataset's metadata (ids, paths, captions, splits, labels) atomically."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with h5py.File(temporary, "w") as index:
        index.create_dataset("image_id", data=np.asarray(dataset.image_ids, dtype=object), dtype=_STRING)
        index.create_dataset("image_path", data=np.asarray(dataset.image_paths, dtype=object), dtype=_STRING)
        index.create_dataset("image_split", data=np.asarray(dataset.image_splits, dtype=object), dtype=_STRING)
        index.create_dataset("caption", data=np.asarray(dataset.captions, dtype=object), dtype=_STRING)
        index.create_dataset("caption_image", data=dataset.caption_image)
        if dataset.image_labels is not None:
            index.create_dataset("image_label", data=dataset.image_labels)
            index.attrs["classes"] = json.dumps(dataset.classes)
    os.replace(temporary, path)


class CacheLock:
    """A lock file that stops two extracts writing one cache; a lock left by a dead process is taken over."""

    def __init__(self, folder: Path):
        self.path = folder / ".lock"
        self.held = False

    def __enter__(self) -> CacheLock:
        for _ in range(2):
            try:
                handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and _alive(owner):
                    raise VlmcacheError(f"{self.path.parent}: another extract (pid {owner}) is writing this cache; "
                                        f"wait for it, or delete {self.path} if that process is gone") from None
                self.path.unlink(missing_ok=True)  # stale: its process died (e.g. kill -9)
                continue
            os.write(handle, str(os.getpid()).encode())
            os.close(handle)
            self.held = True
            return self
        raise VlmcacheError(f"{self.path}: could not take the cache lock")

    def _owner(self) -> int | None:
        try:
            return int(self.path.read_text().strip())
        except (OSError, ValueError):
            return None

    def __exit__(self, *exc) -> None:
        if self.held:  # never remove a lock another process holds
            self.path.unlink(missing_ok=True)
            self.held = False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Split:
    """One split's features in memory, rows whose image or caption was skipped already dropped.

    `caption_image[j]` is the row in `image_features` of caption j's image. Images keep their order,
    captions keep theirs; every caption's image is present.
    """

    name: str
    image_features: np.ndarray  # (images, image_dim) float32
    text_features: np.ndarray  # (captions, text_dim) float32
    caption_image: np.ndarray  # (captions,) int64
    image_ids: list[str]
    image_paths: list[str]
    captions: list[str]
    image_labels: np.ndarray | None

    def torch(self, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image features, text features, caption→image) as tensors on `device`."""
        return (torch.from_numpy(self.image_features).to(device), torch.from_numpy(self.text_features).to(device),
                torch.from_numpy(self.caption_image).to(device))


class FeatureCache:
    """Read access to a complete cache folder. Use `open_cache(path)`."""

    def __init__(self, path: Path):
        self.path = path
        manifest_path = path / "manifest.json"
        if not manifest_path.exists():
            raise VlmcacheError(f"{path}: not a vlmcache cache (no manifest.json); run vlmcache extract first")
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise VlmcacheError(f"{manifest_path}: cache format {self.manifest.get('format_version')} is not "
                                f"{FORMAT_VERSION}; re-extract with this vlmcache")
        if self.manifest.get("status") != "complete":
            raise VlmcacheError(f"{path}: extraction is incomplete; run the same vlmcache extract again to finish it")
        for modality in MODALITIES:
            for entry in self.manifest["shards"][modality]:
                shard_path = path / modality / entry["file"]
                if not shard_path.exists():
                    raise VlmcacheError(f"{shard_path}: shard missing; re-run vlmcache extract on this cache")
                with h5py.File(shard_path, "r") as shard:
                    if json.loads(shard.attrs["provenance"]) != self.provenance[modality]:
                        raise VlmcacheError(f"{shard_path}: made by a different encoder or dataset than the "
                                            "manifest says (mixed caches); re-extract with --overwrite")

    @property
    def provenance(self) -> dict:
        """Per modality: encoder provenance plus dataset fingerprint and store dtype."""
        return self.manifest["provenance"]

    @property
    def fingerprint(self) -> str:
        return self.manifest["dataset"]["fingerprint"]

    @property
    def image_dim(self) -> int:
        return int(self.provenance["images"]["encoder"]["dim"])

    @property
    def text_dim(self) -> int:
        return int(self.provenance["texts"]["encoder"]["dim"])

    @cached_property
    def index(self) -> dict:
        """The dataset metadata from index.h5, read once."""
        with h5py.File(self.path / "index.h5", "r") as index:
            data = {key: index[key].asstr()[()].tolist() if index[key].dtype.kind == "O" else index[key][()]
                    for key in index}
            data["classes"] = json.loads(index.attrs.get("classes", "[]"))
        return data

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["dataset"]["splits"])

    @property
    def classes(self) -> list[str]:
        return self.index["classes"]

    def split_rows(self, split: str) -> tuple[slice, slice]:
        """The contiguous (image rows, caption rows) of a split."""
        if split not in self.manifest["dataset"]["splits"]:
            raise VlmcacheError(f"{self.path}: has no split {split!r}; it has {', '.join(self.splits)}")
        image_split = np.asarray(self.index["image_split"])
        image_rows = np.flatnonzero(image_split == split)
        caption_rows = np.flatnonzero(np.isin(self.index["caption_image"], image_rows))
        return (slice(int(image_rows[0]), int(image_rows[-1]) + 1),
                slice(int(caption_rows[0]), int(caption_rows[-1]) + 1) if len(caption_rows) else slice(0, 0))

    def read(self, modality: str, rows: slice, field: str = "features") -> np.ndarray:
        """Rows [start, stop) of one field of a modality, read shard by shard (contiguous reads)."""
        parts = []
        for entry in self.manifest["shards"][modality]:
            start, stop = entry["row_start"], entry["row_start"] + entry["rows"]
            lo, hi = max(start, rows.start), min(stop, rows.stop)
            if lo < hi:
                with h5py.File(self.path / modality / entry["file"], "r") as shard:
                    if field not in shard:
                        raise VlmcacheError(f"{self.path}: has no {field!r} for {modality}; extract with --tokens")
                    parts.append(shard[field][lo - start:hi - start])
        if not parts:
            return np.zeros((0,), dtype=np.float32)
        return np.concatenate(parts)

    def iter_shards(self, modality: str):
        """Lazy access: yield (row_start, open h5py shard) one shard at a time."""
        for entry in self.manifest["shards"][modality]:
            with h5py.File(self.path / modality / entry["file"], "r") as shard:
                yield entry["row_start"], shard

    def split(self, name: str) -> Split:
        """Load a whole split into memory as float32, dropping skipped images and captions."""
        image_rows, caption_rows = self.split_rows(name)
        image_valid = self.read("images", image_rows, "valid").astype(bool)
        images = self.read("images", image_rows).astype(np.float32)
        caption_image = np.asarray(self.index["caption_image"][caption_rows]) - image_rows.start
        if caption_rows.stop > caption_rows.start:
            texts = self.read("texts", caption_rows).astype(np.float32)
            caption_valid = self.read("texts", caption_rows, "valid").astype(bool) & image_valid[caption_image]
        else:
            texts, caption_valid = np.zeros((0, self.text_dim), np.float32), np.zeros(0, bool)
        # Renumber images after dropping skipped ones so caption_image points into the kept rows.
        new_row = np.cumsum(image_valid) - 1
        labels = self.index.get("image_label")
        return Split(
            name=name,
            image_features=images[image_valid],
            text_features=texts[caption_valid],
            caption_image=new_row[caption_image[caption_valid]].astype(np.int64),
            image_ids=[i for i, ok in zip(self.index["image_id"][image_rows], image_valid, strict=True) if ok],
            image_paths=[p for p, ok in zip(self.index["image_path"][image_rows], image_valid, strict=True) if ok],
            captions=[c for c, ok in zip(self.index["caption"][caption_rows], caption_valid, strict=True) if ok],
            image_labels=None if labels is None else np.asarray(labels[image_rows])[image_valid],
        )


def open_cache(path: str | Path) -> FeatureCache:
    """Open a complete feature cache folder for reading (checks manifest and every shard's provenance)."""
    path = Path(path)
    if not path.is_dir():
        raise VlmcacheError(f"{path}: no such cache folder; run vlmcache extract first")
    return FeatureCache(path)


def check_same_dataset(first: FeatureCache, second: FeatureCache) -> None:
    """Refuse to combine caches of different data (different ids, captions or splits)."""
    if first.fingerprint != second.fingerprint:
        raise VlmcacheError(f"{first.path} and {second.path}: built from different datasets (fingerprints "
                            f"{first.fingerprint[:12]} vs {second.fingerprint[:12]}); extract both from the same data")


def differences(first: dict, second: dict, prefix: str = "") -> list[str]:
    """Dotted paths of the keys whose values differ between two nested dicts (sorted)."""
    found = []
    for key in sorted(set(first) | set(second)):
        a, b = first.get(key), second.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append(f"{prefix}{key}")
    return found


def check_same_encoders(first: FeatureCache, second: FeatureCache) -> None:
    """Refuse to mix features from different encoders (name, weights, pooling or preprocessing)."""
    for modality in MODALITIES:
        differing = differences(first.provenance[modality]["encoder"], second.provenance[modality]["encoder"])
        if differing:
            raise VlmcacheError(f"{first.path} and {second.path}: {modality} encoders differ in "
                                f"{', '.join(differing)}; features from different encoders cannot be combined")


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
