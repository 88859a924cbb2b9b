"""Image–caption datasets: Flickr8k (official layout), Karpathy JSON (Flickr8k/30k, COCO), CSV/JSONL
pairs, labelled image folders, webdataset tar shards and Hugging Face datasets (save_to_disk folders, Hub
parquet), all read into one `PairDataset` in a documented row order.

Row order (the cache keeps it): images are grouped by split in the order train, val, test, then any
other split name alphabetically; inside a split they keep the order of the source file. Captions follow
their image: all captions of image 0, then of image 1, ... So each split is one contiguous run of image
rows and one contiguous run of caption rows, and a split loads with a single slice.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
import logging
import os
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps

from vlmcache.data import hf, tars
from vlmcache.errors import VlmcacheError
from vlmcache.files import read_json_file

SPLIT_ORDER = ("train", "val", "test")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
ON_ERROR = ("fail", "skip")  # what to do with an item that cannot be read: stop, or record and skip it
FORMATS = ("auto", "flickr8k", "karpathy", "pairs", "imagefolder", "webdataset", "hf")
log = logging.getLogger("vlmcache")


@dataclass
class PairDataset:
    """Images, their captions and splits, in cache row order (see the module docstring)."""

    format: str
    root: Path
    image_paths: list[str]  # absolute paths
    image_ids: list[str]
    image_splits: list[str]
    captions: list[str]
    caption_image: np.ndarray  # int64, caption row -> image row
    classes: list[str] = field(default_factory=list)  # image folders only
    image_labels: np.ndarray | None = None  # int64 class index per image, image folders only
    dropped: list[dict] = field(default_factory=list)  # samples left out under on_error="skip", with reasons

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    @property
    def num_captions(self) -> int:
        return len(self.captions)

    def split_counts(self) -> dict[str, dict[str, int]]:
        """Images and captions per split, e.g. {"train": {"images": 6000, "captions": 30000}}."""
        splits = np.array(self.image_splits)
        counts = {}
        for name in dict.fromkeys(self.image_splits):
            in_split = splits == name
            counts[name] = {
                "images": int(in_split.sum()),
                "captions": int(in_split[self.caption_image].sum()) if self.num_captions else 0,
            }
        return counts

    def fingerprint(self) -> str:
        """SHA-256 over ids, splits, captions, caption→image index and labels: equal iff same data."""
        digest = hashlib.sha256()
        payload = {
            "ids": self.image_ids,
            "splits": self.image_splits,
            "captions": self.captions,
            "caption_image": self.caption_image.tolist(),
            "classes": self.classes,
            "labels": [] if self.image_labels is None else self.image_labels.tolist(),
        }
        digest.update(json.dumps(payload, ensure_ascii=False).encode("utf-8"))
        return digest.hexdigest()


def load_dataset(
    path: str | Path,
    format: str = "auto",
    images_dir: str | Path | None = None,
    splits: list[str] | None = None,
    limit: int | None = None,
    *,
    caption_key: str | None = None,
    split_key: str = "split",
    val_fraction: float | None = None,
    seed: int = 0,
    on_error: str = "fail",
    image_column: str | None = None,
    caption_column: str | None = None,
) -> PairDataset:
    """Read a dataset from `path`.

    `format` is one of FORMATS ("auto" guesses from the path). `images_dir` overrides where images are
    looked up (Karpathy JSON, pairs; for Hugging Face datasets it reads the stored paths inside that folder
    instead of the stored bytes). `splits` keeps only those splits; `limit` keeps the first N images of each
    split (with all their captions), for quick runs and tests. `caption_key`, `val_fraction` and `seed` are
    for webdataset shards (see `_read_webdataset`), `image_column` and `caption_column` for Hugging Face
    datasets (see `_read_hf`); `split_key` and `on_error` for both.
    """
    if format == "webdataset" or (format == "auto" and tars.looks_like_shards(path)):
        records, dropped = _read_webdataset(path, caption_key, split_key, val_fraction, seed, on_error)
        return _build("webdataset", Path(str(path)), records, [], splits, limit, dropped)
    path = Path(path)
    if not path.exists():
        raise VlmcacheError(f"{path}: no such file or folder; pass a Flickr8k folder, a Karpathy JSON, "
                            "a CSV/JSONL of pairs, a labelled image folder or a Hugging Face dataset")
    if format not in FORMATS:
        raise VlmcacheError(f"unknown dataset format {format!r}; use one of {', '.join(FORMATS)}")
    if format == "auto":
        format = _guess_format(path)
    if format == "hf":
        records, dropped = _read_hf(path, images_dir, image_column, caption_column, split_key, on_error)
        return _build("hf", path, records, [], splits, limit, dropped)
    if path.is_dir() != (format in ("flickr8k", "imagefolder")):
        raise VlmcacheError(f"{path}: --format {format} reads a {'file' if path.is_dir() else 'folder'}, and this is "
                            f"a {'folder' if path.is_dir() else 'file'}; pass the dataset's path or another --format")
    readers = {"flickr8k": _read_flickr8k, "karpathy": _read_karpathy, "pairs": _read_pairs,
               "imagefolder": _read_imagefolder}
    records, classes = readers[format](path, None if images_dir is None else Path(images_dir))
    return _build(format, path, records, classes, splits, limit)


# One image with its captions, as the readers produce it before ordering.
@dataclass
class _Record:
    image_id: str
    image_path: Path | str  # a str only for `<tar>#<member>` references, which are never resolved as paths
    split: str
    captions: list[str]
    label: int = -1


def _guess_format(path: Path) -> str:
    if path.is_dir():
        if (path / "Flickr8k.token.txt").exists():
            return "flickr8k"
        if hf.looks_like_hf(path):  # before image folders: Hub parquet lies in folders (data/, train/)
            return "hf"
        if any(child.is_dir() for child in path.iterdir()):
            return "imagefolder"
        raise VlmcacheError(f"{path}: folder is neither Flickr8k (no Flickr8k.token.txt) nor a labelled "
                            "image folder (no class subfolders); pass --format")
    suffix = path.suffix.lower()
    if suffix == ".json":
        return "karpathy"
    if suffix in (".csv", ".jsonl"):
        return "pairs"
    if suffix in hf.SUFFIXES:
        return "hf"
    raise VlmcacheError(f"{path}: cannot tell the dataset format from the name; pass --format")


def _read_text(path: Path) -> str:
    """Read a UTF-8 text file, turning encoding problems into a clear error."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise VlmcacheError(f"{path}: file not found") from None
    except UnicodeDecodeError as error:
        raise VlmcacheError(f"{path}: not valid UTF-8 at byte {error.start}; re-save the file as UTF-8") from None
    except OSError as error:  # a folder where a file should be, no permission, ...
        raise VlmcacheError(f"{path}: cannot be read ({error.strerror})") from None


