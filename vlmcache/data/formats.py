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

Every source file goes through one reader of its kind (`NpyRows`, `read_npz`, `read_parquet`) that checks it
before use and turns numpy's, zipfile's, pyarrow's and the OS's exceptions into one line naming the file.

An export folder holds exactly one export: it is written beside `out` and renamed into place, with a
`vlmcache-export.json` listing the SHA-256 of every part. Export only replaces a folder that is empty or holds
an unchanged earlier export (recognised by that file); import checks the parts against it when present.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import time
import tokenize
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlmcache.cache.hdf5 import h5py_version
from vlmcache.cache.layout import MODALITIES, set_name
from vlmcache.cache.store import FORMAT_VERSION, file_sha256, now_iso, open_cache, shard_name, shard_ranges, write_shard
from vlmcache.cache.writer import ExtractResult, PendingSet, finalize_cache, prepare_cache
from vlmcache.data import datasets
from vlmcache.data.datasets import ON_ERROR
from vlmcache.errors import VlmcacheError
from vlmcache.files import DiskFullError, FolderLock, human_size, is_disk_full, write_json_atomic
from vlmcache.progress import make_progress

EXPORT_FORMATS = ("clip-retrieval",)
IMPORT_FORMATS = ("clip-retrieval", "datacomp", "npy")
CHUNK_ROWS = 8192  # rows per step: temporaries stay small enough for malloc to reuse, not fresh page-faulted maps
_DEFAULT_CAPTION = {"clip-retrieval": "caption", "datacomp": "text", "npy": "caption"}
_ID_COLUMNS = ("image_id", "uid", "key", "image_path", "url")  # the first one present names the image
_PATH_COLUMNS = ("image_path", "url")
EXPORT_MANIFEST = "vlmcache-export.json"
_EXPORT_KINDS = {"img_emb": ".npy", "text_emb": ".npy", "metadata": ".parquet"}
_NPY_FIX = "save it again with np.save from a C-ordered float array"
_NPZ_FIX = "download or save it again (np.savez)"
_PARQUET_FIX = "write it again (e.g. pyarrow.parquet.write_table)"


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
    image_valid = np.concatenate([arrays["valid"] for _, arrays in cache.read_shards("images", ("valid",))]).astype(bool)
    image_rows = image_rows[image_valid[image_rows]]
    owner = np.asarray(index["caption_image"])
    if len(owner) == 0:  # a labelled folder: images only
        return image_rows, np.full(len(image_rows), -1)
    caption_valid = np.concatenate([arrays["valid"] for _, arrays in cache.read_shards("texts", ("valid",))]).astype(bool)
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
    `out` must be new, empty, or hold an earlier vlmcache export, which the new one replaces as a whole.
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
    target = out.resolve()  # a symlinked --out is replaced where it points, the link kept
    earlier = _earlier_export(target)  # before any work: a folder export may not replace is refused at once
    image_rows, caption_rows = _export_rows(opened, captions, splits)
    if len(image_rows) == 0:
        raise VlmcacheError(f"{cache}: no rows to export")
    staging = _staging_folder(target)
    try:
        digests = _write_export(opened, staging, image_rows, caption_rows, raw, rows_per_file, progress)
        write_json_atomic(staging / EXPORT_MANIFEST, {
            "vlmcache_export": 1, "format": format, "cache": str(Path(cache).resolve()), "created": now_iso(),
            "rows": len(image_rows), "raw": raw, "captions": captions, "splits": splits, "files": digests})
        _swap_in(staging, target, earlier)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)  # ours alone: created empty by _staging_folder
        if is_disk_full(error):  # the earlier export (if any) is untouched: the swap had not happened
            dims = opened.image_dim + (opened.text_dim if caption_rows[0] >= 0 else 0)
            itemsize = np.dtype(opened.provenance["images"]["dtype"]).itemsize if raw else 2
            need = f"the export of {len(image_rows):,} rows needs at least {human_size(len(image_rows) * dims * itemsize)}"
            raise DiskFullError(target, DiskFullError.from_error(error).reason, None, need) from None
        raise
    files = len(shard_ranges(len(image_rows), rows_per_file))
    return ExportResult(out, len(image_rows), files, time.perf_counter() - started)


