"""The field's embedding formats, out of and into a vlmcache cache, chunk by chunk (memory-bounded).

Export writes clip-retrieval's layout, which its back-end and autofaiss read:

    img_emb/img_emb_N.npy       (rows, dim) float16, L2-normalised (or as stored with raw=True)
    text_emb/text_emb_N.npy     the same for the caption of each row
    metadata/metadata_N.parquet image_path, caption, image_id, split (+ label), image_row, caption_row

Row i of file N is the same pair in all three files; files hold `rows_per_file` rows (clip-retrieval's
default 1,000,000). A row is an image with its first caption (`captions="first"`, one row per image as
clip-retrieval's image index expects) or one row per caption (`captions="all"`, the image repeated).

Import reads clip-retrieval's layout, DataComp's per-shard `.npz` (`b32_img`, `b32_txt`, `l14_img`, ...)
beside a `.parquet` of the same name, or a plain folder of `img_emb.npy` + `text_emb.npy` +
`metadata.parquet` (or `captions.txt`, one caption per line), and writes a real vlmcache cache: one image
row and one caption row per source row, grouped by split, with the usual index, manifest and resumable
shards. Its provenance says "imported from <source>" with the SHA-256 of the source files.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlmcache.cache.layout import MODALITIES, set_name
from vlmcache.cache.store import FORMAT_VERSION, now_iso, open_cache, shard_name, shard_ranges, write_shard
from vlmcache.cache.writer import ExtractResult, PendingSet, finalize_cache, prepare_cache
from vlmcache.data import datasets
from vlmcache.data.datasets import ON_ERROR
from vlmcache.errors import VlmcacheError
from vlmcache.files import DiskFullError, FolderLock, atomic_write, human_size, remove_stale_temporaries
from vlmcache.progress import make_progress

EXPORT_FORMATS = ("clip-retrieval",)
IMPORT_FORMATS = ("clip-retrieval", "datacomp", "npy")
CHUNK_ROWS = 8192  # rows per step: temporaries stay small enough for malloc to reuse, not fresh page-faulted maps
_DEFAULT_CAPTION = {"clip-retrieval": "caption", "datacomp": "text", "npy": "caption"}
_NPY_HEADER = 128  # bytes of an .npy header: format 1.0 pads it to a multiple of 64, 128 for these 2-d arrays
_ID_COLUMNS = ("image_id", "uid", "key", "image_path", "url")  # the first one present names the image


@dataclass
class ExportResult:
    """What an export wrote: the folder, rows, files per kind, seconds."""

    out: Path
    rows: int
    files: int
    seconds: float


def _normalise(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm in float32 (all-zero rows of skipped items stay zero)."""
    features = features.astype(np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", features, features))[:, None]  # 5x faster than np.linalg.norm here
    return features / np.where(norms == 0, 1, norms)


def _export_rows(cache, captions: str, splits: list[str] | None) -> tuple[np.ndarray, np.ndarray]:
    """(image row, caption row or -1) of each exported row, in cache order, skipped items left out."""
    index = cache.index
    image_rows = np.arange(len(index["image_id"]))
    if splits:
        for split in splits:
            cache.split_rows(split)  # names a missing split
        image_rows = image_rows[np.isin(np.asarray(index["image_split"]), splits)]
    image_valid = np.concatenate([shard["valid"][()] for _, shard in cache.iter_shards("images")]).astype(bool)
    image_rows = image_rows[image_valid[image_rows]]
    owner = np.asarray(index["caption_image"])
    if len(owner) == 0:  # a labelled folder: images only
        return image_rows, np.full(len(image_rows), -1)
    caption_valid = np.concatenate([shard["valid"][()] for _, shard in cache.iter_shards("texts")]).astype(bool)
    caption_rows = np.flatnonzero(caption_valid & np.isin(owner, image_rows))
    if captions == "first":  # captions follow their image, so the first of each run is the image's first
        caption_rows = caption_rows[np.unique(owner[caption_rows], return_index=True)[1]]
    return owner[caption_rows], caption_rows


def _read_rows(cache, modality: str, rows: np.ndarray) -> np.ndarray:
    """Features of sorted `rows`, read as one contiguous range (rows come in cache order)."""
    block = cache.read(modality, slice(int(rows[0]), int(rows[-1]) + 1))
    return block[rows - rows[0]]


def export_cache(cache: str | Path, out: str | Path, format: str = "clip-retrieval", *, raw: bool = False,
                 captions: str = "first", splits: list[str] | None = None, rows_per_file: int = 1_000_000,
                 progress: bool = True) -> ExportResult:
    """Write a cache's features and metadata in clip-retrieval's layout (see the module docstring).

    `raw=True` keeps the features as stored (dtype and scale) instead of L2-normalised float16.
    `captions` is "first" (a row per image) or "all" (a row per caption). `splits` limits the rows.
    """
    started = time.perf_counter()
    if format not in EXPORT_FORMATS:
        raise VlmcacheError(f"--format {format}: export writes {', '.join(EXPORT_FORMATS)}")
    if captions not in ("first", "all"):
        raise VlmcacheError(f"--captions {captions}: use first or all")
    if rows_per_file < 1:
        raise VlmcacheError("--rows-per-file must be positive")
    opened = open_cache(cache)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise VlmcacheError(f"--out {out}: is a file; pass a folder")
    image_rows, caption_rows = _export_rows(opened, captions, splits)
    if len(image_rows) == 0:
        raise VlmcacheError(f"{cache}: no rows to export")
    kinds = ["img_emb", "metadata"] + (["text_emb"] if caption_rows[0] >= 0 else [])
    for kind in kinds:
        (out / kind).mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out / kind)  # of an export killed mid-file
    written = np.dtype(opened.provenance["images"]["dtype"]) if raw else np.dtype(np.float16)
    dims = {kind: dim for kind, dim in (("img_emb", opened.image_dim), ("text_emb", opened.text_dim)) if kind in kinds}
    ranges = shard_ranges(len(image_rows), rows_per_file)
    with make_progress(progress) as bars:
        task = bars.add_task("export", total=len(image_rows), unit="row")
        for number, (start, stop) in enumerate(ranges):
            try:
                _export_group(opened, out, number, image_rows[start:stop], caption_rows[start:stop], dims, written, raw,
                              lambda rows: bars.advance(task, rows))
            except DiskFullError as error:
                rows = len(image_rows) - start
                raise error.for_step(f"at least {human_size(rows * sum(dims.values()) * written.itemsize)} for the "
                                     f"{rows:,} rows still to export") from None
    return ExportResult(out, len(image_rows), len(ranges), time.perf_counter() - started)


