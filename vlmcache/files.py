"""Writing files so that nothing is lost: temporary name then rename, and one writer per folder.

Every file vlmcache writes goes through `atomic_write`: a reader (or a resumed run) sees the old file
or the new one, never half of one. Temporaries are named `.<name>.tmp-<pid>`, so `remove_stale_temporaries`
can clear those a killed process left behind — and only those, never a file vlmcache did not create.

A full disk (or quota, or file-size limit) during a write removes that write's temporary and raises
`DiskFullError` naming the file and the space it needs: the files written before it stay whole, and the
same command run again after freeing space resumes from them.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
