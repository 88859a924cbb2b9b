"""Hugging Face datasets read in place with pyarrow: folders written by `datasets`' `save_to_disk` and parquet
files in the Hub's layout. Nothing is converted or unpacked, and `datasets` itself is not needed to read them.

Layouts:
- `save_to_disk` of a Dataset: `state.json` + Arrow files (`data-00000-of-00001.arrow`, ...); of a DatasetDict:
  `dataset_dict.json` + one such folder per split.
- Hub parquet: a folder of `.parquet` files such as `data/train-00000-of-00002.parquet`, `train/0000.parquet`
  or `validation.parquet`, or one `.parquet` file.

Row order: files in name order (the order state.json lists for Arrow files), rows in file order, so the same
files always give the same rows and a resumed extract meets every row where it was.

Columns: the image column is an `Image()` feature (a struct of `bytes` and `path`), another struct with a
`bytes` field, raw bytes, or a column of paths; the caption column holds a string or a list of strings.
Both are found by name and type unless given (`--image-column`, `--caption-column`). A row's split is its
split column (`--split-key`, "split") when the files have one, else the split the file's path names
(`train`, `validation` → val, ...), else the split the folder was saved as, else train.

Images are read from their bytes: an image stored in a row is named `<file>#<row>/<column>` wherever
vlmcache keeps image paths, and `read_row_image` reads it (one row group or memory-mapped Arrow file at a
time). A path stored in the data is data, never a path on this machine: it is only used under
`--images-dir`, checked with `unsafe_relative_path` and joined to that folder by the caller.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePosixPath

from vlmcache.errors import VlmcacheError

IMAGE_NAMES = ("image", "img", "jpg", "jpeg", "png", "webp", "image_path", "file_name", "filename", "filepath", "path")
CAPTION_NAMES = ("caption", "captions", "text", "sentences", "raw")
SUFFIXES = (".parquet", ".arrow")
# The Hub's split words (datasets' data_files patterns) and the split names vlmcache uses for them; restval is
# Karpathy's extra training images, as in the Karpathy JSON reader.
SPLIT_WORDS = {"train": "train", "training": "train", "restval": "train", "validation": "val", "valid": "val",
               "val": "val", "dev": "val", "test": "test", "testing": "test"}
_ROW_REF = re.compile(r"^(?P<file>.+\.(?:parquet|arrow))#(?P<row>\d+)/(?P<column>.+)$")
_INSTALL = "reading Hugging Face datasets needs pyarrow: pip install 'vlmcache[hf]'"


@dataclass
class DataFile:
    """One Arrow or parquet file of a dataset, with the split its name or folder says (None: says none)."""

    path: Path  # resolved
    name: str  # relative to the dataset root, for image ids and messages
    split: str | None


@dataclass
class Row:
    """One row as listing reads it (no image bytes): where it is, its id, split, captions and stored path."""

    shard: Path
    number: int
    key: str  # the image id
    split: str
    ref: str  # `<file>#<row>/<column>`: the image's bytes
    path: str | None  # the path the row stores for its image (data, never opened unchecked)
    captions: list[str]
    problem: str | None = None  # why the row cannot be used (its caption cell), or None

    def where(self) -> str:
        return f"{self.shard} row {self.number}"


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
    except ImportError:
        raise VlmcacheError(_INSTALL) from None
    return pa, pc, pq


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """pyarrow's and the OS's exceptions on a bad file as one line naming it (ArrowInvalid is a ValueError,
    ArrowIOError an OSError)."""
    pa = _pyarrow()[0]
    try:
        yield
    except (OSError, ValueError, pa.ArrowException) as error:
        detail = " ".join(str(error).split())[:300] or type(error).__name__
        raise VlmcacheError(f"{path}: not a readable {path.suffix[1:]} file ({detail}); write it again") from None


def looks_like_hf(path: Path) -> bool:
    """True for a .parquet/.arrow file, a `save_to_disk` folder, or a folder with parquet files up to two folders
    down (data/train-00000-of-00001.parquet, default/train/0000.parquet)."""
    if path.is_file():
        return path.suffix in SUFFIXES
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return True
    return any(next(path.glob(pattern), None) for pattern in ("*.parquet", "*/*.parquet", "*/*/*.parquet"))


def normalise_split(name: str) -> str:
    """vlmcache's name of a split: validation/valid/dev → val, training → train, ...; other names as they are."""
    return SPLIT_WORDS.get(name.lower(), name)