def _write_export(opened, folder: Path, image_rows: np.ndarray, caption_rows: np.ndarray, raw: bool,
                  rows_per_file: int, progress: bool) -> dict[str, str]:
    """Write every part into `folder`; returns {part name: sha256} for the export manifest."""
    kinds = ["img_emb", "metadata"] + (["text_emb"] if caption_rows[0] >= 0 else [])
    for kind in kinds:
        (folder / kind).mkdir()
    index = opened.index
    labels, classes = index.get("image_label"), index["classes"]
    stored = np.dtype(opened.provenance["images"]["dtype"])
    arrays = {"img_emb": ("images", image_rows), "text_emb": ("texts", caption_rows)}
    dims = {"img_emb": opened.image_dim, "text_emb": opened.text_dim}
    digests = {}
    with make_progress(progress) as bars:
        task = bars.add_task("export", total=len(image_rows), unit="row")
        for number, (start, stop) in enumerate(shard_ranges(len(image_rows), rows_per_file)):
            names = {kind: f"{kind}/{kind}_{number}{_EXPORT_KINDS[kind]}" for kind in kinds}
            # Plain writes after an .npy header, not a memory map (whose dirty pages count as resident memory),
            # hashed as they are written so the manifest costs no second read of the features.
            with ExitStack() as files:
                handles = {kind: files.enter_context(_HashingWriter(folder / names[kind])) for kind in kinds
                           if kind in arrays}
                for kind, handle in handles.items():
                    np.lib.format.write_array_header_1_0(handle, {"descr": np.lib.format.dtype_to_descr(
                        stored if raw else np.dtype(np.float16)), "fortran_order": False, "shape": (stop - start, dims[kind])})
                writer = None
                for lo in range(start, stop, CHUNK_ROWS):
                    hi = min(lo + CHUNK_ROWS, stop)
                    for kind, handle in handles.items():
                        modality, rows = arrays[kind]
                        block = _read_rows(opened, modality, rows[lo:hi])
                        handle.write((block.astype(stored) if raw else _normalise(block).astype(np.float16)).tobytes())
                    table = _metadata_table(index, image_rows[lo:hi], caption_rows[lo:hi], labels, classes)
                    if writer is None:
                        writer = files.enter_context(pq.ParquetWriter(folder / names["metadata"], table.schema))
                    writer.write_table(table)
                    bars.advance(task, hi - lo)
            digests.update({names[kind]: handle.hexdigest() for kind, handle in handles.items()})
            digests[names["metadata"]] = file_sha256(folder / names["metadata"])  # small: read back after writing
    return dict(sorted(digests.items()))


class _HashingWriter:
    """A binary file that keeps the SHA-256 of what is written to it."""

    def __init__(self, path: Path):
        self.path, self.digest = path, hashlib.sha256()

    def __enter__(self) -> _HashingWriter:
        self.handle = open(self.path, "wb")  # closed by __exit__
        return self

    def __exit__(self, *exc) -> None:
        self.handle.close()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.handle.write(data)

    def hexdigest(self) -> str:
        return self.digest.hexdigest()


def _is_part_name(name: object) -> bool:
    """Whether `name` is an export part's relative name (`img_emb/img_emb_3.npy`, ...), nothing else: names read from
    a manifest are data, never trusted as paths (no '..', no absolute path, no other folder)."""
    if not isinstance(name, str):
        return False
    match = re.fullmatch(r"(img_emb|text_emb|metadata)/\1_(0|[1-9][0-9]*)(\.npy|\.parquet)", name)
    return match is not None and _EXPORT_KINDS[match.group(1)] == match.group(3)


def read_export_manifest(path: Path, fix: str) -> dict[str, str]:
    """{part name: sha256} from an export's vlmcache-export.json, refused in one line unless well-formed."""
    with _reading(path, "vlmcache export manifest", fix):
        manifest = json.loads(path.read_text(encoding="utf-8"))
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (not isinstance(manifest, dict) or manifest.get("vlmcache_export") != 1 or not isinstance(files, dict)
            or not all(_is_part_name(name) and isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)
                       for name, digest in files.items())):
        raise VlmcacheError(f"{path}: not a vlmcache export manifest (it needs vlmcache_export: 1 and files: "
                            f"{{part: sha256}}); {fix}")
    return files