def _read_flickr8k(root: Path, images_dir: Path | None) -> tuple[list[_Record], list[str]]:
    images_dir = images_dir or next((root / d for d in ("Images", "Flicker8k_Dataset", "images")
                                     if (root / d).is_dir()), root / "Images")
    captions: dict[str, list[str]] = {}
    for number, line in enumerate(_read_text(root / "Flickr8k.token.txt").splitlines(), start=1):
        if not line.strip():
            continue
        key, sep, caption = line.partition("\t")
        if not sep or "#" not in key:
            raise VlmcacheError(f"{root / 'Flickr8k.token.txt'} line {number}: expected '<image>#<n>\\t<caption>'")
        captions.setdefault(key.rsplit("#", 1)[0], []).append(caption)
    split_files = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",
                   "test": "Flickr_8k.testImages.txt"}
    records = []
    for split, filename in split_files.items():
        if not (root / filename).exists():
            continue
        for number, name in enumerate(_read_text(root / filename).split(), start=1):
            if name not in captions:
                raise VlmcacheError(f"{root / filename} line {number}: {name} has no captions in Flickr8k.token.txt")
            records.append(_Record(name, images_dir / name, split, captions[name]))
    if not records:
        raise VlmcacheError(f"{root}: no split files (Flickr_8k.trainImages.txt, ...) found")
    return records, []


