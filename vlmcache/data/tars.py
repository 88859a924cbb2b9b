"""webdataset tar shards (img2dataset's layout) read in place with the standard `tarfile`, never unpacked.

A shard is a plain tar whose members are grouped into samples by key: `000123.jpg`, `000123.txt` and
`000123.json` are one sample (webdataset's rule: the key is the member name up to the first dot of its
base name, and a sample's members are consecutive). Shards are named by a folder, a glob or a brace
pattern (`data/{00000..00099}.tar`).

Why `tarfile` and not the `webdataset` library: vlmcache needs every sample's row fixed before it encodes
anything (splits are grouped, shards of the cache are resumed by row range, images are decoded by index
in DataLoader workers). `webdataset` is built for the opposite, a shuffled sequential stream into a
training loop; it would add a dependency and still need this index. So one sequential pass over each tar
reads headers and the small caption members, and remembers where each image's bytes lie; extraction then
reads those bytes with one seek and one read from the tar. Nothing is written to disk.

An image inside a tar is named `<tar path>#<member name>` wherever vlmcache keeps image paths.
"""

from __future__ import annotations

import glob
import io
import itertools
import re
import tarfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from vlmcache.errors import VlmcacheError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # in order of preference when a sample has several
_MEMBER_REF = re.compile(r"^(?P<tar>.+\.tar)#(?P<member>.+)$")
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Expand `{a..b}` (zero padding kept) and `{x,y}` groups, as bash and webdataset do."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        first, last = numeric.groups()
        width = len(first) if first.startswith("0") or len(first) == len(last) else 0
        step = 1 if int(last) >= int(first) else -1
        choices = [str(n).zfill(width) for n in range(int(first), int(last) + step, step)]
    else:
        choices = body.split(",")
    head, tail = pattern[:match.start()], pattern[match.end():]
    return [expanded for choice in choices for expanded in expand_braces(head + choice + tail)]


def looks_like_shards(path: str | Path) -> bool:
    """True for a .tar file, a glob/brace pattern, or a folder holding .tar files directly."""
    text = str(path)
    if any(char in text for char in "{*?["):
        return True
    path = Path(path)
    return path.suffix == ".tar" or (path.is_dir() and any(path.glob("*.tar")))


def shard_paths(source: str | Path) -> list[Path]:
    """The tar files named by a folder, a .tar file, a glob or a brace pattern, in a stable order."""
    text = str(source)
    if Path(text).is_dir():
        found = sorted(Path(text).glob("*.tar"))
    else:
        found = []
        for expanded in expand_braces(text):
            matches = sorted(glob.glob(expanded)) if any(char in expanded for char in "*?[") else [expanded]
            for match in matches:
                if not Path(match).is_file():
                    raise VlmcacheError(f"{match}: shard not found (from {source}); check the pattern")
                found.append(Path(match))
    if not found:
        raise VlmcacheError(f"{source}: no .tar shards found; pass a folder of shards, a glob or data/{{00000..00009}}.tar")
    return [path.resolve() for path in dict.fromkeys(found)]


@dataclass
class Sample:
    """One sample of a shard: its key, number in the shard, image member and the text of its captions."""

    shard: Path
    number: int
    key: str
    image_member: str | None = None
    text: str | None = None  # the .txt member
    json_text: str | None = None  # the .json member
    other: list[str] = field(default_factory=list)  # extensions of members that are neither image nor caption
    unsafe_member: str | None = None  # a member name that would leave the shard if used as a path (refused)

    @property
    def image_ref(self) -> str:
        return f"{self.shard}#{self.image_member}"

    def where(self) -> str:
        return f"{self.shard} sample {self.number} (key {self.key})"


def _split_name(name: str) -> tuple[str, str]:
    """(key, extension) by webdataset's rule: split the base name at its first dot."""
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def unsafe_member_name(name: str) -> str | None:
    """Why a member name cannot name an image inside its shard, or None if it can.

    A member name is data, not a path: `x/../../secret.jpg` joined to `shard.tar#` and normalised anywhere
    would leave the shard. Absolute names, `..` components, backslashes and NUL are refused outright.
    """
    if name.startswith("/"):
        return "an absolute member name"
    if ".." in name.split("/"):
        return "a '..' component in the member name"
    if "\\" in name or "\x00" in name:
        return "a backslash or NUL in the member name"
    return None