def split_from_name(name: str) -> str | None:
    """The split a file's relative path names: the first folder or file name whose leading word is a split word
    (data/train-00000-of-00002.parquet, validation/0000.parquet, test.parquet); None if none does."""
    for part in PurePosixPath(name).with_suffix("").parts:
        word = re.split(r"[-_.]", part, maxsplit=1)[0].lower()
        if word in SPLIT_WORDS:
            return SPLIT_WORDS[word]
    return None


def _bare_name(name: object, listed_in: Path) -> str:
    """A file or folder name read from a JSON file of the dataset: it must name an entry of that folder, not a path."""
    if not isinstance(name, str) or not name or name in (".", "..") or any(c in name for c in "/\\\x00"):
        raise VlmcacheError(f"{listed_in}: lists {name!r}, which is not a plain file or folder name; write the "
                            "dataset again with save_to_disk")
    return name


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise VlmcacheError(f"{path}: not a readable JSON file ({error}); write the dataset again with save_to_disk") from None
    if not isinstance(value, dict):
        raise VlmcacheError(f"{path}: not a JSON object; write the dataset again with save_to_disk")
    return value


def _saved_files(folder: Path, root: Path, split: str | None) -> list[DataFile]:
    """The Arrow files of one `save_to_disk` Dataset folder, in the order its state.json lists them."""
    state = folder / "state.json"
    entries = _read_json(state).get("_data_files")
    if not isinstance(entries, list) or not entries:
        raise VlmcacheError(f"{state}: lists no data files ('_data_files'); write the dataset again with save_to_disk")
    saved = _read_json(state).get("_split")
    split = split or (normalise_split(saved) if isinstance(saved, str) else None)
    files = []
    for entry in entries:
        name = _bare_name(entry.get("filename") if isinstance(entry, dict) else None, state)
        if not (folder / name).is_file():
            raise VlmcacheError(f"{state}: lists {name}, which is not in {folder}; copy the whole folder")
        files.append(DataFile((folder / name).resolve(), (folder / name).relative_to(root).as_posix(), split))
    return files


def data_files(root: Path) -> list[DataFile]:
    """Every Arrow or parquet file of the dataset at `root`, in row order (see the module docstring)."""
    if root.is_file():
        return [DataFile(root.resolve(), root.name, split_from_name(root.name))]
    if (root / "dataset_dict.json").is_file():
        splits = _read_json(root / "dataset_dict.json").get("splits")
        if not isinstance(splits, list) or not splits:
            raise VlmcacheError(f"{root / 'dataset_dict.json'}: lists no splits; write the dataset again with save_to_disk")
        names = [_bare_name(name, root / "dataset_dict.json") for name in splits]
        return [file for name in names for file in _saved_files(root / name, root, normalise_split(name))]
    if (root / "state.json").is_file():
        return _saved_files(root, root, None)
    found = sorted(root.rglob("*.parquet"), key=lambda path: path.relative_to(root).as_posix())
    if not found:
        raise VlmcacheError(f"{root}: no .parquet files and no save_to_disk folder (state.json, dataset_dict.json)")
    return [DataFile(path.resolve(), path.relative_to(root).as_posix(),
                     split_from_name(path.relative_to(root).as_posix())) for path in found]


@lru_cache(maxsize=8)
def _arrow_table(path: str):
    """A whole Arrow file (save_to_disk writes the IPC stream format), memory-mapped: nothing is copied, and
    only the pages of the rows read are loaded."""
    pa = _pyarrow()[0]
    with _reading(Path(path)):
        return pa.ipc.open_stream(pa.memory_map(path)).read_all()


def _schema(file: DataFile):
    pq = _pyarrow()[2]
    if file.path.suffix == ".arrow":
        return _arrow_table(str(file.path)).schema
    with _reading(file.path):
        return pq.ParquetFile(file.path).schema_arrow


def _image_features(schema) -> list[str]:
    """The columns `datasets` declares as Image features (in the schema's huggingface metadata)."""
    try:
        features = json.loads((schema.metadata or {}).get(b"huggingface", b"{}"))["info"]["features"]
    except (KeyError, TypeError, ValueError):
        return []
    return [name for name, feature in features.items()
            if isinstance(feature, dict) and feature.get("_type") == "Image" and name in schema.names]


def _columns_hint(schema) -> str:
    return f"it has the columns {', '.join(schema.names) or '(none)'}"