def _read_karpathy(path: Path, images_dir: Path | None) -> tuple[list[_Record], list[str]]:
    entries = read_json_file(path, "Karpathy split file", "expected JSON with an 'images' list",
                             shape={"images": list})["images"]
    base = images_dir or _karpathy_images_dir(path)
    records = []
    for number, entry in enumerate(entries):
        try:
            filename = entry["filename"]
            subfolder = entry.get("filepath", "")  # COCO keeps train2014/val2014 here
            image_path = base / subfolder / filename
            # Karpathy's "restval" images are training images (the convention of every paper using these splits).
            split = "train" if entry["split"] == "restval" else entry["split"]
            texts = [sentence["raw"] for sentence in entry["sentences"]]
        except (KeyError, TypeError):
            raise VlmcacheError(f"{path}: images[{number}] lacks filename/split/sentences[].raw") from None
        records.append(_Record(f"{subfolder}/{filename}" if subfolder else filename, image_path, split, texts))
    return records, []


def _karpathy_images_dir(path: Path) -> Path:
    for name in ("images", "Images", "flickr30k-images", "Flicker8k_Dataset"):
        if (path.parent / name).is_dir():
            return path.parent / name
    return path.parent


def _read_pairs(path: Path, images_dir: Path | None) -> tuple[list[_Record], list[str]]:
    base = images_dir or path.parent
    rows: list[dict] = []
    text = _read_text(path)
    if path.suffix.lower() == ".jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except (json.JSONDecodeError, RecursionError):
                    raise VlmcacheError(f"{path} line {number}: not valid JSON") from None
    else:
        rows = list(csv.DictReader(text.splitlines()))
    by_image: dict[str, _Record] = {}
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or "image" not in row or "caption" not in row:
            raise VlmcacheError(f"{path} row {number}: needs the fields 'image' and 'caption' (optional 'split')")
        image = os.path.normpath(str(row["image"]))  # ./a.jpg and a.jpg are one image
        split = str(row.get("split") or "train")
        record = by_image.setdefault(image, _Record(image, base / image, split, []))
        if record.split != split:
            raise VlmcacheError(f"{path} row {number}: image {image} is listed in split {split!r} and earlier in "
                                f"{record.split!r}; an image belongs to one split")
        record.captions.append(str(row["caption"] if row["caption"] is not None else ""))
    return list(by_image.values()), []


def _read_imagefolder(root: Path, images_dir: Path | None) -> tuple[list[_Record], list[str]]:
    classes = sorted(child.name for child in root.iterdir() if child.is_dir())
    records = []
    for label, name in enumerate(classes):
        for image in sorted((root / name).iterdir()):
            if image.suffix.lower() in IMAGE_SUFFIXES:
                records.append(_Record(f"{name}/{image.name}", image, "test", [], label))
    if not records:
        raise VlmcacheError(f"{root}: no images found in its class subfolders")
    return records, classes


def _check_records(root: Path, records: list[_Record]) -> None:
    """One row per image file, and captions HDF5 can store: refuse the input otherwise, naming the item."""
    seen: dict[str, _Record] = {}
    for record in records:
        key = record.image_path if isinstance(record.image_path, str) else os.path.normpath(os.path.abspath(record.image_path))
        if key in seen:
            raise VlmcacheError(f"{root}: image {record.image_id} is listed twice (splits {seen[key].split!r} and "
                                f"{record.split!r}); list each image once")
        seen[key] = record
        for caption in record.captions:
            if "\x00" in caption:
                raise VlmcacheError(f"{root}: a caption of image {record.image_id} contains a NUL byte; remove it")