def _export_group(opened, out: Path, number: int, image_rows: np.ndarray, caption_rows: np.ndarray,
                  dims: dict[str, int], written: np.dtype, raw: bool, advance: Callable[[int], object]) -> None:
    """Write file group `number` (img_emb_N.npy, text_emb_N.npy, metadata_N.parquet) of these rows, CHUNK_ROWS at
    a time, as stored (`raw`) or L2-normalised, in `written`; each file under a temporary name, all renamed once
    the group is whole (and removed if it is not)."""
    index = opened.index
    labels, classes = index.get("image_label"), index["classes"]
    arrays = {"img_emb": ("images", image_rows), "text_emb": ("texts", caption_rows)}
    targets = {kind: out / kind / f"{kind}_{number}.npy" for kind in dims}
    targets["metadata"] = out / "metadata" / f"metadata_{number}.parquet"
    with ExitStack() as files:
        temporaries = {kind: files.enter_context(atomic_write(
            path, _NPY_HEADER + len(image_rows) * dims[kind] * written.itemsize if kind in dims else None))
            for kind, path in targets.items()}
        # Plain writes after an .npy header, not a memory map (whose dirty pages count as resident memory).
        handles = {kind: files.enter_context(open(temporaries[kind], "wb")) for kind in dims}
        for kind, handle in handles.items():
            np.lib.format.write_array_header_1_0(handle, {"descr": np.lib.format.dtype_to_descr(written),
                                                          "fortran_order": False, "shape": (len(image_rows), dims[kind])})
        writer = None
        for lo in range(0, len(image_rows), CHUNK_ROWS):
            hi = min(lo + CHUNK_ROWS, len(image_rows))
            for kind, handle in handles.items():
                modality, rows = arrays[kind]
                block = _read_rows(opened, modality, rows[lo:hi])
                handle.write((block if raw else _normalise(block)).astype(written).tobytes())
            table = _metadata_table(index, image_rows[lo:hi], caption_rows[lo:hi], labels, classes)
            if writer is None:
                writer = files.enter_context(pq.ParquetWriter(temporaries["metadata"], table.schema))
            writer.write_table(table)
            advance(hi - lo)