def image_column(schema, given: str | None, file: DataFile) -> str:
    """The image column: `given`, else the one Image feature, else the one struct column with a `bytes`
    field, else the first column named like an image (IMAGE_NAMES)."""
    pa = _pyarrow()[0]
    if given is not None:
        if given not in schema.names:
            raise VlmcacheError(f"{file.path}: no image column {given!r}; {_columns_hint(schema)}; pass --image-column")
        return given
    candidates = _image_features(schema) or [field.name for field in schema if pa.types.is_struct(field.type)
                                             and field.type.get_field_index("bytes") >= 0]
    if len(candidates) > 1:
        raise VlmcacheError(f"{file.path}: several image columns ({', '.join(candidates)}); pass --image-column")
    candidates = candidates or [name for name in IMAGE_NAMES if name in schema.names][:1]
    if not candidates:
        raise VlmcacheError(f"{file.path}: no image column (no Image feature, no struct with bytes, none named "
                            f"{', '.join(IMAGE_NAMES[:3])}, ...); {_columns_hint(schema)}; pass --image-column")
    return candidates[0]


def caption_column(schema, given: str | None, file: DataFile) -> str:
    """The caption column: `given`, else the first of CAPTION_NAMES the file has."""
    if given is not None and given not in schema.names:
        raise VlmcacheError(f"{file.path}: no caption column {given!r}; {_columns_hint(schema)}; pass --caption-column")
    found = given or next((name for name in CAPTION_NAMES if name in schema.names), None)
    if found is None:
        raise VlmcacheError(f"{file.path}: no caption column (none named {', '.join(CAPTION_NAMES)}); "
                            f"{_columns_hint(schema)}; pass --caption-column")
    return found


def _image_kind(schema, column: str, file: DataFile) -> str:
    """"struct" (bytes and maybe a path), "bytes" or "path": what the image column stores."""
    pa = _pyarrow()[0]
    kind = schema.field(column).type
    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
        return "struct"
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return "bytes"
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return "path"
    raise VlmcacheError(f"{file.path}: image column {column!r} holds {kind}, not images (an Image feature, bytes or "
                        "paths); pass --image-column")


def _no_bytes(file: DataFile, schema, image: str) -> bool:
    """True when no row of a struct image column stores bytes (`to_parquet` of a dataset of local image files
    keeps their paths only). Read from null counts: the Arrow array's, or the parquet statistics'."""
    pq = _pyarrow()[2]
    if file.path.suffix == ".arrow":
        column = _arrow_table(str(file.path)).column(image)
        return all(chunk.field("bytes").null_count == len(chunk) for chunk in column.chunks)
    with _reading(file.path):
        metadata = pq.ParquetFile(file.path).metadata
    wanted = f"{image}.bytes"
    for group in range(metadata.num_row_groups):
        chunks = [metadata.row_group(group).column(i) for i in range(metadata.num_columns)]
        stats = next((chunk.statistics for chunk in chunks if chunk.path_in_schema == wanted), None)
        if stats is None or not stats.has_null_count or stats.null_count != metadata.row_group(group).num_rows:
            return False
    return metadata.num_rows > 0


def _read_columns(file: DataFile, schema, names: list[str], image: str, kind: str) -> tuple[int, dict[str, list], list | None]:
    """(rows, the listing's columns as Python lists, the stored image paths or None), never reading image bytes:
    of a struct image column only its `path` field is read."""
    pa, pc, pq = _pyarrow()
    stored = kind == "path" or (kind == "struct" and schema.field(image).type.get_field_index("path") >= 0)
    with _reading(file.path):
        if file.path.suffix == ".arrow":
            table = _arrow_table(str(file.path))  # memory-mapped: the columns not listed are never touched
        else:
            extra = [f"{image}.path" if kind == "struct" else image] if stored else []
            table = pq.ParquetFile(file.path).read(columns=[*names, *extra])  # "image.path": that field alone
    values = {name: table.column(name).to_pylist() for name in names}
    paths = None
    if stored:
        column = table.column(image)
        paths = (pc.struct_field(column, "path") if kind == "struct" else column).to_pylist()
    return table.num_rows, values, paths