def _read_webdataset(source, caption_key: str | None, split_key: str, val_fraction: float | None, seed: int,
                     on_error: str) -> tuple[list[_Record], list[dict]]:
    """Samples of img2dataset-style shards, one caption each.

    The caption is the `.txt` member, or `caption_key` of the `.json` member (default "caption" when there
    is no .txt; an explicit `caption_key` always reads the JSON). The split is `split_key` of the JSON when
    present, else "train"; `val_fraction` instead makes that fraction of samples (drawn with `seed`) "val"
    and the rest "train". A sample with no image or no caption fails, or under
    on_error="skip" is left out, logged and returned in the dropped list.
    """
    if val_fraction is not None and not 0 < val_fraction < 1:
        raise VlmcacheError(f"--val-fraction {val_fraction}: use a number between 0 and 1")
    records, dropped = [], []
    for sample in tars.scan_shards(source):
        if sample.unsafe_member is not None:
            reason = f"member {sample.unsafe_member!r} has {tars.unsafe_member_name(sample.unsafe_member)}"
            _drop(on_error, dropped, sample, reason)
            continue
        meta = {}
        if sample.json_text is not None:
            try:
                meta = json.loads(sample.json_text)
            except (json.JSONDecodeError, RecursionError):
                meta = None
            if not isinstance(meta, dict):
                reason = "its .json member is not a JSON object"
                _drop(on_error, dropped, sample, reason)
                continue
        if sample.image_member is None:
            found = f"; it has .{', .'.join(sample.other)}" if sample.other else ""
            _drop(on_error, dropped, sample, f"no image member (.jpg/.jpeg/.png/.webp){found}")
            continue
        if caption_key is None and sample.text is not None:
            caption = sample.text.strip()
        else:
            key = caption_key or "caption"
            caption = meta.get(key)
            if not isinstance(caption, str):
                where = f"no {key!r} in its .json" if sample.json_text is not None else "no .txt or .json member"
                _drop(on_error, dropped, sample, f"no caption ({where}; --caption-key names the JSON field)")
                continue
        split = str(meta.get(split_key, "train"))
        # The reference stays a string: Path would normalise `..` and reach the file system.
        records.append(_Record(sample.key, sample.image_ref, split, [caption]))
    if not records:
        raise VlmcacheError(f"{source}: no usable samples in the shards")
    if val_fraction is not None:  # replaces any split in the JSON
        chosen = set(np.random.default_rng(seed).permutation(len(records))[:round(len(records) * val_fraction)].tolist())
        for index, record in enumerate(records):
            record.split = "val" if index in chosen else "train"
    return records, dropped


def _read_hf(root: Path, images_dir: str | Path | None, image_column: str | None, caption_column: str | None,
             split_key: str, on_error: str) -> tuple[list[_Record], list[dict]]:
    """Rows of a Hugging Face dataset (see vlmcache.data.hf), one image each with its caption(s).

    An image is its stored bytes, named `<file>#<row>/<column>`; with `images_dir`, the path the row stores,
    inside that folder only: an absolute path or one whose `..` leaves it fails naming file and row. A row
    with such a path or an unusable caption cell fails, or under on_error="skip" is left out, logged and
    returned in the dropped list.
    """
    records, dropped = [], []
    for file in hf.data_files(root):
        for row in hf.scan_file(file, image_column, caption_column, split_key, by_path=images_dir is not None):
            why = row.problem or (hf.unsafe_relative_path(row.path) if images_dir is not None else None)
            if why:
                _drop(on_error, dropped, row, why)
                continue
            # The reference stays a string: Path would normalise it and reach the file system.
            image = row.ref if images_dir is None else Path(images_dir) / os.path.normpath(row.path)
            records.append(_Record(row.key, image, row.split, row.captions))
    if not records:
        raise VlmcacheError(f"{root}: no usable rows in the dataset")
    return records, dropped


def _drop(on_error: str, dropped: list[dict], sample: tars.Sample | hf.Row, reason: str) -> None:
    if on_error != "skip":
        raise VlmcacheError(f"{sample.where()}: {reason}; fix the shard, or pass --on-error skip to leave it out")
    log.warning("skipped %s: %s", sample.where(), reason)
    dropped.append({"shard": str(sample.shard), "sample": sample.number, "key": sample.key, "reason": reason})


def split_rank(split: str) -> tuple[int, str]:
    """Sort key of a split in cache row order: train, val, test, then other names alphabetically."""
    return (SPLIT_ORDER.index(split), "") if split in SPLIT_ORDER else (len(SPLIT_ORDER), split)