def _metadata_table(index: dict, image_rows: np.ndarray, caption_rows: np.ndarray, labels, classes) -> pa.Table:
    columns = {
        "image_path": [index["image_path"][i] for i in image_rows],
        "caption": [index["caption"][c] if c >= 0 else "" for c in caption_rows],
        "image_id": [index["image_id"][i] for i in image_rows],
        "split": [index["image_split"][i] for i in image_rows],
    }
    if labels is not None:
        columns["label"] = [classes[labels[i]] for i in image_rows]
    columns["image_row"], columns["caption_row"] = image_rows.astype(np.int64), caption_rows.astype(np.int64)
    return pa.table(columns)


# --- import -------------------------------------------------------------------------------------------------


@dataclass
class _Part:
    """One source file group: image embeddings, caption embeddings and metadata of the same rows."""

    image_file: Path
    text_file: Path
    meta_file: Path
    image_key: str | None = None  # array name inside an .npz
    text_key: str | None = None

    def arrays(self) -> tuple[NpyRows | np.ndarray, NpyRows | np.ndarray]:
        """(image, text) row sources; .npy files are read row range by row range, .npz members whole (one shard)."""
        if self.image_key is None:
            return NpyRows(self.image_file), NpyRows(self.text_file)
        try:
            with np.load(self.image_file) as npz:
                return npz[self.image_key], npz[self.text_key]
        except (OSError, ValueError) as error:
            raise VlmcacheError(f"{self.image_file}: not a readable .npz ({error})") from None


class NpyRows:
    """Rows of a .npy file by plain reads, `rows[indices]` like an array.

    Not a memory map: the mapped pages a gather touches count as the process's resident memory, so a
    memory-mapped 1,000,000 x 512 import measured 3 GB peak RSS; these window reads keep it to one window.
    """

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as handle:
                version = np.lib.format.read_magic(handle)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                self.shape, fortran_order, self.dtype = read_header(handle)
                self.offset = handle.tell()
        except (OSError, ValueError) as error:
            raise VlmcacheError(f"{path}: not a readable .npy file ({error})") from None
        if fortran_order:
            raise VlmcacheError(f"{path}: stored in Fortran order; save it with np.save from a C-ordered array")
        self.ndim = len(self.shape)

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows)
        ascending = bool(np.all(rows[1:] >= rows[:-1]))
        order = None if ascending else np.argsort(rows, kind="stable")
        wanted = rows if ascending else rows[order]
        width, itemsize = self.shape[1], self.dtype.itemsize
        found = np.empty((len(wanted), width), self.dtype)
        with open(self.path, "rb") as handle:
            done = 0
            while done < len(wanted):
                low = int(wanted[done])
                end = int(np.searchsorted(wanted, low + CHUNK_ROWS, side="left"))  # rows in [low, low + CHUNK_ROWS)
                high = int(wanted[end - 1]) + 1
                handle.seek(self.offset + low * width * itemsize)
                if high - low == end - done:  # a contiguous run: read straight into place
                    handle.readinto(found[done:end])
                else:
                    block = np.fromfile(handle, self.dtype, (high - low) * width).reshape(-1, width)
                    np.take(block, wanted[done:end] - low, axis=0, out=found[done:end])
                done = end
        if ascending:
            return found
        result = np.empty_like(found)
        result[order] = found
        return result