def scan_shard(path: Path) -> list[Sample]:
    """Read a shard's headers and caption members in one pass; raise VlmcacheError if it is truncated or not a tar."""
    samples: list[Sample] = []
    size = path.stat().st_size
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                if member.offset_data + member.size > size:
                    raise VlmcacheError(f"{path} member {member.name}: truncated tar (the member ends at byte "
                                        f"{member.offset_data + member.size:,}, the file has {size:,}); re-download the shard")
                key, extension = _split_name(member.name)
                if not samples or samples[-1].key != key:
                    samples.append(Sample(path, len(samples), key))
                sample = samples[-1]
                if unsafe_member_name(member.name) is not None:
                    sample.unsafe_member = sample.unsafe_member or member.name
                    continue
                if extension in IMAGE_EXTENSIONS:
                    if sample.image_member is None or IMAGE_EXTENSIONS.index(extension) < IMAGE_EXTENSIONS.index(
                            _split_name(sample.image_member)[1]):
                        sample.image_member = member.name
                elif extension in ("txt", "json"):
                    try:
                        value = tar.extractfile(member).read().decode("utf-8")
                    except UnicodeDecodeError as error:
                        raise VlmcacheError(f"{path} member {member.name} (sample {sample.number}): not valid UTF-8 "
                                            f"at byte {error.start}") from None
                    if extension == "txt":
                        sample.text = value
                    else:
                        sample.json_text = value
                else:
                    sample.other.append(extension)
            end = tar.offset
    except tarfile.ReadError as error:
        kind = "truncated tar" if "end of data" in str(error) or "truncated" in str(error) else "not a readable tar"
        after = f" after sample {samples[-1].number} (key {samples[-1].key})" if samples else ""
        raise VlmcacheError(f"{path}: {kind} ({error}{after}); re-download or re-create the shard") from None
    # tarfile stops quietly at a header cut short; a whole tar ends with a zero block, so check for it.
    with open(path, "rb") as handle:
        handle.seek(end)
        block = handle.read(tarfile.BLOCKSIZE)
    if len(block) < tarfile.BLOCKSIZE or block.count(0) != tarfile.BLOCKSIZE:
        after = f" after sample {samples[-1].number} (key {samples[-1].key})" if samples else ""
        raise VlmcacheError(f"{path}: truncated tar (no end-of-archive block at byte {end:,}{after}); "
                            "re-download the shard")
    return samples


def split_member_ref(path: str | Path) -> tuple[Path, str] | None:
    """(tar, member) for an image path of the form `<tar>#<member>` whose tar exists and whose member name is
    safe; None for any other path."""
    match = _MEMBER_REF.match(str(path))
    if match is None or unsafe_member_name(match["member"]) is not None or not Path(match["tar"]).is_file():
        return None
    return Path(match["tar"]), match["member"]


def is_member_ref(path: str | Path) -> bool:
    """True for an image path of the form `<tar>#<member>` whose tar exists (and whose member name is safe)."""
    return split_member_ref(path) is not None


@lru_cache(maxsize=16)
def _member_offsets(tar_path: str) -> dict[str, tuple[int, int]]:
    """member name -> (data offset, size); built once per tar per process from the headers alone."""
    with tarfile.open(tar_path, "r:") as tar:
        return {member.name: (member.offset_data, member.size) for member in tar if member.isfile()}


def read_member(ref: str | Path) -> io.BytesIO:
    """The bytes of `<tar>#<member>` (one seek, one read). Raises FileNotFoundError if the member is absent
    or the reference is not a safe member reference."""
    parts = split_member_ref(ref)
    if parts is None:
        raise FileNotFoundError(f"{ref}: not a member of an existing tar")
    tar, member = parts
    offsets = _member_offsets(str(tar))
    if member not in offsets:
        raise FileNotFoundError(f"no member {member} in {tar}")
    offset, size = offsets[member]
    with open(tar, "rb") as handle:
        handle.seek(offset)
        return io.BytesIO(handle.read(size))


def scan_shards(source: str | Path) -> list[Sample]:
    """All samples of all shards named by `source`, in shard order then tar order."""
    return list(itertools.chain.from_iterable(scan_shard(path) for path in shard_paths(source)))