def _build(fmt: str, root: Path, records: list[_Record], classes: list[str],
           splits: list[str] | None, limit: int | None, dropped: list[dict] | None = None) -> PairDataset:
    _check_records(root, records)
    if splits:
        known = {record.split for record in records}
        missing = [split for split in splits if split not in known]
        if missing:
            raise VlmcacheError(f"{root}: no split named {', '.join(missing)}; it has {', '.join(sorted(known))}")
        records = [record for record in records if record.split in splits]

    # A stable sort keeps the source order inside each split.
    records = sorted(records, key=lambda record: split_rank(record.split))
    if limit is not None:
        kept, taken = [], {}
        for record in records:
            if taken.get(record.split, 0) < limit:
                taken[record.split] = taken.get(record.split, 0) + 1
                kept.append(record)
        records = kept
    captions, caption_image = [], []
    for index, record in enumerate(records):
        captions.extend(record.captions)
        caption_image.extend([index] * len(record.captions))
    return PairDataset(
        format=fmt,
        root=root.resolve(),
        image_paths=[_absolute(record.image_path) for record in records],
        image_ids=[record.image_id for record in records],
        image_splits=[record.split for record in records],
        captions=captions,
        caption_image=np.asarray(caption_image, dtype=np.int64),
        classes=classes,
        image_labels=np.asarray([record.label for record in records], dtype=np.int64) if classes else None,
        dropped=dropped or [],
    )


def _absolute(image_path: Path | str) -> str:
    """An image file's resolved path; a `<tar>#<member>` reference as it is (its tar is already resolved)."""
    return image_path if isinstance(image_path, str) else str(image_path.resolve())


class ImageDecodeError(Exception):
    """An image file that cannot be turned into RGB pixels; the message is the reason."""


def load_rgb(path: str | Path, draft: int | None = None, decoder: str = "pillow") -> Image.Image:
    """Open an image file as 8-bit RGB, handling the modes real datasets contain.

    Greyscale and CMYK are converted; transparent images (RGBA, LA, palette with transparency) are
    composited on white rather than having their alpha dropped (which turns transparent areas into
    arbitrary colours); 16-bit images are scaled to 8 bits rather than clipped; EXIF rotation is applied.
    Raises ImageDecodeError for missing, empty, truncated, non-image and decompression-bomb files.
    `path` may also name an image stored inside a data file: `<tar>#<member>` (a webdataset shard) or
    `<file>#<row>/<column>` (a Hugging Face dataset's row); either is read in place.

    `draft`: decode a JPEG at the smallest DCT scale (1/2, 1/4, 1/8) that keeps both sides ≥ `draft` pixels.
    Several times faster on large photos; the pixels differ slightly from a full decode resized alike.
    `decoder`, with `draft`: "pillow" (Image.draft) or "simplejpeg" (libjpeg-turbo through simplejpeg: the same
    scale and, with today's libraries, the same pixels, for less work around the decode; see
    draft_with_simplejpeg). A file simplejpeg does not take as it is goes the Pillow way from the start, so it
    decodes, or fails with the same message, exactly as with "pillow".
    """
    source = stored_image(path)
    if source is not None:
        empty = source.getbuffer().nbytes == 0
    else:
        source = path = Path(path)
        if not path.exists():
            raise ImageDecodeError("file not found")
        empty = path.stat().st_size == 0
    if empty:
        raise ImageDecodeError("file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x its pixel limit; treat both as the bomb they may be.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if draft is not None and decoder == "simplejpeg":
                drafted = draft_with_simplejpeg(source, draft)
                if drafted is not None:
                    return drafted
            with Image.open(source) as image:
                if draft is not None:
                    image.draft("RGB", (draft, draft))  # a no-op for formats other than JPEG
                image.load()
                # Inside the try: a valid header can still hold EXIF or a pixel mode that fails to convert.
                return _to_rgb(ImageOps.exif_transpose(image))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageDecodeError(f"larger than Pillow's decompression-bomb limit of {Image.MAX_IMAGE_PIXELS} pixels") from None
    except Image.UnidentifiedImageError:
        raise ImageDecodeError("not an image file Pillow can read") from None
    except (OSError, EOFError, SyntaxError, ValueError, TypeError, IndexError, struct.error) as error:
        raise ImageDecodeError(f"corrupt or truncated image ({str(error)[:200]})") from None


# ImageOps.exif_transpose's transposition for each EXIF orientation (1 and unknown values: none).
_ORIENTATIONS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
                 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                 8: Image.Transpose.ROTATE_90}


