"""Files that lose nothing and are never silently wrong: atomic writes, one writer per folder, checked reads.

Every file vlmcache writes goes through `atomic_write`: a reader (or a resumed run) sees the old file
or the new one, never half of one. Temporaries are named `.<name>.tmp-<pid>`, so `remove_stale_temporaries`
can clear those a killed process left behind — and only those, never a file vlmcache did not create.

A full disk (or quota, or file-size limit) during a write removes that write's temporary and raises
`DiskFullError` naming the file and the space it needs: the files written before it stay whole, and the
same command run again after freeing space resumes from them.

Reading: `read_json_file` and `read_safetensors` are the readers of those two kinds (validated, one-line
errors); safetensors files vlmcache writes carry the SHA-256 of their content (`write_sealed_safetensors`), and
`read_verified_bytes` checks a file against a SHA-256 recorded elsewhere when it was written.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vlmcache.errors import VlmcacheError

_TEMPORARY = re.compile(r"^\..+\.tmp-(\d+)$")
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` is a write running out of space, however a library reports it: an OSError with its
    errno, or a wrapper that only says it in words (h5py's RuntimeError, safetensors' SafetensorError)."""
    if isinstance(error, OSError) and error.errno in DISK_FULL:
        return True
    text = str(error)
    return any(os.strerror(code) in text or f"errno = {code}," in text for code in DISK_FULL)


def _reason(error: BaseException) -> str:
    """The disk-full error's own words: 'No space left on device', 'Disk quota exceeded' or 'File too large'."""
    text = str(error)
    return next((os.strerror(code) for code in DISK_FULL if os.strerror(code) in text or f"errno = {code}," in text),
                os.strerror(errno.ENOSPC))


def human_size(size: int) -> str:
    """Bytes as a short decimal size: 950 B, 15.0 kB, 1.2 MB, 3.4 GB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def _free_space(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path.parent if str(path.parent) else Path(".")).free
    except OSError:
        return None


class DiskFullError(VlmcacheError):
    """A write that ran out of space. Its temporary is removed; what was written before it is intact.

    `needed` is the size of the file being written, where known; `step` (set by `for_step`) the space the
    whole step still needs, where the caller can tell.
    """

    def __init__(self, path: str | Path | None, reason: str, needed: int | None = None, step: str | None = None):
        self.path, self.reason, self.needed, self.step = path and Path(path), reason, needed, step
        free = None if self.path is None else _free_space(self.path)
        sizes = ([f"it needs {human_size(needed)}"] if needed is not None else []) + ([step] if step else []) + (
            [f"{human_size(free)} free there"] if free is not None else [])
        super().__init__(("cannot write" if self.path is None else f"{self.path}: cannot write it") + f": {reason}"
                         + (f" ({'; '.join(sizes)})" if sizes else "")
                         + "; free some space and run the same command again: it resumes from what was written")

    def for_step(self, step: str) -> DiskFullError:
        """The same error, also saying what the whole step still needs, e.g. 'about 2.1 MB for 12 more shards'."""
        return DiskFullError(self.path, self.reason, self.needed, step)

    @classmethod
    def from_error(cls, error: BaseException) -> DiskFullError:
        """The error for a disk-full `error` raised outside atomic_write (a folder being made, a library's own
        write): named by the file the error names, if any (a temporary by the file it stood for)."""
        if isinstance(error, DiskFullError):
            return error
        name = getattr(error, "filename", None) or next(iter(re.findall(r"filename = '([^']+)'", str(error))), None)
        path = name and Path(name)
        if path is not None and _TEMPORARY.match(path.name):
            path = path.with_name(path.name[1:path.name.rindex(".tmp-")])
        return cls(path, _reason(error))


@contextmanager
def atomic_write(path: str | Path, size: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed over `path`, on failure removed.

    A full disk raises DiskFullError naming `path` (and `size`, the bytes it needs, when the caller knows)."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        if is_disk_full(error) and not isinstance(error, DiskFullError):
            raise DiskFullError(path, _reason(error), size) from error
        raise


def write_bytes_atomic(path: str | Path, data: bytes | memoryview, durable: bool = True) -> None:
    """Write bytes atomically; `durable` also syncs them to the disk before the rename, so that even a power
    cut leaves the old file or the new one (worth its milliseconds for shards, not for small JSON)."""
    with atomic_write(path, len(data)) as temporary, open(temporary, "wb") as handle:
        handle.write(data)
        if durable:
            handle.flush()
            os.fsync(handle.fileno())


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a text file atomically (see atomic_write)."""
    try:
        write_bytes_atomic(path, text.encode("utf-8"), durable=False)
    except DiskFullError:
        raise
    except OSError as error:
        raise VlmcacheError(f"{path}: cannot write ({error.strerror}); choose a writable location") from None


def write_json_atomic(path: str | Path, value) -> None:
    """Write JSON atomically: readers never see half a file."""
    write_text_atomic(path, json.dumps(value, indent=2, ensure_ascii=False))


