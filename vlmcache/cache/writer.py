"""Writing a cache: the folder checks, the manifest and index, shards, and the final listing with hashes.

Shared by every way a cache is made (extract, import, the synthetic generator), so only this package
decides what a cache folder holds. A cache is resumable per shard: `prepare_cache` keeps what an earlier
run of the same request wrote; `finalize_cache` lists every shard with its SHA-256 and marks the set complete.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vlmcache.cache.hdf5 import read_hdf5
from vlmcache.cache.layout import MODALITIES, set_folder, set_name
from vlmcache.cache.store import (
    differences,
    file_sha256,
    now_iso,
    read_index,
    read_manifest,
    shard_name,
    write_index,
    write_shard,
)
from vlmcache.errors import VlmcacheError
from vlmcache.files import DiskFullError, human_size, remove_stale_temporaries, write_json_atomic


@dataclass
class ExtractResult:
    """What an extract did: where the cache is, its size, what was skipped, how long it took."""

    path: Path
    images: int
    captions: int
    shards_written: int  # shards computed now
    shards_reused: int
    skipped: list[dict] = field(default_factory=list)
    truncated_captions: int = 0
    seconds: float = 0.0
    image_seconds: float = 0.0  # wall time of the image pass (decode + forward + write), this process
    text_seconds: float = 0.0
    shards_tokens_added: int = 0  # shards kept as they were but given token states (--tokens on a pooled cache)


@dataclass
class PendingSet:
    """One feature set an extract (or an import) works on: its encoder, and where its shards go."""

    modality: str
    name: str
    encoder: object
    compute_path: str
    provenance: dict = field(default_factory=dict)
    folder: str = ""
    complete: bool = False


def _recorded_provenance(manifest: dict, chosen: PendingSet) -> dict | None:
    """The provenance a manifest records for a set (None for a set it does not hold yet)."""
    if chosen.folder == chosen.modality:
        return manifest["provenance"][chosen.modality]
    return manifest.get("feature_sets", {}).get(chosen.modality, {}).get(chosen.name, {}).get("provenance")


def _token_pass(recorded: dict, requested: dict) -> dict:
    """The provenance of a set whose token states were added to pooled features made earlier: the pooled
    features keep their compute path; the token pass's own is recorded beside it when it differs (ONNX pooled)."""
    provenance = {**requested, "compute_path": recorded["compute_path"]}
    if requested["compute_path"] != recorded["compute_path"]:
        provenance["token_compute_path"] = requested["compute_path"]
    return provenance


# What to do about a shard of the cache being written that cannot be read: an extract recomputes a missing shard.
_REDO_SHARD = "delete it and run the same extract again"


def shard_pending(path: Path, chosen: PendingSet) -> bool:
    """Whether a shard is still to be written: missing, or without the token states its set now holds."""
    if not path.exists():
        return True
    if not chosen.provenance.get("tokens"):
        return False
    with read_hdf5(path, _REDO_SHARD, "unreadable shard") as shard:
        return "tokens" not in shard


def _decode_hint(differing: list[str], recorded: dict) -> str:
    """How to resume a set whose only difference is the JPEG decoding ("" for any other difference). Absent keys
    mean a full decode (no `jpeg_draft`) and a Pillow draft (no `jpeg_decoder`), as Preprocess.provenance says."""
    keys = {"encoder.preprocess.jpeg_draft", "encoder.preprocess.jpeg_decoder"}
    if not differing or not set(differing) <= keys:
        return ""
    before = recorded["encoder"]["preprocess"]
    if "encoder.preprocess.jpeg_draft" in differing:
        return f" (or --decode as before: {'draft' if before.get('jpeg_draft') else 'full'})"
    if before.get("jpeg_decoder") == "simplejpeg":
        return " (its JPEGs were drafted by simplejpeg, not installed here: pip install 'vlmcache[fast]' to resume it)"
    return " (its JPEGs were drafted by Pillow, this run's by simplejpeg: resume it in an environment without simplejpeg)"


def _assign_folders(manifest: dict, sets: list[PendingSet]) -> None:
    """Each requested set's folder and status from the manifest (default set, further set, or new)."""
    for chosen in sets:
        default = manifest["provenance"][chosen.modality]
        if set_name(default["encoder"]["name"]) == chosen.name:
            chosen.folder, chosen.complete = chosen.modality, manifest.get("status") == "complete"
        else:
            entry = manifest.get("feature_sets", {}).get(chosen.modality, {}).get(chosen.name, {})
            chosen.folder, chosen.complete = set_folder(chosen.modality, chosen.name, False), entry.get("status") == "complete"


CACHE_ENTRIES = {"images", "texts", "index.h5", "manifest.json", ".lock", "text-encoder.onnx", "text-encoder.json",
                 "text-tokenizer.json"}


def _is_set_folder(name: str) -> bool:
    return name in MODALITIES or any(name.startswith(f"{modality}@") for modality in MODALITIES)