def _earlier_export(out: Path) -> list[Path]:
    """The files a new export at `out` replaces: none for a missing or empty folder, the parts of an earlier
    vlmcache export (each checked unchanged against its manifest). Anything else at `out` is refused: an
    export replaces the whole folder, and only what vlmcache wrote may go."""
    if not out.exists():
        return []
    if not out.is_dir():
        raise VlmcacheError(f"--out {out}: is a file; pass a folder")
    entries = sorted(out.iterdir())
    if not entries:
        return []
    manifest = out / EXPORT_MANIFEST
    if not manifest.is_file():
        older = (f" (an export without {EXPORT_MANIFEST}, as older vlmcache wrote, is not recognised: remove it "
                 "yourself)") if (out / "img_emb").is_dir() else ""
        raise VlmcacheError(f"--out {out}: holds files that are not a vlmcache export ({entries[0].name}); choose an "
                            f"empty or new folder{older}")
    fix = "choose an empty or new --out"
    listed = read_export_manifest(manifest, fix)
    present = []
    for entry in entries:
        if entry.name in _EXPORT_KINDS and entry.is_dir() and not entry.is_symlink():
            present += sorted(entry.iterdir())
        elif entry != manifest:
            present.append(entry)
    for path in present:
        name = path.relative_to(out).as_posix()
        if name not in listed or path.is_symlink() or not path.is_file():
            raise VlmcacheError(f"{path}: not part of the earlier export in {out} (its {EXPORT_MANIFEST} does not list "
                                f"it); move it out of the folder (export replaces it as a whole), or {fix}")
        with _reading(path, "file", fix):
            changed = file_sha256(path) != listed[name]
        if changed:
            raise VlmcacheError(f"{path}: changed since vlmcache exported it (sha256 differs from {manifest}); move "
                                f"it out of the folder (export replaces it as a whole), or {fix}")
    return present