def check_writable(path: str | Path, what: str) -> Path:
    """Refuse, before any work, an output file that cannot be written (a folder, a read-only place)."""
    path = Path(path)
    if path.is_dir():
        raise VlmcacheError(f"{what} {path}: is a folder; give a file name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise VlmcacheError(f"{what} {path}: its folder {parent} does not exist or is not writable")
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: Path) -> None:
    """Delete `.<name>.tmp-<pid>` files in `folder` whose writer process is gone (a kill mid-save)."""
    for candidate in folder.glob(".*.tmp-*"):
        match = _TEMPORARY.match(candidate.name)
        if match and candidate.is_file() and (int(match.group(1)) == os.getpid() or not _alive(int(match.group(1)))):
            candidate.unlink(missing_ok=True)


class FolderLock:
    """A lock file that stops two vlmcache processes writing one folder (a cache or a run).

    A lock left by a dead process (kill -9) is taken over; a lock held by a live one is never removed.
    """

    def __init__(self, folder: Path, what: str):
        self.path, self.what = Path(folder) / ".lock", what
        self.held = False

    def __enter__(self) -> FolderLock:
        for _ in range(2):
            try:
                handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and _alive(owner):
                    raise VlmcacheError(f"{self.path.parent}: another vlmcache {self.what} (pid {owner}) is writing "
                                        f"here; wait for it, or delete {self.path} if that process is gone") from None
                self.path.unlink(missing_ok=True)  # stale: its process died
                continue
            except OSError as error:
                raise VlmcacheError(f"{self.path.parent}: cannot write here ({error.strerror}); "
                                    "choose a writable folder") from None
            self._write_owner(handle)
            self.held = True
            return self
        raise VlmcacheError(f"{self.path}: could not take the {self.what} lock")

    def _write_owner(self, handle: int) -> None:
        """Write our pid into the new lock file; one that cannot be written (a full disk) is removed again."""
        try:
            os.write(handle, str(os.getpid()).encode())
        except OSError as error:
            self.path.unlink(missing_ok=True)
            if is_disk_full(error):
                raise DiskFullError(self.path, _reason(error)) from error
            raise VlmcacheError(f"{self.path}: cannot write the lock ({error.strerror})") from None
        finally:
            os.close(handle)

    def _owner(self) -> int | None:
        try:
            return int(self.path.read_text().strip())
        except (OSError, ValueError):
            return None

    def __exit__(self, *exc) -> None:
        if self.held:  # never remove a lock another process holds
            self.path.unlink(missing_ok=True)
            self.held = False


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------- reading files
# Every file vlmcache reads goes through one reader of its kind: the JSON reader here, the safetensors reader
# here, the cache's HDF5 reader (vlmcache.cache.store), the image reader (vlmcache.data.datasets.load_rgb), the
# TOML reader (vlmcache.options) and the saved text encoder's reader (vlmcache.encode.prompts). Each validates
# what it reads and turns its library's exceptions into one VlmcacheError naming the file and what to do.

_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "an object",
               list: "a list", type(None): "null"}


def _at(where: str, key: object) -> str:
    return f"{where}.{key}" if where else str(key)


def shape_error(value: Any, shape: Any, where: str = "") -> str | None:
    """Why a JSON value does not have `shape` (None when it does), naming the offending key's dotted path.

    `shape` is a type or tuple of types (a bool is never an int or a float); `{key: shape}` an object with at
    least those keys, where a key ending in '?' may be missing or null; `{str: shape}` an object whose every
    value has `shape`; `[shape]` a list whose every item has it.
    """
    what = where or "the top level"
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            return f"{what} must be an object"
        if str in shape:
            return next((why for key, item in value.items() if (why := shape_error(item, shape[str], _at(where, key)))),
                        None)
        for key, inner in shape.items():
            name = key.removesuffix("?")
            if value.get(name) is None:
                if key.endswith("?"):
                    continue
                return f"{_at(where, name)} is missing"
            if why := shape_error(value[name], inner, _at(where, name)):
                return why
        return None
    if isinstance(shape, list):
        if not isinstance(value, list):
            return f"{what} must be a list"
        return next((why for number, item in enumerate(value) if (why := shape_error(item, shape[0], _at(where, number)))),
                    None)
    types = shape if isinstance(shape, tuple) else (shape,)
    if isinstance(value, types) and (bool in types or not isinstance(value, bool)):
        return None
    return f"{what} must be {' or '.join(_TYPE_NAMES.get(kind, kind.__name__) for kind in types)}"