def _set_folders(out: Path) -> list[Path]:
    return [child for child in out.iterdir() if child.is_dir() and _is_set_folder(child.name)] if out.is_dir() else []


def _is_cache_file(path: Path) -> bool:
    """Whether vlmcache could have created this entry of a cache folder (so --overwrite may remove it)."""
    name = path.name
    return (name in CACHE_ENTRIES or name.startswith("prompt-features") or ".tmp-" in name
            or (_is_set_folder(name) and path.is_dir())
            or (_is_set_folder(path.parent.name) and (name.startswith("shard-") or name.startswith(".shard-"))))


def check_out_folder(out: Path, dataset) -> None:
    """Refuse an --out that holds the dataset or files that are not a cache's (they would be at risk)."""
    target = os.path.abspath(out)

    def within(path: str) -> bool:
        absolute = os.path.abspath(path)
        return absolute == target or absolute.startswith(target + os.sep)

    if within(str(dataset.root)) or any(within(path) for path in dataset.image_paths):
        raise VlmcacheError(f"--out {out}: contains the dataset's files; write the cache to a folder of its own, "
                            "e.g. features/NAME")
    if out.is_dir():
        foreign = [p for p in [*out.iterdir(), *[c for folder in _set_folders(out) for c in folder.iterdir()]]
                   if not _is_cache_file(p)]
        if foreign:
            raise VlmcacheError(f"--out {out}: holds files that are not part of a vlmcache cache ({foreign[0]}); "
                                "choose an empty or new folder")


def prepare_cache(out: Path, dataset, manifest: dict, sets: list[PendingSet], overwrite: bool) -> None:
    """Check an existing cache holds the same data and, for each requested set it already has, the same
    encoder (or wipe it with overwrite); record new sets; write index and manifest."""
    manifest_path = out / "manifest.json"
    if manifest_path.exists() and not overwrite:
        old = read_manifest(manifest_path)
        differing = [path for path in differences(old.get("dataset", {}), manifest["dataset"]) if path != "root"]
        if differing:  # the same data may be reached by another path
            raise VlmcacheError(f"{out}: already holds a cache of other data (dataset.{', dataset.'.join(differing[:4])}); "
                                "pass --overwrite to replace it, or choose another --out")
        _assign_folders(old, sets)
        adding = []  # complete sets without token states that are asked for them: only the tokens are computed
        for chosen in sets:
            recorded, requested = _recorded_provenance(old, chosen), chosen.provenance
            if recorded is None:
                continue
            if chosen.complete and requested["tokens"] and not recorded.get("tokens"):
                adding.append(chosen)
            if chosen in adding or "token_compute_path" in recorded:
                requested = _token_pass(recorded, requested)
            # A complete set made by another backend holds the same features (within float rounding) and is
            # kept as it is. An incomplete one must resume on its own backend, so no set mixes two.
            differing = [path for path in differences(recorded, requested)
                         if not (chosen.complete and path in ("compute_path", "token_compute_path"))
                         and not (chosen in adding and path == "tokens")]
            if differing:
                hint = (f" (or --backend as before: {recorded.get(differing[0])})"
                        if differing in (["compute_path"], ["token_compute_path"]) else "")
                hint = _decode_hint(differing, recorded) or hint
                raise VlmcacheError(f"{out}: already holds a {chosen.modality[:-1]} feature set {chosen.name!r} made "
                                    f"differently ({', '.join(differing[:4])}); pass --overwrite to replace the cache"
                                    f"{hint}, or choose another --out")
            chosen.provenance = requested if chosen in adding else recorded
            chosen.complete = chosen.complete and chosen not in adding
        if old.get("status") != "complete" and {c.folder for c in sets} & set(MODALITIES) != set(MODALITIES):
            raise VlmcacheError(f"{out}: its extraction is incomplete; finish it first with the same --image-model and "
                                f"--text-model as before ({old['provenance']['images']['encoder']['name']}, "
                                f"{old['provenance']['texts']['encoder']['name']})")
        for chosen in adding:  # a default set's shards change provenance: the cache reads as incomplete until done
            if chosen.folder == chosen.modality:
                old["provenance"][chosen.modality], old["status"] = chosen.provenance, "incomplete"
        manifest.clear()
        manifest.update(old)
    else:
        if overwrite:
            # Only what a cache consists of (checked by check_out_folder): shards, index and manifest.
            for folder in _set_folders(out):
                for shard in folder.glob("shard-*.h5"):
                    shard.unlink()
            for child in ("index.h5", "manifest.json"):
                (out / child).unlink(missing_ok=True)
        defaults = {m: next(c for c in sets if c.modality == m) for m in MODALITIES}
        for chosen in sets:
            chosen.folder, chosen.complete = set_folder(chosen.modality, chosen.name, chosen is defaults[chosen.modality]), False
    for chosen in sets:
        if chosen.folder != chosen.modality and not chosen.complete:
            manifest.setdefault("feature_sets", {}).setdefault(chosen.modality, {})[chosen.name] = {
                "folder": chosen.folder, "provenance": chosen.provenance, "status": "incomplete", "shards": []}
    for folder in {c.folder for c in sets}:
        (out / folder).mkdir(exist_ok=True)
        remove_stale_temporaries(out / folder)  # half shards of a killed run
    remove_stale_temporaries(out)
    if not (out / "index.h5").exists():
        write_index(out / "index.h5", dataset)
        manifest["index_sha256"] = file_sha256(out / "index.h5")  # checked by vlmcache verify
    write_json_atomic(manifest_path, manifest)