def _staging_folder(out: Path) -> Path:
    """A new, empty folder beside `out` that the export is written into before it is renamed to `out`."""
    staging = out.with_name(f".{out.name}.export-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
    except OSError as error:
        if staging.exists():  # never reused or removed: it is not known to be ours
            raise VlmcacheError(f"{staging}: left by an export that was killed; delete it and export again") from None
        raise VlmcacheError(f"--out {out}: cannot create {staging} ({error.strerror}); choose a writable "
                            "location") from None
    return staging


def _swap_in(staging: Path, out: Path, earlier: list[Path]) -> None:
    """Rename the finished export to `out`. What was there (an empty folder or an earlier export) is moved aside
    first and then removed file by file: only the files `_earlier_export` checked, never a whole tree."""
    try:
        if not out.exists():
            staging.rename(out)
            return
        retired = out.with_name(f".{out.name}.replaced-{os.getpid()}")
        out.rename(retired)
        try:
            staging.rename(out)
        except OSError:
            retired.rename(out)  # the earlier export back where it was
            raise
    except OSError as error:
        raise VlmcacheError(f"--out {out}: cannot move the new export into place ({error.strerror}); the earlier "
                            "one is unchanged") from None
    # The new export is in place: what cannot be removed (a file that appeared after the check, a permission)
    # stays in the hidden folder rather than failing an export that succeeded.
    for path in [*(retired / path.relative_to(out) for path in earlier), retired / EXPORT_MANIFEST]:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
    for folder in [*(retired / kind for kind in _EXPORT_KINDS), retired]:
        with contextlib.suppress(OSError):  # rmdir: only once empty
            folder.rmdir()


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


# --- readers: one per kind of source file, each failure one line naming the file --------------------------------

# What numpy, zipfile, zlib, pyarrow and the OS raise on a bad or unreadable file (pyarrow's ArrowIOError is
# OSError, ArrowInvalid a ValueError; the rest are ArrowException). numpy's .npy header parser lets tokenize's
# TokenError and SyntaxError (IndentationError) through for a garbled header. Our own VlmcacheError passes through.
_READ_ERRORS = (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error, NotImplementedError, pa.ArrowException,
                tokenize.TokenError, SyntaxError)


@contextlib.contextmanager
def _reading(path: Path, what: str, fix: str) -> Iterator[None]:
    """Turn a library's exception while reading `path` into one line that names it, says what it is not, and `fix`."""
    try:
        yield
    except _READ_ERRORS as error:
        detail = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        # pyarrow's messages span lines and may quote raw bytes of the file: one line, control characters escaped.
        detail = "".join(c if c.isprintable() else repr(c)[1:-1] for c in " ".join(detail.split()))[:300]
        detail = detail or type(error).__name__
        raise VlmcacheError(f"{path}: not a readable {what} ({detail}); {fix}") from None


def _check_embedding_header(name: str, shape: tuple, dtype: np.dtype) -> None:
    """Refuse, from the header alone, what is not a (rows, dim > 0) float matrix."""
    if dtype.hasobject:
        raise VlmcacheError(f"{name}: holds Python objects (pickled data), which vlmcache never loads; save the "
                            "embeddings as a float16/float32 array")
    if dtype.kind != "f":
        raise VlmcacheError(f"{name}: dtype {dtype}, expected float16/float32 embeddings")
    if len(shape) != 2 or min(shape) < 0:
        raise VlmcacheError(f"{name}: shape {shape}, expected (rows, dim)")
    if shape[1] == 0:
        raise VlmcacheError(f"{name}: shape {shape} has no embedding dimensions; expected (rows, dim) with dim > 0")


def _read_npy_header(handle, name: str) -> tuple[tuple[int, int], np.dtype]:
    """Shape and dtype of the .npy at `handle`'s position, refused unless a C-ordered (rows, dim > 0) float matrix;
    leaves `handle` at the first data byte."""
    version = np.lib.format.read_magic(handle)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(handle)
    _check_embedding_header(name, shape, dtype)
    if fortran_order:
        raise VlmcacheError(f"{name}: stored in Fortran order; save it with np.save from a C-ordered array")
    return shape, dtype


def _check_data_size(name: str, shape: tuple[int, int], dtype: np.dtype, available: int) -> None:
    """Refuse data that is not exactly as long as the header says: a cut-off copy would read as zeros or junk."""
    expected = shape[0] * shape[1] * dtype.itemsize
    if available != expected:
        state = "truncated" if available < expected else "longer than that"
        raise VlmcacheError(f"{name}: its header says {shape[0]:,} x {shape[1]} {dtype} ({expected:,} bytes) but it "
                            f"holds {available:,} bytes ({state}); copy or export it again")


class NpyRows:
    """The reader of .npy files: checks the header and the size, then gives rows by plain reads (`rows[indices]`).

    Not a memory map: the mapped pages a gather touches count as the process's resident memory, so a
    memory-mapped 1,000,000 x 512 import measured 3 GB peak RSS; these window reads keep it to one window.
    """

    def __init__(self, path: Path):
        self.path = path
        with _reading(path, ".npy file", _NPY_FIX), open(path, "rb") as handle:
            self.shape, self.dtype = _read_npy_header(handle, str(path))
            self.offset = handle.tell()
            _check_data_size(str(path), self.shape, self.dtype, os.fstat(handle.fileno()).st_size - self.offset)
        self.ndim = 2

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows)
        ascending = bool(np.all(rows[1:] >= rows[:-1]))
        order = None if ascending else np.argsort(rows, kind="stable")
        wanted = rows if ascending else rows[order]
        width, itemsize = self.shape[1], self.dtype.itemsize
        found = np.empty((len(wanted), width), self.dtype)
        with _reading(self.path, ".npy file", _NPY_FIX), open(self.path, "rb") as handle:
            done = 0
            while done < len(wanted):
                low = int(wanted[done])
                end = int(np.searchsorted(wanted, low + CHUNK_ROWS, side="left"))  # rows in [low, low + CHUNK_ROWS)
                high = int(wanted[end - 1]) + 1
                handle.seek(self.offset + low * width * itemsize)
                if high - low == end - done:  # a contiguous run: read straight into place
                    complete = handle.readinto(found[done:end]) == (end - done) * width * itemsize
                else:
                    block = np.fromfile(handle, self.dtype, (high - low) * width)
                    complete = block.size == (high - low) * width
                    if complete:
                        np.take(block.reshape(-1, width), wanted[done:end] - low, axis=0, out=found[done:end])
                if not complete:  # the size was checked on opening: the file was cut since
                    raise VlmcacheError(f"{self.path}: shorter than when the import began (rows {low}..{high - 1} "
                                        "missing); leave the source unchanged while it is imported")
                done = end
        if ascending:
            return found
        result = np.empty_like(found)
        result[order] = found
        return result