def _captions(value: object) -> list[str] | str:
    """A caption cell as a list of captions, or why it is not one. Karpathy-style sentence structs give their `raw`."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        texts = [item.get("raw") if isinstance(item, dict) else item for item in value]
        if all(isinstance(text, str) for text in texts):
            return texts
    if value is None or value == []:
        return "no caption (the caption cell is empty)"
    return f"the caption cell holds {type(value).__name__} {str(value)[:40]!r}, not a string or a list of strings"


def scan_file(file: DataFile, image: str | None, caption: str | None, split_key: str, by_path: bool) -> list[Row]:
    """The rows of one file (captions, splits, stored image paths; no image bytes). `by_path`: the caller reads
    images through their stored paths (--images-dir), so a column of paths will do; else bytes are needed."""
    schema = _schema(file)
    image, caption = image_column(schema, image, file), caption_column(schema, caption, file)
    kind = _image_kind(schema, image, file)
    if not by_path and (kind == "path" or (kind == "struct" and _no_bytes(file, schema, image))):
        raise VlmcacheError(f"{file.path}: image column {image!r} holds paths, not image bytes; pass --images-dir "
                            "FOLDER to read them inside that folder")
    names = list(dict.fromkeys([caption, *([split_key] if split_key in schema.names else [])]))
    count, columns, paths = _read_columns(file, schema, names, image, kind)
    rows = []
    for number in range(count):
        stored = paths[number] if paths is not None else None
        split = columns[split_key][number] if split_key in columns else None
        captions = _captions(columns[caption][number])
        rows.append(Row(shard=file.path, number=number, key=stored or f"{file.name}#{number}",
                        split=normalise_split(str(split)) if split is not None else file.split or "train",
                        ref=f"{file.path}#{number}/{image}", path=stored,
                        captions=captions if isinstance(captions, list) else [],
                        problem=None if isinstance(captions, list) else captions))
    return rows


def unsafe_relative_path(path: str | None) -> str | None:
    """Why a path stored in the data cannot name a file inside --images-dir, or None if it can: it must be
    relative and stay inside the folder (`a/../b.jpg` does, `../b.jpg` and `/etc/x` do not)."""
    if not path:
        return "no image path in the row"
    if "\x00" in path:
        return "a NUL in the image path"
    if os.path.isabs(path) or path.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", path):
        return f"an absolute image path {path!r}"
    normal = os.path.normpath(path.replace("\\", "/"))
    if normal == ".." or normal.startswith("../"):
        return f"an image path {path!r} that leaves --images-dir"
    return None


def split_row_ref(ref: str | Path) -> tuple[Path, int, str] | None:
    """(file, row, column) for an image named `<file>#<row>/<column>` whose .parquet/.arrow file exists; None
    for any other path."""
    match = _ROW_REF.match(str(ref))
    if match is None or not Path(match["file"]).is_file():
        return None
    return Path(match["file"]), int(match["row"]), match["column"]


def is_row_ref(ref: str | Path) -> bool:
    """True for an image named `<file>#<row>/<column>` whose file exists."""
    return split_row_ref(ref) is not None


@lru_cache(maxsize=16)
def _row_group_starts(path: str) -> tuple[int, ...]:
    """The first row of each row group of a parquet file, and its row count last."""
    pq = _pyarrow()[2]
    with _reading(Path(path)):
        metadata = pq.ParquetFile(path).metadata
    starts = [0]
    for group in range(metadata.num_row_groups):
        starts.append(starts[-1] + metadata.row_group(group).num_rows)
    return tuple(starts)


@lru_cache(maxsize=2)
def _row_group(path: str, group: int, column: str):
    """One row group's image column. A DataLoader worker reads consecutive rows, so the group it read last is
    usually the one it needs next; two stay cached (a batch may straddle two groups)."""
    pq = _pyarrow()[2]
    with _reading(Path(path)):
        return pq.ParquetFile(path).read_row_group(group, columns=[column]).column(column)


def _cell(path: Path, row: int, column: str):
    """The image cell of one row, as a Python value (a dict for Image features)."""
    if path.suffix == ".arrow":
        table = _arrow_table(str(path))
        if row >= table.num_rows or column not in table.column_names:
            raise FileNotFoundError(f"no row {row} with a column {column!r} in {path}")
        return table.column(column)[row].as_py()
    starts = _row_group_starts(str(path))
    if row >= starts[-1]:
        raise FileNotFoundError(f"no row {row} in {path} (it has {starts[-1]})")
    group = next(number for number in range(len(starts) - 1) if starts[number + 1] > row)
    return _row_group(str(path), group, column)[row - starts[group]].as_py()


def read_row_image(ref: str | Path) -> io.BytesIO:
    """The image bytes stored in row `<file>#<row>/<column>`. Raises FileNotFoundError if the file, row or
    column is absent or unreadable, and ValueError if the row stores no bytes (a stored path is never opened)."""
    parts = split_row_ref(ref)
    if parts is None:
        raise FileNotFoundError(f"{ref}: not a row of an existing .parquet/.arrow file")
    try:
        value = _cell(*parts)
    except VlmcacheError as error:  # the file went bad since it was listed
        raise FileNotFoundError(str(error)) from None
    data = value.get("bytes") if isinstance(value, dict) else value
    if not isinstance(data, bytes):
        stored = f" (only the path {value.get('path')!r})" if isinstance(value, dict) and value.get("path") else ""
        raise ValueError(f"the row stores no image bytes{stored}; pass --images-dir FOLDER to read stored paths inside it")
    return io.BytesIO(data)