def write_or_extend_shard(path: Path, row_start: int, provenance: dict, arrays: dict, left: int = 1) -> None:
    """Write a shard. One already there is a pooled shard being given token states: it keeps its own datasets
    bit for bit (its features may come from another backend) and gains only `tokens` and `token_mask`.

    `left` counts the shards of this set still to write, this one included: on a full disk the error says
    about how much space they need (shards of one set are all about the same size)."""
    if path.exists():
        with read_hdf5(path, _REDO_SHARD, "corrupt shard") as old:  # a failed fletcher32 checksum included
            kept = {name: old[name].asstr()[()] if name == "error" else old[name][()] for name in old}
        lost = np.flatnonzero(kept["valid"].astype(bool) & ~arrays["valid"])
        if len(lost):
            raise VlmcacheError(f"{path}: row {row_start + lost[0]} was readable when the shard was made but is not now "
                                f"({arrays['error'][lost[0]]}); restore it, or re-extract with --overwrite")
        arrays = {**arrays, **kept}
    try:
        write_shard(path, row_start, provenance, arrays, provenance["dtype"])
    except DiskFullError as error:
        if error.needed is None or left < 2:
            raise
        raise error.for_step(f"about {human_size(error.needed * left)} for the {left} shards of this feature set "
                             "still to write") from None


def finalize_cache(out: Path, manifest: dict, plans: dict, work: list[PendingSet], result: ExtractResult) -> None:
    """List the shards of every set computed now; for the default sets, gather skipped items and truncation
    from their shards. Mark the manifest (and each new set) complete."""
    for chosen in work:
        shards, skipped, truncated = [], [], 0
        for number, (start, stop) in enumerate(plans[chosen.modality]):
            path = out / chosen.folder / shard_name(number)
            if not path.exists():
                raise VlmcacheError(f"{path}: shard missing after extraction; run the same extract again")
            invalid, shard_truncated = _shard_summary(path, chosen)
            skipped += [{"modality": chosen.modality, "row": start + offset, "item": None, "reason": reason}
                        for offset, reason in invalid]  # "item" is named from index.h5 below, keeping its key place
            truncated += shard_truncated
            shards.append({"file": shard_name(number), "row_start": start, "rows": stop - start,
                           "sha256": file_sha256(path)})
        _name_skipped(out, skipped)
        if chosen.folder == chosen.modality:
            manifest.setdefault("shards", {})[chosen.modality] = shards
            manifest["skipped"] = [item for item in manifest.get("skipped", []) if item["modality"] != chosen.modality]
            manifest["skipped"] += skipped
            if chosen.modality == "texts":
                manifest["truncated_captions"] = truncated
        else:
            manifest["feature_sets"][chosen.modality][chosen.name].update(status="complete", shards=shards)
    manifest.update({"status": "complete", "finished": now_iso()})
    write_json_atomic(out / "manifest.json", manifest)
    result.skipped, result.truncated_captions = manifest.get("skipped", []), manifest.get("truncated_captions", 0)


def _shard_summary(path: Path, chosen: PendingSet) -> tuple[list[tuple[int, str]], int]:
    """(offset and reason of each row a just-written shard marks invalid, its truncated-caption count); a shard
    of a set that should hold token states but does not is refused."""
    with read_hdf5(path, _REDO_SHARD, "unreadable shard") as shard:
        # A skipped row is always marked invalid; reading only those rows' strings keeps a
        # million-row cache from decoding two million strings here.
        invalid = [(offset, shard["error"].asstr()[offset])
                   for offset in np.flatnonzero(~shard["valid"][()].astype(bool)).tolist()]
        truncated = int(shard["truncated"][()].sum()) if "truncated" in shard else 0
        if chosen.provenance.get("tokens") and "tokens" not in shard:
            raise VlmcacheError(f"{path}: no token states after extraction; run the same extract again")
    return invalid, truncated


def _name_skipped(out: Path, skipped: list[dict]) -> None:
    """Fill each skipped item's "item" (image id, or caption text) from the index, reading only those rows."""
    if not skipped:
        return
    with read_index(out) as index:
        ids = {"images": index["image_id"].asstr(), "texts": index["caption"].asstr()}  # read lazily, row by row
        for item in skipped:
            item["item"] = str(ids[item["modality"]][item["row"]])