def _numbered(folder: Path, prefix: str, suffix: str) -> dict[int, Path]:
    pattern = re.compile(rf"{prefix}_(\d+){re.escape(suffix)}$")
    return {int(m.group(1)): path for path in folder.glob(f"{prefix}_*{suffix}") if (m := pattern.match(path.name))}


def _find_parts(source: Path, format: str, features: str | None) -> list[_Part]:
    """The source's file groups in row order, checked to exist and pair up."""
    if not source.is_dir():
        raise VlmcacheError(f"{source}: no such folder; pass the folder holding the {format} files")
    if format == "clip-retrieval":
        found = {kind: _numbered(source / kind, kind, ext) for kind, ext in
                 (("img_emb", ".npy"), ("text_emb", ".npy"), ("metadata", ".parquet"))}
        if not found["img_emb"]:
            raise VlmcacheError(f"{source}: no img_emb/img_emb_N.npy; not a clip-retrieval embeddings folder")
        for kind in ("text_emb", "metadata"):
            missing = sorted(set(found["img_emb"]) - set(found[kind]))
            if missing:
                raise VlmcacheError(f"{source}: img_emb_{missing[0]}.npy has no {kind}/{kind}_{missing[0]}"
                                    f"{'.parquet' if kind == 'metadata' else '.npy'}; vlmcache needs image "
                                    "embeddings, caption embeddings and captions for every row")
        return [_Part(found["img_emb"][n], found["text_emb"][n], found["metadata"][n]) for n in sorted(found["img_emb"])]
    if format == "datacomp":
        shards = sorted(source.rglob("*.npz"))
        if not shards:
            raise VlmcacheError(f"{source}: no .npz files; not a DataComp embeddings folder")
        with np.load(shards[0]) as first:
            names = set(first.files)
        sets = sorted({name.rsplit("_", 1)[0] for name in names if name.endswith(("_img", "_txt"))})
        if features is None and len(sets) == 1:
            features = sets[0]
        if features not in sets:
            raise VlmcacheError(f"{shards[0]}: holds the feature sets {', '.join(sets) or 'none'}; choose one "
                                "with --features (e.g. --features b32)")
        parts = []
        for shard in shards:
            meta = shard.with_suffix(".parquet")
            if not meta.exists():
                raise VlmcacheError(f"{shard}: no {meta.name} beside it (the captions); DataComp keeps them together")
            parts.append(_Part(shard, shard, meta, f"{features}_img", f"{features}_txt"))
        return parts
    files = {name: source / name for name in ("img_emb.npy", "text_emb.npy")}
    for path in files.values():
        if not path.exists():
            raise VlmcacheError(f"{source}: no {path.name}; an npy import needs img_emb.npy, text_emb.npy and "
                                "metadata.parquet or captions.txt")
    meta = source / "metadata.parquet"
    if not meta.exists():
        meta = source / "captions.txt"
        if not meta.exists():
            raise VlmcacheError(f"{source}: no metadata.parquet or captions.txt (one caption per line)")
    return [_Part(files["img_emb.npy"], files["text_emb.npy"], meta)]