def read_json_file(path: str | Path, what: str, hint: str, shape: Any = None) -> Any:
    """The JSON value of a file vlmcache reads. A file that is missing, unreadable, not UTF-8, not JSON, or not of
    `shape` (see shape_error) is refused in one line naming it, what it should be (`what`) and what to do (`hint`)."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VlmcacheError(f"{path}: no {what} here; {hint}") from None
    except (OSError, ValueError, RecursionError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise VlmcacheError(f"{path}: not a readable {what} ({_reason(error)}); {hint}") from None
    if shape is not None and (why := shape_error(value, shape)):
        raise VlmcacheError(f"{path}: not a valid {what} ({why}); {hint}")
    return value


def _reason(error: BaseException) -> str:
    """An exception as a short reason (an OSError's own words, without the path it repeats)."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error)[:300] or type(error).__name__


def _json_sha256(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def write_sealed_json(path: str | Path, value: dict) -> None:
    """Write a JSON object atomically with the SHA-256 of its content under SEAL (read back by read_sealed_json)."""
    write_json_atomic(path, {**value, SEAL: _json_sha256(value)})


def read_sealed_json(path: str | Path, what: str, shape: Any) -> dict | None:
    """A JSON object written by write_sealed_json, without its seal. None when it is missing, cut short, not of
    `shape`, unsealed (written before vlmcache sealed it) or different from its seal: the reader's cue to make
    it again (sealed JSON is derived data, such as an ablation cell's result)."""
    try:
        value = read_json_file(path, what, "", shape={**shape, SEAL: str})
    except VlmcacheError:
        return None
    content = {key: item for key, item in value.items() if key != SEAL}
    return content if value[SEAL] == _json_sha256(content) else None


def read_verified_bytes(path: str | Path, sha256: str, what: str, hint: str) -> bytes:
    """A file's bytes, refused in one line when it is missing or its SHA-256 is not the one recorded when it
    was written (cut short, damaged or altered)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise VlmcacheError(f"{path}: cannot read the {what} ({_reason(error)}); {hint}") from None
    if hashlib.sha256(raw).hexdigest() != sha256:
        raise VlmcacheError(f"{path}: the {what} differs from the SHA-256 recorded when it was written (cut short, "
                            f"damaged or altered); {hint}")
    return raw


# Safetensors files vlmcache writes (checkpoints, search indexes) carry the SHA-256 of their content in their
# own metadata under this key: one file, written atomically, that can always tell whether it is whole.
SEAL = "vlmcache_sha256"


def _safetensors_header(raw: bytes | memoryview) -> tuple[dict, int]:
    """(header, offset of the tensor bytes) of a safetensors file's bytes; ValueError when the header is not one."""
    if len(raw) < 8:
        raise ValueError("shorter than a safetensors header")
    size = int.from_bytes(raw[:8], "little")
    if size > len(raw) - 8:
        raise ValueError(f"its header of {size} bytes runs past the end of the file (cut short?)")
    header = json.loads(bytes(raw[8:8 + size]))
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(header, dict) or not isinstance(metadata or {}, dict) or not all(
            isinstance(value, str) for value in (metadata or {}).values()):
        raise ValueError("its header is not a safetensors header")
    return header, 8 + size


def _content_sha256(header: dict, data: memoryview) -> str:
    """SHA-256 of what a safetensors file holds: its header (tensor names, types, shapes and offsets, and the
    metadata without the seal itself) and its tensor bytes."""
    described = {**header, "__metadata__": {k: v for k, v in (header.get("__metadata__") or {}).items() if k != SEAL}}
    text = json.dumps(described, sort_keys=True).encode()
    digest = hashlib.sha256(len(text).to_bytes(8, "little") + text)
    digest.update(data)
    return digest.hexdigest()


def write_sealed_safetensors(path: str | Path, raw: bytes) -> None:
    """Write a safetensors file (the bytes of safetensors' `save`) atomically, with the SHA-256 of its content
    sealed into its metadata, so that every later read (read_safetensors) can tell it is whole."""
    header, start = _safetensors_header(raw)
    data = memoryview(raw)[start:]
    header["__metadata__"] = {**(header.get("__metadata__") or {}), SEAL: _content_sha256(header, data)}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # tensors start 8-byte aligned, as safetensors writes them
    with atomic_write(path, 8 + len(text) + len(data)) as temporary, open(temporary, "wb") as handle:
        handle.write(len(text).to_bytes(8, "little") + text)
        handle.write(data)


def read_safetensors(path: str | Path, what: str, hint: str,
                     load: Callable[[bytes], Any] | None = None) -> tuple[Any, dict[str, str]]:
    """(tensors as `load` makes them from the file's bytes, None without `load`; the string metadata) of a
    safetensors file. A file that is missing, cut short or malformed, or whose content differs from the SHA-256
    sealed into it, is refused in one line naming it (`hint`: what to do). A file written before vlmcache sealed
    them is read as it is: its metadata has no SEAL key, and the caller decides whether to trust it."""
    from safetensors import SafetensorError

    path = Path(path)
    try:
        raw = path.read_bytes()
        header, start = _safetensors_header(raw)
        metadata = header.get("__metadata__") or {}
        if SEAL in metadata and metadata[SEAL] != _content_sha256(header, memoryview(raw)[start:]):
            raise VlmcacheError(f"{path}: the {what} differs from the SHA-256 recorded when it was written (cut short, "
                                f"damaged or altered); {hint}")
        return (load(raw) if load is not None else None), metadata
    except FileNotFoundError:
        raise VlmcacheError(f"{path}: no {what} here; {hint}") from None
    except (OSError, ValueError, TypeError, RecursionError, SafetensorError) as error:
        raise VlmcacheError(f"{path}: not a readable {what} ({_reason(error)}); {hint}") from None