def _npz_members(archive: zipfile.ZipFile) -> dict[str, str]:
    """{array name: member name} of the arrays in an open .npz."""
    return {name.removesuffix(".npy"): name for name in archive.namelist() if name.endswith(".npy")}


def npz_names(path: Path) -> list[str]:
    """Names of the arrays in a .npz file (refused in one line if it is not a readable zip archive)."""
    with _reading(path, ".npz file", _NPZ_FIX), zipfile.ZipFile(path) as archive:
        return sorted(_npz_members(archive))


def read_npz(path: Path, keys: list[str]) -> list[np.ndarray]:
    """The reader of .npz files: arrays `keys`, each checked like an .npy (float (rows, dim > 0), exact size, no
    pickles) before its data is read, then read to the member's end so zipfile checks its CRC."""
    with _reading(path, ".npz file", _NPZ_FIX), zipfile.ZipFile(path) as archive:
        members = _npz_members(archive)
        missing = [key for key in keys if key not in members]
        if missing:
            raise VlmcacheError(f"{path}: no array {missing[0]!r} (it has {', '.join(sorted(members)) or 'none'}); every "
                                "shard needs the feature set chosen with --features")
        return [_read_npz_member(archive, members[key], f"{path} [{key}]") for key in keys]


def _read_npz_member(archive: zipfile.ZipFile, member: str, name: str) -> np.ndarray:
    """One array of an open .npz, checked like an .npy file (`name` says which in messages)."""
    info = archive.getinfo(member)
    with archive.open(info) as handle:
        shape, dtype = _read_npy_header(handle, name)
        # Checked against the size the archive records before reading, so a header claiming terabytes allocates nothing.
        _check_data_size(name, shape, dtype, info.file_size - handle.tell())
        data = handle.read(info.file_size - handle.tell())  # to the end: a corrupt byte fails zipfile's CRC check here
    if len(data) != shape[0] * shape[1] * dtype.itemsize:
        raise VlmcacheError(f"{name}: truncated inside the archive; {_NPZ_FIX}")
    return np.frombuffer(data, dtype).reshape(shape)


def read_parquet(path: Path, caption_column: str, columns: list[str]) -> pa.Table:
    """The reader of metadata parquet files: `caption_column` (which it must have) and those of `columns` it has,
    fully validated (a corrupt page or invalid UTF-8 in a string column is refused here, not met later)."""
    with _reading(path, "parquet file", _PARQUET_FIX):
        parquet = pq.ParquetFile(path)
        names = parquet.schema_arrow.names
        if caption_column not in names:
            raise VlmcacheError(f"{path}: no caption column {caption_column!r} (it has {', '.join(names)}); "
                                "pass --caption-column")
        wanted = [column for column in dict.fromkeys([caption_column, *columns]) if column in names]
        twice = next((column for column in wanted if names.count(column) > 1), None)
        if twice:
            raise VlmcacheError(f"{path}: has two columns named {twice!r}; {_PARQUET_FIX} with one")
        table = parquet.read(columns=wanted)
        table.validate(full=True)
    return table


def _is_text_type(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)


def _is_binary_type(kind: pa.DataType) -> bool:
    return (pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_binary_view(kind)
            or pa.types.is_fixed_size_binary(kind))


def _text_column(table: pa.Table, column: str, path: Path, *, integers: bool, hint: str) -> list[str | None]:
    """A metadata column as text: strings as they are, binary decoded as UTF-8, integers (when `integers`) as
    digits, nulls as None. Any other type is refused: str() of it (b'a dog', [1, 2]) would be wrong text."""
    kind = table.schema.field(column).type
    values_type = kind.value_type if pa.types.is_dictionary(kind) else kind  # pandas categoricals
    values = table[column].to_pylist()
    if _is_text_type(values_type) or pa.types.is_null(values_type):
        return values
    if _is_binary_type(values_type):
        return [_decoded(value, path, column, row) for row, value in enumerate(values)]
    if integers and pa.types.is_integer(values_type):
        return [None if value is None else str(value) for value in values]
    raise VlmcacheError(f"{path}: column {column!r} holds {kind}, not text; {hint}")