def _read_metadata(part: _Part, caption_column: str, split_column: str) -> dict[str, list]:
    """Captions, ids, paths and splits of one part's rows (only the columns needed are read)."""
    if part.meta_file.suffix == ".txt":
        try:
            captions = part.meta_file.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as error:
            raise VlmcacheError(f"{part.meta_file}: not valid UTF-8 at byte {error.start}") from None
        return {"caption": captions, "id": [f"{part.meta_file.parent.name}/{n}" for n in range(len(captions))],
                "path": [""] * len(captions), "split": None}
    try:
        schema = pq.read_schema(part.meta_file)
    except (OSError, pa.ArrowException) as error:
        raise VlmcacheError(f"{part.meta_file}: not a readable parquet file ({error})") from None
    if caption_column not in schema.names:
        raise VlmcacheError(f"{part.meta_file}: no caption column {caption_column!r} (it has {', '.join(schema.names)}); "
                            "pass --caption-column")
    id_column = next((name for name in _ID_COLUMNS if name in schema.names), None)
    path_column = next((name for name in ("image_path", "url") if name in schema.names), None)
    wanted = [c for c in dict.fromkeys([caption_column, id_column, path_column, split_column]) if c in schema.names]
    table = pq.read_table(part.meta_file, columns=wanted)
    rows = table.num_rows
    stem = part.meta_file.stem
    return {"caption": table[caption_column].to_pylist(),
            "id": [str(v) for v in table[id_column].to_pylist()] if id_column else [f"{stem}/{n}" for n in range(rows)],
            "path": [str(v) for v in table[path_column].to_pylist()] if path_column else [""] * rows,
            "split": [str(v) for v in table[split_column].to_pylist()] if split_column in schema.names else None}


def _check_array(array: np.ndarray, path: Path, key: str | None, rows: int, meta_file: Path, dims: dict, kind: str) -> None:
    name = f"{path}" + (f" [{key}]" if key else "")
    if array.dtype.kind != "f":
        raise VlmcacheError(f"{name}: dtype {array.dtype}, expected float16/float32 embeddings")
    if array.ndim != 2:
        raise VlmcacheError(f"{name}: shape {array.shape}, expected (rows, dim)")
    if array.shape[0] != rows:
        raise VlmcacheError(f"{name}: {array.shape[0]:,} rows but {meta_file} has {rows:,}; they must match row for row")
    if dims.setdefault(kind, array.shape[1]) != array.shape[1]:
        raise VlmcacheError(f"{name}: dimension {array.shape[1]}, but earlier files have {dims[kind]}; one import, one dimension")


