"""Writing files so that nothing is lost: temporary name then rename, and one writer per folder.

Every file vlmcache writes goes through `atomic_write`: a reader (or a resumed run) sees the old file
or the new one, never half of one. Temporaries are named `.<name>.tmp-<pid>`, so `remove_stale_temporaries`
can clear those a killed process left behind — and only those, never a file vlmcache did not create.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vlmcache.errors import VlmcacheError

_TEMPORARY = re.compile(r"^\..+\.tmp-(\d+)$")


@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed over `path`, on failure removed."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a text file atomically (see atomic_write)."""
    try:
        with atomic_write(path) as temporary:
            temporary.write_text(text, encoding="utf-8")
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
            os.write(handle, str(os.getpid()).encode())
            os.close(handle)
            self.held = True
            return self
        raise VlmcacheError(f"{self.path}: could not take the {self.what} lock")

    def _owner(self) -> int | None:
        try:
            return int(self.path.read_text().strip())
        except (OSError, ValueError):
            return None

    def __exit__(self, *exc) -> None:
        if self.held:  # never remove a lock another process holds
            self.path.unlink(missing_ok=True)
            self.held = False