def simplejpeg_available() -> bool:
    """Whether the simplejpeg decoder (the `fast` extra) is installed; found without importing it."""
    return importlib.util.find_spec("simplejpeg") is not None


def draft_with_simplejpeg(source: Path | io.BytesIO, side: int) -> Image.Image | None:
    """A JPEG decoded by libjpeg-turbo through simplejpeg at the DCT scale Image.draft would take (1/2, 1/4 or
    1/8: the smallest keeping both sides ≥ `side`; 1 when none does), EXIF orientation applied, as 8-bit RGB.
    None for anything it does not take as it is; the caller then opens the file afresh with Pillow, so such a
    file decodes, or fails, exactly as without this path.

    Taken: baseline and progressive JPEGs that Pillow reads as RGB (YCbCr or RGB coded). Left to Pillow: other
    formats (MPO included), greyscale and CMYK/YCCK JPEGs, simplejpeg not installed, and any file for which
    Pillow's header or EXIF reading raises or libjpeg-turbo reports an error or even a warning (truncated or
    corrupt data: simplejpeg's strict mode raises on both). Decoded with Pillow's libjpeg-turbo settings
    (accurate integer IDCT, fancy upsampling), the pixels equal Image.draft's (tests/test_decode.py). What it
    saves: Pillow's decode through 64 KiB reads, and the two copies of the decoded image that load_rgb's
    exif_transpose and convert("RGB") make; one copy remains (the array into a Pillow image, a memcpy per row).
    """
    try:
        import simplejpeg

        if isinstance(source, io.BytesIO):
            data = source.getvalue()
        else:
            with open(source, "rb") as file:
                data = file.read(3)
                if data != b"\xff\xd8\xff":  # not a JPEG: spare reading the rest
                    return None
                data += file.read()
        if not data.startswith(b"\xff\xd8\xff"):
            return None
        with Image.open(io.BytesIO(data)) as image:  # the header: format, mode, size, EXIF; the pixel limit checked
            if image.format != "JPEG" or image.mode != "RGB":
                return None
            width, height = image.size
            exif = image.getexif()
        method = _ORIENTATIONS.get(exif.get(ExifTags.Base.Orientation, 1))
        if method is not None:
            exif.tobytes()  # exif_transpose writes the EXIF back after a transposition; if that raises, Pillow decides
        scale = min(width // side, height // side)
        scale = next(factor for factor in (8, 4, 2, 1) if scale >= factor)  # as Image.draft chooses
        wanted = (-(-height // scale), -(-width // scale))
        # libjpeg-turbo decodes at the smallest of its scales giving sizes ≥ min_height × min_width: here 1/scale.
        # RGBX: 4 bytes a pixel, as Pillow keeps RGB, so the copy into a Pillow image is one memcpy per row.
        pixels = simplejpeg.decode_jpeg(data, "RGBX", min_height=wanted[0], min_width=wanted[1])
    except Exception:  # whatever failed, Pillow decides (strict simplejpeg raises ValueError on warnings too)
        return None
    if pixels.shape != (*wanted, 4):
        return None  # not the size Image.draft gives (a libjpeg-turbo without that scale): Pillow decides
    decoded = Image.frombytes("RGB", (wanted[1], wanted[0]), pixels, "raw", "RGBX")
    return decoded if method is None else decoded.transpose(method)


def image_container(path: str | Path) -> Path | None:
    """The data file that holds an image stored inside it (a tar shard, a dataset's parquet/arrow file), None for
    a plain image file. The name inside the container is data, never turned into a path."""
    parts = tars.split_member_ref(path) or hf.split_row_ref(path)
    return None if parts is None else Path(parts[0])


def stored_image(path: str | Path) -> io.BytesIO | None:
    """The bytes of an image stored inside a data file (a tar member, a dataset row), None for a plain path."""
    try:
        if tars.is_member_ref(path):
            return tars.read_member(path)
        if hf.is_row_ref(path):
            return hf.read_row_image(path)
    except (FileNotFoundError, ValueError) as error:
        raise ImageDecodeError(str(error)) from None
    return None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        pixels = np.asarray(image, dtype=np.float64)
        scale = 65535.0 if image.mode.startswith("I;16") or pixels.max() > 255 else 255.0
        grey = np.clip(pixels / scale * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