def hash_files(paths: list[Path]) -> str:
    """SHA-256 over the bytes of `paths` in order (names and sizes included), read in 8 MB blocks."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as handle:
            while block := handle.read(8 << 20):
                digest.update(block)
    return digest.hexdigest()


def _encoder_provenance(label: str, dim: int, dtype: str, origin: str, source_hash: str, modality: str) -> dict:
    encoder = {"name": label, "pooling": "as imported", "dim": dim, "precision": dtype,
               "weights_sha256": f"unknown (imported; source sha256 {source_hash})", "imported_from": origin,
               "source_sha256": source_hash}
    if modality == "texts":
        encoder.update({"max_length": None, "tokenizer": None})
    return encoder


def import_embeddings(source: str | Path, out: str | Path, format: str, *, features: str | None = None,
                      caption_column: str | None = None, split_column: str = "split", val_fraction: float | None = None,
                      seed: int = 0, shard_size: int = 65536, dtype: str = "float16", on_error: str = "fail",
                      overwrite: bool = False, progress: bool = True) -> ExtractResult:
    """Write the cache `out` from precomputed embeddings + captions in `format` (see the module docstring).

    `features` picks DataComp's feature set (b32, l14, ...); `caption_column` defaults to "caption"
    ("text" for DataComp). Splits come from `split_column` when the metadata has it, else `val_fraction`
    of rows (drawn with `seed`) become "val", else all are "train". NaN/inf rows and empty captions fail,
    or are recorded as skipped with on_error="skip". Re-running resumes (complete shards are kept).
    """
    started = time.perf_counter()
    if format not in IMPORT_FORMATS:
        raise VlmcacheError(f"--format {format}: use one of {', '.join(IMPORT_FORMATS)}")
    if on_error not in ON_ERROR:
        raise VlmcacheError(f"--on-error {on_error}: use fail or skip")
    if dtype not in ("float16", "float32"):
        raise VlmcacheError(f"--dtype {dtype}: use float16 or float32")
    if shard_size < 1:
        raise VlmcacheError("--shard-size must be positive")
    if val_fraction is not None and not 0 < val_fraction < 1:
        raise VlmcacheError(f"--val-fraction {val_fraction}: use a number between 0 and 1")
    source, out = Path(source), Path(out)
    if out.exists() and not out.is_dir():
        raise VlmcacheError(f"--out {out}: is a file; pass a folder path for the cache")
    parts = _find_parts(source, format, features)
    caption_column = caption_column or _DEFAULT_CAPTION[format]

    # Pass 1: metadata and shapes (small), so the row order and the index are known before any features move.
    metas, dims, source_dtype = [], {}, None
    for part in parts:
        meta = _read_metadata(part, caption_column, split_column)
        image, text = part.arrays()
        _check_array(image, part.image_file, part.image_key, len(meta["caption"]), part.meta_file, dims, "images")
        _check_array(text, part.text_file, part.text_key, len(meta["caption"]), part.meta_file, dims, "texts")
        source_dtype = str(image.dtype)
        metas.append(meta)
    rows = sum(len(meta["caption"]) for meta in metas)
    if rows == 0:
        raise VlmcacheError(f"{source}: no rows to import")
    captions = [str(c) if c is not None else "" for meta in metas for c in meta["caption"]]
    if all(meta["split"] is not None for meta in metas):
        splits = np.asarray([s for meta in metas for s in meta["split"]], dtype=object)
    else:
        splits = np.full(rows, "train", dtype=object)
    if val_fraction is not None:
        splits = np.full(rows, "train", dtype=object)
        splits[np.random.default_rng(seed).permutation(rows)[:round(rows * val_fraction)]] = "val"
    names = sorted(set(splits.tolist()), key=datasets.split_rank)
    rank = np.asarray([names.index(s) for s in splits.tolist()]) if len(names) > 1 else np.zeros(rows, int)
    order = np.argsort(rank, kind="stable")  # cache row -> source row (global)
    ids = [i for meta in metas for i in meta["id"]]
    paths = [p for meta in metas for p in meta["path"]]
    dataset = datasets.PairDataset(
        format=f"imported:{format}", root=source.resolve(),
        image_paths=[paths[i] for i in order], image_ids=[ids[i] for i in order],
        image_splits=[splits[i] for i in order], captions=[captions[i] for i in order],
        caption_image=np.arange(rows, dtype=np.int64))

    files = [p for part in parts for p in dict.fromkeys([part.image_file, part.text_file, part.meta_file])]
    source_hash = hash_files(files)
    origin = f"imported from {source.resolve()} ({format}{f', {features}' if features else ''}, sha256 {source_hash})"
    fingerprint = dataset.fingerprint()
    label = f"imported {format}" + (f" {features}" if features else "")
    provenance = {modality: {"encoder": _encoder_provenance(f"{label} {modality}", dims[modality], source_dtype, origin,
                                                             source_hash, modality),
                             "dataset_fingerprint": fingerprint, "dtype": dtype, "tokens": False,
                             "shard_size": shard_size, "compute_path": "imported"} for modality in MODALITIES}
    manifest = json.loads(json.dumps({
        "format_version": FORMAT_VERSION, "status": "incomplete", "created": now_iso(),
        "dataset": {"format": dataset.format, "root": str(dataset.root), "fingerprint": fingerprint, "images": rows,
                    "captions": rows, "splits": dataset.split_counts(), "limit_per_split": None},
        "provenance": provenance, "imported_from": origin,
        "libraries": {"python": platform.python_version(), "numpy": np.__version__, "h5py": h5py.__version__,
                      "pyarrow": pa.__version__, "vlmcache": _version()},
    }))
    out.mkdir(parents=True, exist_ok=True)
    with FolderLock(out, "import"):
        sets = [PendingSet(modality, set_name(provenance[modality]["encoder"]["name"]), None, "imported",
                           provenance[modality]) for modality in MODALITIES]
        prepare_cache(out, dataset, manifest, sets, overwrite)
        plan = shard_ranges(rows, shard_size)
        pending = [n for n, _ in enumerate(plan)
                   if not all((out / modality / shard_name(n)).exists() for modality in MODALITIES)]
        starts = np.cumsum([0] + [len(meta["caption"]) for meta in metas])
        empty = np.fromiter((not caption.strip() for caption in captions), bool, rows)  # by source row
        with make_progress(progress) as bars:
            task = bars.add_task("import", total=sum(plan[n][1] - plan[n][0] for n in pending), unit="row")
            for number in pending:
                start, stop = plan[number]
                _write_import_shard(out, number, start, order[start:stop], parts, starts, empty, provenance,
                                    dtype, on_error)
                bars.advance(task, stop - start)
        result = ExtractResult(out, rows, rows, 2 * len(pending), 2 * (len(plan) - len(pending)))
        finalize_cache(out, manifest, {modality: plan for modality in MODALITIES}, sets, result)
    result.seconds = time.perf_counter() - started
    return result


def _write_import_shard(out: Path, number: int, start: int, source_rows: np.ndarray, parts: list[_Part],
                        starts: np.ndarray, empty: np.ndarray, provenance: dict, dtype: str, on_error: str) -> None:
    """Gather one shard's rows from the source files, check them, write the image and text shards."""
    rows = len(source_rows)
    features = {modality: None for modality in MODALITIES}
    valid = {modality: np.ones(rows, bool) for modality in MODALITIES}
    errors = {modality: [""] * rows for modality in MODALITIES}
    part_of = np.searchsorted(starts, source_rows, side="right") - 1
    for index in np.unique(part_of):
        part = parts[index]
        here = np.flatnonzero(part_of == index)
        local = source_rows[here] - starts[index]
        for modality, array, path in zip(MODALITIES, part.arrays(), (part.image_file, part.text_file), strict=True):
            # Straight to the cache dtype (a no-op for float16 sources): a float32 round trip cost 14 s of 60 at 1M rows.
            # Checked after the cast, so values beyond float16's range are caught as the inf they become.
            block = np.asarray(array[local], dtype=dtype)
            if features[modality] is None:
                features[modality] = np.zeros((rows, block.shape[1]), dtype)
            bad = ~np.isfinite(block).all(axis=1)
            for offset in np.flatnonzero(bad):
                reason = f"NaN or inf in the embedding ({path} row {local[offset]})"
                if on_error == "fail":
                    raise VlmcacheError(f"{path} row {local[offset]}: NaN or inf in the embedding (as {dtype}); fix the "
                                        "source, or pass --on-error skip to record and skip the row")
                valid[modality][here[offset]], errors[modality][here[offset]] = False, reason
            block[bad] = 0.0
            features[modality][here] = block
    for offset in np.flatnonzero(empty[source_rows]).tolist():
        part = int(part_of[offset])
        where = f"{parts[part].meta_file} row {int(source_rows[offset] - starts[part])}"
        if on_error == "fail":
            raise VlmcacheError(f"{where}: empty or missing caption; fix the source, or pass --on-error skip to "
                                "record and skip the row")
        valid["texts"][offset], errors["texts"][offset] = False, f"empty caption ({where})"
    for modality in MODALITIES:
        arrays = {"features": features[modality], "valid": valid[modality], "error": errors[modality]}
        if modality == "texts":
            arrays["truncated"] = np.zeros(rows, bool)
        write_shard(out / modality / shard_name(number), start, provenance[modality], arrays, dtype)


def _version() -> str:
    from vlmcache import __version__

    return __version__
