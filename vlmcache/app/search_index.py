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
answers, and nothing is lost if the run folder is read-only.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlmcache.encode.prompts import PromptStore, prompt_folder
from vlmcache.errors import VlmcacheError

MAX_QUERY_CHARS = 1000


FOLDER = "search-index"


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


def _header(path: Path) -> dict:
    """The string metadata of a safetensors file, read without PyTorch ({} if unreadable)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "np") as handle:
            return handle.metadata() or {}
    except (SafetensorError, OSError):
        return {}


def search_with_index(checkpoint: str | Path, query: str, top: int = 5, split: str | None = None,
                      cache: str | Path | None = None) -> list[SearchHit] | None:
    """The search answered from the run's index without PyTorch, or None when there is no usable index."""
    path = checkpoint_file(checkpoint)
    meta = json.loads(_header(path).get("vlmcache", "null")) if path.is_file() else None
    index = None if not isinstance(meta, dict) else index_path(path, meta, split, cache)
    if index is None or not index.is_file():
        return None
    try:
        import onnxruntime  # only once there is an index: the PyTorch fallback has no use for it
    except ImportError:
        return None  # an index written before onnxruntime was uninstalled: the PyTorch path answers
    from safetensors.numpy import load_file

    arrays, header = load_file(str(index)), _header(index)
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    projector = onnxruntime.InferenceSession(arrays["text_projector"].tobytes(), options,
                                             providers=["CPUExecutionProvider"])
    features = PromptStore(meta["text_encoder"], prompt_folder(meta)).encode([query])
    scores = (arrays["images"] @ projector.run(None, {"features": features})[0][0]).astype(np.float32)
    best = np.argsort(-scores, kind="stable")[:top]
    ids, paths = json.loads(header["image_ids"]), json.loads(header["image_paths"])
    return [SearchHit(rank + 1, float(scores[row]), ids[row], paths[row], int(row)) for rank, row in enumerate(best)]