def _decoded(value: bytes | None, path: Path, column: str, row: int) -> str | None:
    try:
        return None if value is None else value.decode("utf-8")
    except UnicodeDecodeError as error:
        raise VlmcacheError(f"{path}: column {column!r} row {row}: bytes that are not UTF-8 text (at byte {error.start}); "
                            "store the column as UTF-8 strings") from None


def _no_nulls(values: list[str | None], path: Path, column: str) -> list[str]:
    """Refuse a missing id or split: str(None) would make every such row the id or split "None"."""
    row = next((row for row, value in enumerate(values) if value is None), None)
    if row is not None:
        raise VlmcacheError(f"{path}: column {column!r} row {row}: missing (null); fill it in")
    return values


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
        image, text = read_npz(self.image_file, [self.image_key, self.text_key])  # one open, both members
        return image, text


def _numbered(folder: Path, prefix: str, suffix: str) -> dict[int, Path]:
    pattern = re.compile(rf"{prefix}_(\d+){re.escape(suffix)}$")
    return {int(m.group(1)): path for path in folder.glob(f"{prefix}_*{suffix}") if (m := pattern.match(path.name))}


def _find_parts(source: Path, format: str, features: str | None) -> list[_Part]:
    """The source's file groups in row order, checked to exist and pair up."""
    if not source.is_dir():
        raise VlmcacheError(f"{source}: no such folder; pass the folder holding the {format} files")
    if format == "clip-retrieval":
        found = {kind: _numbered(source / kind, kind, ext) for kind, ext in _EXPORT_KINDS.items()}
        if not found["img_emb"]:
            raise VlmcacheError(f"{source}: no img_emb/img_emb_N.npy; not a clip-retrieval embeddings folder")
        for kind in ("text_emb", "metadata"):
            missing = sorted(set(found["img_emb"]) - set(found[kind]))
            if missing:
                raise VlmcacheError(f"{source}: img_emb_{missing[0]}.npy has no {kind}/{kind}_{missing[0]}"
                                    f"{_EXPORT_KINDS[kind]}; vlmcache needs image "
                                    "embeddings, caption embeddings and captions for every row")
        return [_Part(found["img_emb"][n], found["text_emb"][n], found["metadata"][n]) for n in sorted(found["img_emb"])]
    if format == "datacomp":
        shards = sorted(source.rglob("*.npz"))
        if not shards:
            raise VlmcacheError(f"{source}: no .npz files; not a DataComp embeddings folder")
        names = npz_names(shards[0])
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


def _export_hashes(source: Path, files: list[Path]) -> dict[Path, str]:
    """For a folder a vlmcache export wrote: the SHA-256 its manifest records for each file, once the folder is
    checked to hold exactly the parts it lists (leftovers of another export would otherwise be read too).
    {} for a folder without a manifest. Names in the manifest are only compared, never opened."""
    manifest = source / EXPORT_MANIFEST
    if not manifest.exists():
        return {}
    fix = "export it again, or delete the manifest to import the folder unchecked"
    listed = read_export_manifest(manifest, fix)
    found = {path.relative_to(source).as_posix(): path for path in files}
    extra = sorted(set(found) - set(listed))
    if extra:
        raise VlmcacheError(f"{found[extra[0]]}: not part of the export {manifest} records (a leftover of another "
                            "export?); remove it, or delete the manifest to import every part")
    missing = sorted(set(listed) - set(found))
    if missing:
        raise VlmcacheError(f"{source}: {EXPORT_MANIFEST} lists {missing[0]}, which is missing; {fix}")
    return {found[name]: digest for name, digest in listed.items()}


