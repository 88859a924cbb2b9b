"""A run's search index: what a one-off `vlmcache search` needs, read without PyTorch.

Importing PyTorch alone takes about 3 s on a 2-core CPU — the whole budget of a one-off query. So a run
keeps, per searched split, one safetensors file in `RUN/search-index/`: the text side of the model
(standardisation, projector, normalisation) exported to ONNX, and the split's unit image embeddings with
their ids and paths. `vlmcache train` writes the default split's index when it finishes; any other split
gets one on its first search. A search with an index encodes the query with the cache's saved ONNX text
encoder (or the prompt store, for a query seen before), projects it with ONNX Runtime and ranks with numpy.

An index is named by a hash of what it depends on — the checkpoint's bytes, the searched cache's manifest
and the split asked for — so a retrained run or a re-extracted cache never reads a stale one (writing a
new index removes the stale ones of the same checkpoint file and split). The index is
derived data: when it is missing, or the search needs what it cannot give (QB-Norm), the PyTorch path
answers, and nothing is lost if the run folder is read-only. It is sealed with the SHA-256 of its content
(vlmcache.files.write_sealed_safetensors): a damaged index is refused in one line, never searched, and one
written before indexes were sealed is treated as missing (rebuilt by the search that finds it).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlmcache.encode.prompts import PromptStore, onnx_session, prompt_folder
from vlmcache.errors import VlmcacheError
from vlmcache.files import SEAL, read_safetensors, shape_error

MAX_QUERY_CHARS = 1000


FOLDER = "search-index"
INDEX_HINT = "delete it and search again (the index is rebuilt from the checkpoint)"
# What the index path reads of a checkpoint's metadata (the PyTorch path checks all of it).
_META = {"cache": str, "text_cache?": str,
         "text_encoder": {"weights_sha256": str, "pooling": str, "max_length": int, "dim": int}}


@dataclass
class SearchHit:
    """One row of a text→image search."""

    rank: int
    score: float
    image_id: str
    path: str
    row: int  # the image's row in the searched split


def check_query(query: str, top: int) -> None:
    """Refuse an empty or oversized query and a `top` below 1, whichever path answers."""
    if not query.strip():
        raise VlmcacheError("the search query is empty; type what the image should show")
    if len(query) > MAX_QUERY_CHARS:
        raise VlmcacheError(f"the search query has {len(query)} characters; keep it under {MAX_QUERY_CHARS}")
    if top < 1:
        raise VlmcacheError(f"--top {top}: must be at least 1")


def checkpoint_file(checkpoint: str | Path) -> Path:
    """A run folder's best checkpoint, or the .safetensors file given."""
    path = Path(checkpoint)
    return path / "best.safetensors" if path.is_dir() else path


def index_path(checkpoint: str | Path, meta: dict, split: str | None, cache: str | Path | None) -> Path | None:
    """Where the index for this checkpoint, cache and split lives (None if the cache has no manifest)."""
    path = checkpoint_file(checkpoint)
    try:
        manifest = (Path(cache or meta["cache"]) / "manifest.json").read_bytes()
    except (OSError, KeyError, TypeError):  # no cache there, or a header that is not vlmcache's: no index
        return None
    digest = hashlib.sha256()
    for part in (path.read_bytes(), manifest, str(split).encode()):
        digest.update(hashlib.sha256(part).digest())
    return path.parent / FOLDER / f"{index_prefix(path, split)}{digest.hexdigest()[:20]}.safetensors"


def index_prefix(path: Path, split: str | None) -> str:
    """The start of every index name of this checkpoint file and split, current or stale."""
    return f"{path.stem}-{re.sub(r'[^A-Za-z0-9_-]', '_', split or 'default')}-"


def _checkpoint_meta(path: Path) -> dict | None:
    """A checkpoint's metadata, read without PyTorch; None when it is not a whole vlmcache checkpoint with what
    the index path needs (the PyTorch path then refuses it in one line, naming what is wrong)."""
    try:
        _, header = read_safetensors(path, "safetensors checkpoint", "")
        meta = json.loads(header.get("vlmcache", "null"))
    except (VlmcacheError, ValueError, RecursionError):
        return None
    return meta if not shape_error(meta, _META) else None


def read_index(index: Path) -> tuple[dict[str, np.ndarray], list[str], list[str]] | None:
    """(arrays, image ids, image paths) of a search index: the one reader of indexes. None for an index written
    before indexes were sealed (to be rebuilt); a damaged or malformed one is refused in one line naming it."""
    from safetensors.numpy import load

    arrays, header = read_safetensors(index, "search index", INDEX_HINT, load=load)
    if SEAL not in header:
        return None
    try:
        ids, paths = json.loads(header["image_ids"]), json.loads(header["image_paths"])
        rows = arrays["images"].shape[0] if arrays["images"].ndim == 2 else -1
    except (KeyError, ValueError, RecursionError) as error:
        raise VlmcacheError(f"{index}: not a search index (no {error}); {INDEX_HINT}") from None
    if shape_error(ids, [str]) or shape_error(paths, [str]) or not len(ids) == len(paths) == rows or \
            arrays.get("text_projector", np.zeros(0)).dtype != np.uint8:
        raise VlmcacheError(f"{index}: not a search index (its parts disagree); {INDEX_HINT}")
    return arrays, ids, paths


def search_with_index(checkpoint: str | Path, query: str, top: int = 5, split: str | None = None,
                      cache: str | Path | None = None) -> list[SearchHit] | None:
    """The search answered from the run's index without PyTorch, or None when there is no usable index."""
    path = checkpoint_file(checkpoint)
    meta = _checkpoint_meta(path) if path.is_file() else None
    index = None if meta is None else index_path(path, meta, split, cache)
    read = read_index(index) if index is not None and index.is_file() else None
    if read is None:
        return None
    if importlib.util.find_spec("onnxruntime") is None:
        return None  # an index written before onnxruntime was uninstalled: the PyTorch path answers
    arrays, ids, paths = read
    projector = onnx_session(arrays["text_projector"].tobytes(), index, INDEX_HINT)
    features = PromptStore(meta["text_encoder"], prompt_folder(meta)).encode([query])
    scores = (arrays["images"] @ projector.run(None, {"features": features})[0][0]).astype(np.float32)
    best = np.argsort(-scores, kind="stable")[:top]
    return [SearchHit(rank + 1, float(scores[row]), ids[row], paths[row], int(row)) for rank, row in enumerate(best)]


def verify_run(run: str | Path) -> list[tuple[str, str]]:
    """(file, problem) for each checkpoint or search index of a run folder that is damaged: unreadable, or
    different from the SHA-256 sealed into it when it was written; [] when all is well. Files written before
    vlmcache sealed them are read but cannot be compared."""
    folder = Path(run)
    problems = []
    for path in [*sorted(folder.glob("*.safetensors")), *sorted((folder / FOLDER).glob("*.safetensors"))]:
        try:
            if path.parent.name == FOLDER:
                read_index(path)
            else:
                read_safetensors(path, "safetensors checkpoint", "train again, or resume from a whole last.safetensors")
        except VlmcacheError as error:
            problems.append((str(path), str(error).split(": ", 1)[-1]))
    return problems
