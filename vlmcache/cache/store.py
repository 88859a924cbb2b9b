"""The feature cache on disk: sharded HDF5 plus a JSON manifest, and the reader every other module uses.

Layout of a cache folder:

    manifest.json          provenance (dataset fingerprint, encoders, store settings, library versions),
                           status "incomplete" while extracting and "complete" after, shard list,
                           skipped items with reasons, truncated-caption count
    index.h5               image ids, paths, splits, labels/classes; captions, caption→image index
    images/shard-NNNNN.h5  rows [N*shard_size, (N+1)*shard_size) of the image rows
    texts/shard-NNNNN.h5   the same for caption rows
    images@NAME/, texts@NAME/  more feature sets of the same rows (other encoders), same shard layout

The default set of each modality is the one in `images/` or `texts/`, described by the manifest's
`provenance` and `shards` exactly as caches without more sets are; every further set is recorded under
`feature_sets.<modality>.<name>` with its own `folder`, `provenance`, `status` and `shards`. A set is
named after its encoder (see `set_name`); a combination of sets is written NAME+NAME.

Each shard holds `features` (rows, dim) in the cache dtype, `valid` (rows,) bool, `error` (rows,)
strings ("" when fine), for texts `truncated` (rows,) bool, optionally `tokens`/`token_mask`, and the
attributes `row_start`, `rows` and `provenance` (JSON, the same as the manifest's for that modality).
Row order is the dataset's (see vlmcache.data.datasets). A shard is written to a temporary name and renamed
when complete, so a shard file that exists is whole.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import h5py
import numpy as np
import torch

from vlmcache.cache import query_encoder
from vlmcache.cache.hdf5 import read_hdf5
from vlmcache.cache.layout import MODALITIES, set_folder, set_name
from vlmcache.errors import VlmcacheError
from vlmcache.files import file_sha256, read_json_file, shape_error, write_bytes_atomic

FORMAT_VERSION = 1
_STRING = h5py.string_dtype("utf-8")

# What a manifest holds, checked when it is read (vlmcache.files.shape_error): a manifest whose values have
# other types is refused naming the key, before any of them is used.
ENCODER = {"name": str, "weights_sha256": str, "pooling": str, "dim": int}
PROVENANCE = {"encoder": ENCODER, "dtype": str, "tokens?": bool, "shard_size?": int, "dataset_fingerprint?": str,
              "compute_path?": str}
SHARDS = [{"file": str, "row_start": int, "rows": int, "sha256?": str}]
MANIFEST = {
    "format_version": int, "status": str,
    "dataset": {"fingerprint": str, "images": int, "captions": int, "format": str, "root": str,
                "splits": {str: {"images": int, "captions": int}}},
    "provenance": {"images": PROVENANCE, "texts": PROVENANCE},
    "shards?": {"images?": SHARDS, "texts?": SHARDS},
    "feature_sets?": {str: {str: {"folder": str, "provenance": PROVENANCE, "status": str, "shards?": SHARDS}}},
    "skipped?": [{"modality": str, "row": int, "item": str, "reason": str}],
    "truncated_captions?": int, "libraries?": {str: str}, "created?": str, "finished?": str, "index_sha256?": str,
}
COMPLETE_MANIFEST = {"shards": {"images": SHARDS, "texts": SHARDS}}
MANIFEST_HINT = "re-extract with --overwrite"
INDEX_HINT = "delete it and run the same vlmcache extract again to rewrite it"
RECOMPUTE = "delete it and run the same vlmcache extract again to recompute it"


def read_manifest(path: Path) -> dict:
    """A cache's manifest.json, refused in one line (naming the file and the key) when it is not JSON, is of
    another cache format, or holds a value of the wrong type. The one reader of manifests."""
    manifest = read_json_file(path, "manifest", MANIFEST_HINT, shape=dict)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise VlmcacheError(f"{path}: cache format {manifest.get('format_version')} is not {FORMAT_VERSION}; "
                            "re-extract with this vlmcache")
    if why := shape_error(manifest, MANIFEST) or _foreign_paths(manifest) or _uncounted_rows(manifest):
        raise VlmcacheError(f"{path}: not a valid manifest ({why}); {MANIFEST_HINT}")
    return manifest


def _foreign_paths(manifest: dict) -> str | None:
    """Why a manifest names a folder or shard file other than the cache's own (None if it does not): a name it
    records is compared with the name vlmcache gives, so no read ever leaves the cache folder."""
    listed = [(modality, manifest.get("shards", {}).get(modality) or []) for modality in MODALITIES]
    for modality, sets in manifest.get("feature_sets", {}).items():
        for name, entry in sets.items():
            if modality not in MODALITIES or entry["folder"] != set_folder(modality, name, False):
                return f"feature_sets.{modality}.{name}.folder is {entry['folder']!r}"
            listed.append((entry["folder"], entry.get("shards") or []))
    for folder, shards in listed:
        for number, entry in enumerate(shards):
            if entry["file"] != shard_name(number):
                return f"shard {number} of {folder}/ is named {entry['file']!r}, not {shard_name(number)!r}"
    return None


def _uncounted_rows(manifest: dict) -> str | None:
    """Why the per-split counts do not add up to the dataset's rows (None when they do): the splits' row ranges
    are computed from them."""
    dataset = manifest["dataset"]
    for rows in ("images", "captions"):
        counted = sum(counts[rows] for counts in dataset["splits"].values())
        if counted != dataset[rows] or any(counts[rows] < 0 for counts in dataset["splits"].values()):
            return f"dataset.splits hold {counted} {rows}, dataset.{rows} is {dataset[rows]}"
    return None


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.h5"


def shard_ranges(rows: int, shard_size: int) -> list[tuple[int, int]]:
    """The [start, stop) row range of each shard."""
    return [(start, min(start + shard_size, rows)) for start in range(0, rows, shard_size)]


@contextmanager
def hdf5_written_whole(path: Path, size_hint: int = 0, **options) -> Iterator[h5py.File]:
    """An HDF5 file built in memory, then written to `path` in one atomic, synced write when the block ends.

    The HDF5 library never writes to the disk itself: on a full disk it raised RuntimeErrors from half-closed
    files and could crash the interpreter (a segfault), where a plain write of the finished image fails
    cleanly (vlmcache.files.DiskFullError, naming the file and its size). The bytes are the same as a file
    written in place. `size_hint` (bytes) sizes the in-memory image up front, sparing regrowth copies.
    """
    block = max(1 << 16, size_hint + (1 << 16))
    # The name only identifies the in-memory file (no backing store); one writer per path (FolderLock).
    with h5py.File(f"{path}.in-memory", "w", driver="core", backing_store=False, block_size=block, **options) as file:
        yield file
        file.flush()
        image = file.id.get_file_image()
    write_bytes_atomic(path, image)


def write_shard(path: Path, row_start: int, provenance: dict, arrays: dict[str, np.ndarray], dtype: str) -> None:
    """Write one complete shard atomically (built in memory, then temporary name, fsync, rename).

    `arrays` holds features, valid, error (list of str) and optionally truncated, tokens, token_mask.
    Features and tokens are stored in `dtype` ("float16" or "float32"). Every numeric dataset carries
    HDF5's fletcher32 checksum per chunk, so flipped bytes fail the read instead of becoming features.
    """
    stored = sum(np.asarray(value).size * np.dtype(dtype).itemsize for name, value in arrays.items() if name != "error")
    with hdf5_written_whole(path, stored, track_order=True) as shard:
        shard.attrs["row_start"] = row_start
        shard.attrs["rows"] = len(arrays["valid"])
        shard.attrs["provenance"] = json.dumps(provenance, sort_keys=True)
        for name, value in arrays.items():
            if name == "error":
                shard.create_dataset(name, data=np.asarray(value, dtype=object), dtype=_STRING)
            else:
                data = np.asarray(value, dtype=dtype) if name in ("features", "tokens") else np.asarray(value)
                shard.create_dataset(name, data=data, fletcher32=True, chunks=_row_chunks(data.shape))


def _row_chunks(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Chunks of whole rows, about 1 MB (fp16): big enough that checksumming costs little on read."""
    row_size = max(1, int(np.prod(shape[1:])))
    return (max(1, min(shape[0], (1 << 19) // row_size)), *shape[1:]) if shape[0] else None


def write_index(path: Path, dataset) -> None:
    """Write the dataset's metadata (ids, paths, captions, splits, labels) atomically."""
    with hdf5_written_whole(path) as index:
        index.create_dataset("image_id", data=np.asarray(dataset.image_ids, dtype=object), dtype=_STRING)
        index.create_dataset("image_path", data=np.asarray(dataset.image_paths, dtype=object), dtype=_STRING)
        index.create_dataset("image_split", data=np.asarray(dataset.image_splits, dtype=object), dtype=_STRING)
        index.create_dataset("caption", data=np.asarray(dataset.captions, dtype=object), dtype=_STRING)
        # fletcher32: a flipped byte in a caption's image row or an image's label fails the read (strings cannot
        # carry HDF5 checksums: the manifest's index_sha256, checked by verify, covers the whole file)
        index.create_dataset("caption_image", data=dataset.caption_image, fletcher32=True)
        if dataset.image_labels is not None:
            index.create_dataset("image_label", data=dataset.image_labels, fletcher32=True)
            index.attrs["classes"] = json.dumps(dataset.classes)


def read_index(folder: Path) -> AbstractContextManager[h5py.File]:
    """The index.h5 of the cache folder `folder` opened for reading (see `read_hdf5`); a read error says to
    extract again, which rewrites a missing index."""
    return read_hdf5(folder / "index.h5", "run the same vlmcache extract again to rewrite it", "missing or unreadable")


@dataclass(frozen=True)
class FeatureSet:
    """One set of features of one modality: where its shards are and what made them."""

    modality: str
    name: str
    folder: str  # relative to the cache folder
    provenance: dict
    shards: list[dict]

    @property
    def dim(self) -> int:
        return int(self.provenance["encoder"]["dim"])





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
    # Token states (rows, T, C) in the cache dtype (fp16 by default: kept so in memory, made float32 per
    # batch by vlmcache.cache.tokens.token_batch) and their (rows, T) masks; None unless asked for.
    image_tokens: np.ndarray | None = None
    image_token_mask: np.ndarray | None = None
    text_tokens: np.ndarray | None = None
    text_token_mask: np.ndarray | None = None

    def torch(self, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image features, text features, caption→image) as tensors on `device`."""
        return (torch.from_numpy(self.image_features).to(device), torch.from_numpy(self.text_features).to(device),
                torch.from_numpy(self.caption_image).to(device))


class FeatureCache:
    """Read access to a complete cache folder. Use `open_cache(path)`."""

    def __init__(self, path: Path, check_shards: bool = True):
        self.path = path
        # Splits already read by load_features, when the owner keeps them (keep_loaded): an ablation grid reads
        # each input once per process instead of once per cell.
        self.loaded: dict[tuple, Split] | None = None
        manifest_path = path / "manifest.json"
        if not manifest_path.exists():
            raise VlmcacheError(f"{path}: not a vlmcache cache (no manifest.json); run vlmcache extract first")
        self.manifest = read_manifest(manifest_path)
        if self.manifest["status"] != "complete":
            raise VlmcacheError(f"{path}: extraction is incomplete; run the same vlmcache extract again to finish it")
        if why := shape_error(self.manifest, COMPLETE_MANIFEST):
            raise VlmcacheError(f"{manifest_path}: not a valid manifest ({why}); {MANIFEST_HINT}")
        for modality in MODALITIES:
            for feature_set in self.feature_sets(modality).values():
                if check_shards:
                    self._check_set(feature_set)
        self._check_index()  # a missing or corrupt index.h5 is reported up front

    def feature_sets(self, modality: str, all_statuses: bool = False) -> dict[str, FeatureSet]:
        """The complete feature sets of a modality by name, the default set first.

        `all_statuses=True` also lists sets still being extracted (for verify)."""
        default = self.provenance[modality]
        sets = {set_name(default["encoder"]["name"]): FeatureSet(modality, set_name(default["encoder"]["name"]),
                                                                 modality, default, self.manifest["shards"][modality])}
        for name, entry in self.manifest.get("feature_sets", {}).get(modality, {}).items():
            if entry["status"] == "complete" or all_statuses:
                sets[name] = FeatureSet(modality, name, entry["folder"], entry["provenance"], entry.get("shards") or [])
        return sets

    def feature_set(self, modality: str, name: str | None = None) -> FeatureSet:
        """One feature set by name (None: the default set); an unknown name lists the ones the cache holds."""
        sets = self.feature_sets(modality)
        if name is None:
            return next(iter(sets.values()))
        if name not in sets:
            option = "--image-features" if modality == "images" else "--text-features"
            raise VlmcacheError(f"{option} {name}: {self.path} has no such {modality[:-1]} feature set; it has "
                                f"{', '.join(sets)}")
        return sets[name]

    def _check_set(self, feature_set: FeatureSet) -> None:
        """Every shard of a set checks out, and together they hold exactly the dataset's rows."""
        if feature_set.provenance.get("dataset_fingerprint", self.fingerprint) != self.fingerprint:
            raise VlmcacheError(f"{self.path / feature_set.folder}: made from a different dataset than the cache's "
                                "index (fingerprints differ); re-extract that set")
        for entry in feature_set.shards:
            self._check_shard(feature_set.folder, entry, feature_set.provenance)
        expected = self.manifest["dataset"]["images" if feature_set.modality == "images" else "captions"]
        if sum(entry["rows"] for entry in feature_set.shards) != expected:
            raise VlmcacheError(f"{self.path / feature_set.folder}: its shards hold "
                                f"{sum(entry['rows'] for entry in feature_set.shards)} rows but the dataset has "
                                f"{expected}; re-run vlmcache extract on this cache")

    def _check_shard(self, folder: str, entry: dict, expected_provenance: dict | None = None) -> None:
        """A shard exists, opens, holds the rows the manifest says and was made by its set's encoder."""
        shard_path = self.path / folder / entry["file"]
        if not shard_path.exists():
            raise VlmcacheError(f"{shard_path}: shard missing; re-run vlmcache extract on this cache")
        with self.open_shard(shard_path, "unreadable shard") as shard:
            provenance = json.loads(shard.attrs["provenance"])
            rows = (int(shard.attrs["row_start"]), int(shard.attrs["rows"]))
        if provenance != (expected_provenance or self.provenance[folder]):
            raise VlmcacheError(f"{shard_path}: made by a different encoder or dataset than the "
                                "manifest says (mixed caches); re-extract with --overwrite")
        if rows != (entry["row_start"], entry["rows"]):
            raise VlmcacheError(f"{shard_path}: holds rows {rows[0]}+{rows[1]} but the manifest expects "
                                f"{entry['row_start']}+{entry['rows']} (a shard copied over another?); "
                                f"run vlmcache verify {self.path}")

    def default_split(self) -> str:
        """The split evaluated by default: 'test' when the cache has it (the Karpathy protocol), else 'val'."""
        return "test" if "test" in self.splits else "val"

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
        with read_index(self.path) as index:
            data = {key: index[key].asstr()[()].tolist() if index[key].dtype.kind == "O" else index[key][()]
                    for key in index}
            data["classes"] = json.loads(index.attrs.get("classes", "[]"))
        return data

    def _check_index(self) -> None:
        """index.h5 holds every dataset the manifest's counts call for, of the right kind and length, and every
        caption's image row and every image's label within range: refused in one line otherwise."""
        images, captions = self.manifest["dataset"]["images"], self.manifest["dataset"]["captions"]
        with read_hdf5(self.path / "index.h5", INDEX_HINT) as index:
            labelled = "image_label" in index
            classes = json.loads(index.attrs["classes"]) if labelled else []
            if shape_error(classes, [str]):
                raise ValueError("its classes attribute is not a list of names")
            expected = {"image_id": (images, "O"), "image_path": (images, "O"), "image_split": (images, "O"),
                        "caption": (captions, "O"), "caption_image": (captions, "iu"),
                        **({"image_label": (images, "iu")} if labelled else {})}
            for key, (rows, kinds) in expected.items():
                if index[key].shape != (rows,) or index[key].dtype.kind not in kinds:
                    raise ValueError(f"{key} is {index[key].shape} of {index[key].dtype}, the manifest expects "
                                     f"{rows} rows")
            bounds = {"caption_image": images, **({"image_label": len(classes)} if labelled else {})}
            for key, bound in bounds.items():
                values = index[key][()]
                if len(values) and (values.min() < 0 or values.max() >= bound):
                    raise ValueError(f"{key} holds rows outside 0..{bound - 1}")

    @property
    def _repair_advice(self) -> str:
        """What to do about a shard of this cache that cannot be read."""
        return f"run vlmcache verify {self.path} and re-extract"

    def open_shard(self, shard_path: Path, problem: str = "corrupt shard") -> AbstractContextManager[h5py.File]:
        """A shard of this cache opened for reading (see `read_hdf5`): h5py's errors, a failed fletcher32
        checksum among them, become one line that says to verify the cache and re-extract."""
        return read_hdf5(shard_path, self._repair_advice, problem)

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["dataset"]["splits"])

    @property
    def classes(self) -> list[str]:
        return self.index["classes"]

    def index_rows(self, key: str, rows: slice) -> list | np.ndarray:
        """Rows of one index.h5 dataset, read without loading the rest (strings as a list of str)."""
        with read_index(self.path) as index:
            data = index[key]
            return data.asstr()[rows].tolist() if data.dtype.kind == "O" else data[rows]

    @cached_property
    def has_labels(self) -> bool:
        """Whether index.h5 holds class labels (labelled image folders)."""
        with read_index(self.path) as index:
            return "image_label" in index

    def split_rows(self, split: str) -> tuple[slice, slice]:
        """The contiguous (image rows, caption rows) of a split, from the manifest's per-split counts (splits
        are stored in the order the manifest lists them), so no per-row index is read."""
        if split not in self.manifest["dataset"]["splits"]:
            raise VlmcacheError(f"{self.path}: has no split {split!r}; it has {', '.join(self.splits)}")
        image_start = caption_start = 0
        for name, counts in self.manifest["dataset"]["splits"].items():
            if name == split:
                return (slice(image_start, image_start + counts["images"]),
                        slice(caption_start, caption_start + counts["captions"]))
            image_start, caption_start = image_start + counts["images"], caption_start + counts["captions"]
        raise AssertionError("unreachable: the split is in the manifest")

    def read(self, modality: str, rows: slice, field: str = "features", feature_set: str | None = None) -> np.ndarray:
        """Rows [start, stop) of one field of a modality's feature set (default set when None), read shard by
        shard (contiguous reads)."""
        parts = []
        chosen = self.feature_set(modality, feature_set)
        for entry in chosen.shards:
            start, stop = entry["row_start"], entry["row_start"] + entry["rows"]
            lo, hi = max(start, rows.start), min(stop, rows.stop)
            if lo < hi:
                with self.open_shard(self.path / chosen.folder / entry["file"]) as shard:
                    if field not in shard:
                        raise VlmcacheError(f"{self.path}: has no {field!r} for {modality}; extract with --tokens")
                    parts.append(shard[field][lo - start:hi - start])
        if not parts:
            return np.zeros((0,), dtype=np.float32)
        return np.concatenate(parts)

    def _token_set(self, modality: str, feature_set: str | None) -> FeatureSet:
        chosen = self.feature_set(modality, feature_set)
        if not chosen.provenance.get("tokens"):
            raise VlmcacheError(f"{self.path / chosen.folder}: has no {modality[:-1]} token states; re-extract with "
                                "vlmcache extract ... --tokens (or use a pooled projector: linear, mlp, ndlinear)")
        return chosen

    def token_shape(self, modality: str, feature_set: str | None = None) -> tuple[int, int]:
        """(tokens per row, token width) of a set's token states, from its first shard (a streamed run's
        model is built from it before any row is read). Refused as `read_tokens` refuses."""
        chosen = self._token_set(modality, feature_set)
        shard_path = self.path / chosen.folder / chosen.shards[0]["file"]
        with self.open_shard(shard_path) as shard:
            count, width = _token_datasets(shard, shard_path)[0].shape[1:]
        if width != chosen.dim:
            raise VlmcacheError(f"{shard_path}: token states are {width}-d but the set's features are {chosen.dim}-d "
                                "(written by another encoder?); re-extract with --overwrite --tokens")
        return int(count), int(width)

    def read_tokens(self, modality: str, rows: slice, keep: np.ndarray,
                    feature_set: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(token states, token masks) of the rows in [start, stop) where `keep` is True, in the cache dtype.

        Filled shard by shard into one array of the kept rows, so memory peaks at the result plus one
        shard. Refused in one line: a set extracted without --tokens, tokens whose width is not the
        set's feature width, non-finite states, or a kept row whose mask is empty (nothing to attend to).
        """
        shape = self.token_shape(modality, feature_set)  # refuses a set without tokens, or of another width
        chosen = self.feature_set(modality, feature_set)
        states = masks = None
        filled = 0
        for entry in chosen.shards:
            start, stop = entry["row_start"], entry["row_start"] + entry["rows"]
            lo, hi = max(start, rows.start), min(stop, rows.stop)
            if lo >= hi:
                continue
            shard_path = self.path / chosen.folder / entry["file"]
            kept = keep[lo - rows.start:hi - rows.start]
            with self.open_shard(shard_path) as shard:
                block, mask = (data[lo - start:hi - start][kept] for data in _token_datasets(shard, shard_path))
            if block.shape[1:] != shape:
                raise VlmcacheError(f"{shard_path}: token states of shape {block.shape[1:]}, the set's first shard "
                                    f"{shape} (mixed extractions, or another encoder); re-extract with --overwrite --tokens")
            if states is None:
                states = np.empty((int(keep.sum()), *shape), block.dtype)
                masks = np.empty((int(keep.sum()), shape[0]), bool)
            empty = np.flatnonzero(~mask.any(axis=1))
            if len(empty):
                raise VlmcacheError(f"{shard_path}: {len(empty)} {modality[:-1]} rows have an empty token mask (first: "
                                    f"row {lo + int(np.flatnonzero(kept)[empty[0]])}); run vlmcache verify {self.path} "
                                    "and re-extract")
            if not np.isfinite(block).all():
                raise VlmcacheError(f"{shard_path}: NaN or infinite token states; run vlmcache verify {self.path} "
                                    "and re-extract")
            states[filled:filled + len(block)], masks[filled:filled + len(block)] = block, mask.astype(bool)
            filled += len(block)
        if states is None:
            raise VlmcacheError(f"{self.path}: no {modality[:-1]} rows to read tokens from in rows {rows.start}-{rows.stop}")
        return states, masks

    def iter_shards(self, modality: str, feature_set: str | None = None) -> Iterator[tuple[int, h5py.File]]:
        """Lazy access: yield (row_start, open h5py shard) one shard at a time.

        Only an opening error is reported in one line: reads of the yielded shard happen in the caller. Outside
        vlmcache.cache use `read_shards`, which hands out arrays, not h5py objects."""
        chosen = self.feature_set(modality, feature_set)
        for entry in chosen.shards:
            with self.open_shard(self.path / chosen.folder / entry["file"], "unreadable shard") as shard:
                yield entry["row_start"], shard

    def read_shards(self, modality: str, fields: tuple[str, ...] = ("features",),
                    feature_set: str | None = None) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Yield (row_start, {field: that shard's rows of it}) one shard at a time, in row order, so a whole
        set is read in memory of one shard. Strings (`error`) come as str. A missing field or an unreadable
        shard is refused in one line."""
        chosen = self.feature_set(modality, feature_set)
        for entry in chosen.shards:
            shard_path = self.path / chosen.folder / entry["file"]
            with self.open_shard(shard_path) as shard:
                missing = [field for field in fields if field not in shard]
                if missing:  # token states are optional (extract --tokens); any other dataset belongs in every shard
                    raise VlmcacheError(f"{shard_path}: has no {missing[0]!r} dataset; " + (
                        "re-extract with vlmcache extract ... --tokens" if missing[0] in ("tokens", "token_mask")
                        else self._repair_advice))
                arrays = {field: shard[field].asstr()[()] if shard[field].dtype.kind == "O" else shard[field][()]
                          for field in fields}
            yield entry["row_start"], arrays

    def _read_sets(self, modality: str, rows: slice, names: tuple[str, ...] | None) -> tuple[np.ndarray, np.ndarray]:
        """(features of the named sets concatenated along the feature axis as float32, rows valid in all)."""
        names = names or (None,)
        features = [self.read(modality, rows, feature_set=name).astype(np.float32) for name in names]
        valid = np.logical_and.reduce([self.read(modality, rows, "valid", name).astype(bool) for name in names])
        return np.concatenate(features, axis=1), valid

    def set_dims(self, modality: str, names: tuple[str, ...] | None = None) -> tuple[int, ...]:
        """The width of each named set (the default set when None)."""
        return tuple(self.feature_set(modality, name).dim for name in (names or (None,)))

    def split(self, name: str, image_sets: tuple[str, ...] | None = None,
              text_sets: tuple[str, ...] | None = None, with_texts: bool = True, image_tokens: bool = False,
              text_tokens: bool = False) -> Split:
        """Load a whole split into memory as float32, dropping skipped images and captions.

        `image_sets`/`text_sets` name feature sets whose features are concatenated (in that order);
        None reads the default set of each modality. `with_texts=False` reads the images only (search):
        the split then has no captions. `image_tokens`/`text_tokens` also read that side's token states
        (of its one set; see `read_tokens`).
        """
        image_rows, caption_rows = self.split_rows(name)
        if not with_texts:
            caption_rows = slice(caption_rows.start, caption_rows.start)
        images, image_valid = self._read_sets("images", image_rows, image_sets)
        caption_image = np.asarray(self.index_rows("caption_image", caption_rows)) - image_rows.start
        if caption_rows.stop > caption_rows.start:
            texts, caption_valid = self._read_sets("texts", caption_rows, text_sets)
            caption_valid &= image_valid[caption_image]
        else:
            texts, caption_valid = np.zeros((0, sum(self.set_dims("texts", text_sets))), np.float32), np.zeros(0, bool)
        # Renumber images after dropping skipped ones so caption_image points into the kept rows.
        new_row = np.cumsum(image_valid) - 1
        labels = self.index_rows("image_label", image_rows) if self.has_labels else None
        loaded = Split(
            name=name,
            image_features=images[image_valid],
            text_features=texts[caption_valid],
            caption_image=new_row[caption_image[caption_valid]].astype(np.int64),
            image_ids=[i for i, ok in zip(self.index_rows("image_id", image_rows), image_valid, strict=True) if ok],
            image_paths=[p for p, ok in zip(self.index_rows("image_path", image_rows), image_valid, strict=True) if ok],
            captions=[c for c, ok in zip(self.index_rows("caption", caption_rows), caption_valid, strict=True) if ok],
            image_labels=None if labels is None else np.asarray(labels)[image_valid],
        )
        for side, modality, wanted, rows, keep, sets in (
                ("image", "images", image_tokens, image_rows, image_valid, image_sets),
                ("text", "texts", text_tokens, caption_rows, caption_valid, text_sets)):
            if wanted:
                if sets is not None and len(sets) > 1:
                    raise VlmcacheError(f"--{side}-features {'+'.join(sets)}: token projectors read the tokens of one "
                                        "feature set; name one")
                states, masks = self.read_tokens(modality, rows, keep, sets[0] if sets else None)
                setattr(loaded, f"{side}_tokens", states)
                setattr(loaded, f"{side}_token_mask", masks)
        return loaded


def _token_datasets(shard: h5py.File, shard_path: Path) -> tuple[h5py.Dataset, h5py.Dataset]:
    """A shard's `tokens` and `token_mask` datasets; a shard without them is refused in one line."""
    if "tokens" not in shard or "token_mask" not in shard:
        raise VlmcacheError(f"{shard_path}: has no token states; re-extract with vlmcache extract ... --tokens")
    return shard["tokens"], shard["token_mask"]


def open_cache(path: str | Path, check_shards: bool = True) -> FeatureCache:
    """Open a complete feature cache folder for reading (checks manifest, index and every shard's provenance
    and rows; `check_shards=False` leaves the shards to the caller, as verify does to report each bad one)."""
    path = Path(path)
    if not path.is_dir():
        raise VlmcacheError(f"{path}: no such cache folder; run vlmcache extract first")
    return FeatureCache(path, check_shards)


def check_same_dataset(first: FeatureCache, second: FeatureCache) -> None:
    """Refuse to combine caches of different data (different ids, captions or splits)."""
    if first.fingerprint != second.fingerprint:
        raise VlmcacheError(f"{first.path} and {second.path}: built from different datasets (fingerprints "
                            f"{first.fingerprint[:12]} vs {second.fingerprint[:12]}); extract both from the same data")


def load_features(cache: FeatureCache, split: str, text_cache: FeatureCache | None = None,
                  image_sets: tuple[str, ...] | None = None, text_sets: tuple[str, ...] | None = None,
                  image_tokens: bool = False, text_tokens: bool = False) -> Split:
    """A split of `cache`, its text features taken from `text_cache` when given (same dataset only).

    `image_sets`/`text_sets`: feature sets to concatenate (None: each modality's default set).
    `image_tokens`/`text_tokens`: also read that side's token states (extract --tokens).
    Non-finite features (a corrupted shard, a broken encoder) are refused here, before any training.
    A cache that keeps its loaded splits (`keep_loaded`) reads each one once; callers get their own Split
    object over the same arrays, which nothing writes to.
    """
    key = (split, image_sets, text_sets, image_tokens, text_tokens)
    if cache.loaded is not None and text_cache is None and key in cache.loaded:
        return replace(cache.loaded[key])
    loaded = cache.split(split, image_sets, None if text_cache is not None else text_sets, image_tokens=image_tokens,
                         text_tokens=text_tokens and text_cache is None)
    if text_cache is not None:
        check_same_dataset(cache, text_cache)
        texts = text_cache.split(split, None, text_sets, text_tokens=text_tokens)
        if texts.caption_image.tolist() != loaded.caption_image.tolist():
            raise VlmcacheError(f"{cache.path} and {text_cache.path}: skipped different items; re-extract both")
        loaded.text_features = texts.text_features
        loaded.text_tokens, loaded.text_token_mask = texts.text_tokens, texts.text_token_mask
    for modality, features in (("image", loaded.image_features), ("text", loaded.text_features)):
        bad = np.flatnonzero(~np.isfinite(features).all(axis=1)) if features.size else []
        if len(bad):
            raise VlmcacheError(f"{(text_cache if modality == 'text' and text_cache else cache).path}: split {split!r} "
                                f"has NaN or infinite {modality} features (row {bad[0]} of the split, {len(bad)} rows); "
                                "run vlmcache verify on it and re-extract")
    if cache.loaded is not None and text_cache is None:
        cache.loaded[key] = replace(loaded)
    return loaded


def keep_loaded(cache: FeatureCache) -> FeatureCache:
    """`cache`, now keeping every split load_features reads from it in memory for the next caller."""
    if cache.loaded is None:
        cache.loaded = {}
    return cache


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


def verify_cache(path: str | Path) -> list[tuple[str, str]]:
    """Check everything in a cache: (file, problem) for each bad file; [] when all is well.

    Every shard of every feature set is read in full (HDF5 checks each chunk's fletcher32 checksum) and compared
    with the manifest: its SHA-256, its rows and provenance; rows marked valid must hold finite features.
    index.h5 and the saved text encoder's files are compared with the SHA-256 recorded when they were written
    (in the manifest and in text-encoder.json); files written before vlmcache recorded a hash are not hashed.
    """
    cache = open_cache(path, check_shards=False)
    problems = []
    for feature_set in [s for modality in MODALITIES for s in cache.feature_sets(modality, all_statuses=True).values()]:
        for entry in feature_set.shards:
            try:
                _verify_shard(cache, feature_set, entry)
            except VlmcacheError as error:
                problems.append((str(cache.path / feature_set.folder / entry["file"]), str(error).split(": ", 1)[-1]))
    recorded = cache.manifest.get("index_sha256")
    if recorded and file_sha256(cache.path / "index.h5") != recorded:
        problems.append((str(cache.path / "index.h5"), f"content differs from the SHA-256 recorded at extraction; "
                                                       f"{INDEX_HINT}"))
    return problems + query_encoder.problems(cache.path)


def _verify_shard(cache: FeatureCache, feature_set: FeatureSet, entry: dict) -> None:
    """Refuse (VlmcacheError) a shard that differs from the manifest or holds non-finite valid rows."""
    shard_path = cache.path / feature_set.folder / entry["file"]
    cache._check_shard(feature_set.folder, entry, feature_set.provenance)
    if entry.get("sha256") and file_sha256(shard_path) != entry["sha256"]:
        raise VlmcacheError(f"{shard_path}: content differs from the SHA-256 recorded at extraction; {RECOMPUTE}")
    with read_hdf5(shard_path, RECOMPUTE) as shard:
        arrays = {name: shard[name][()] for name in shard}
        valid = arrays["valid"].astype(bool)
        finite = np.isfinite(arrays["features"][valid].astype(np.float32)).all()
    if not finite:
        raise VlmcacheError(f"{shard_path}: NaN or infinite features in rows marked valid; {RECOMPUTE}")


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