def _read_metadata(part: _Part, caption_column: str, split_column: str) -> dict[str, list]:
    """Captions, ids, paths and splits of one part's rows (only the columns needed are read).

    The paths (image_path or url) are data from the file, not trusted: import only stores them in the cache's
    index as each image's label, like the ids, and never opens or resolves them. (serve is the one command that
    opens recorded image paths; its servable_image checks each before use.)
    """
    if part.meta_file.suffix == ".txt":
        with _reading(part.meta_file, "captions file", "give one UTF-8 caption per line"):
            try:
                text = part.meta_file.read_text(encoding="utf-8")
            except UnicodeDecodeError as error:
                raise VlmcacheError(f"{part.meta_file}: not valid UTF-8 at byte {error.start}") from None
        # Lines end at "\n" only: str.splitlines would also split a caption at \x1c, \x85 or \u2028, shifting rows.
        captions = [line.removesuffix("\r") for line in text.removesuffix("\n").split("\n")] if text else []
        return {"caption": captions, "id": [f"{part.meta_file.parent.name}/{n}" for n in range(len(captions))],
                "path": [""] * len(captions), "split": None}
    path = part.meta_file
    table = read_parquet(path, caption_column, [*_ID_COLUMNS, split_column])
    names, rows, stem = table.column_names, table.num_rows, path.stem
    id_column = next((name for name in _ID_COLUMNS if name in names), None)
    path_column = next((name for name in _PATH_COLUMNS if name in names), None)
    keep = "store it as text or integers"
    ids = (_no_nulls(_text_column(table, id_column, path, integers=True, hint=keep), path, id_column) if id_column
           else [f"{stem}/{n}" for n in range(rows)])
    paths = ([value or "" for value in _text_column(table, path_column, path, integers=False, hint="store it as text")]
             if path_column else [""] * rows)
    splits = (_no_nulls(_text_column(table, split_column, path, integers=True, hint="pass --split-column naming a "
                                     "text column"), path, split_column) if split_column in names else None)
    return {"caption": _text_column(table, caption_column, path, integers=False,
                                    hint="pass --caption-column naming a text column"),
            "id": ids, "path": paths, "split": splits}


def _check_array(array: NpyRows | np.ndarray, path: Path, key: str | None, rows: int, meta_file: Path, dims: dict,
                 kind: str) -> None:
    """Rows as many as the metadata's and one dimension per modality (dtype and shape are the readers' checks)."""
    name = f"{path}" + (f" [{key}]" if key else "")
    if array.shape[0] != rows:
        raise VlmcacheError(f"{name}: {array.shape[0]:,} rows but {meta_file} has {rows:,}; they must match row for row")
    if dims.setdefault(kind, array.shape[1]) != array.shape[1]:
        raise VlmcacheError(f"{name}: dimension {array.shape[1]}, but earlier files have {dims[kind]}; one import, one dimension")


def hash_files(paths: list[Path]) -> str:
    """SHA-256 over the bytes of `paths` in order (names and sizes included), read in 8 MB blocks."""
    return _hash_files(paths, each=False)[0]


def _hash_files(paths: list[Path], each: bool) -> tuple[str, dict[Path, str]]:
    """hash_files' digest and, when `each`, every file's own SHA-256, in one read of each file."""
    digest, digests = hashlib.sha256(), {}
    for path in paths:
        own = hashlib.sha256()
        with _reading(path, "file", "check that it can be read"), open(path, "rb") as handle:
            digest.update(f"{path.name}\0{os.fstat(handle.fileno()).st_size}\0".encode())
            while block := handle.read(8 << 20):
                digest.update(block)
                if each:
                    own.update(block)
        digests[path] = own.hexdigest()
    return digest.hexdigest(), digests


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
    files = [p for part in parts for p in dict.fromkeys([part.image_file, part.text_file, part.meta_file])]
    recorded = _export_hashes(source, files) if format == "clip-retrieval" else {}
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
    captions = [c if c is not None else "" for meta in metas for c in meta["caption"]]
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

    source_hash, digests = _hash_files(files, each=bool(recorded))
    changed = next((path for path, digest in recorded.items() if digests[path] != digest), None)
    if changed:
        raise VlmcacheError(f"{changed}: changed since vlmcache exported it (sha256 differs from {source / EXPORT_MANIFEST}); "
                            "export it again, or delete the manifest to import the folder as it is")
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
        "libraries": {"python": platform.python_version(), "numpy": np.__version__, "h5py": h5py_version(),
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
