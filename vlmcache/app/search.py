"""Searching a run's cached images by text: the run's index when it answers (no PyTorch imported), else the
PyTorch predictor, which then writes the index for the next search."""

from __future__ import annotations

from pathlib import Path

from vlmcache.app.search_index import SearchHit, check_query, search_with_index


def build_index(run: str | Path, split: str | None = None, cache: str | Path | None = None) -> Path | None:
    """Write a run's index for a split (default: the one `search` searches by default), as `train` does."""

    from vlmcache.app.predictor import Predictor, write_search_index

    return write_search_index(Predictor(run), run, split, cache)


def search_images(checkpoint: str | Path, query: str, top: int = 5, split: str | None = None,
                  cache: str | Path | None = None, qbnorm: bool = False) -> list[SearchHit]:
    """The `top` cached images of a split closest to a text query (see Predictor.search), by the fastest path
    that gives the same answer: the run's index when it has one for this split (QB-Norm aside), else the
    PyTorch predictor, which then writes the index for the next search."""
    check_query(query, top)
    if not qbnorm:
        hits = search_with_index(checkpoint, query, top, split, cache)
        if hits is not None:
            return hits

    from vlmcache.app.predictor import Predictor, write_search_index  # PyTorch only when no index answers

    predictor = Predictor(checkpoint)
    hits = predictor.search(query, top, split, cache, qbnorm)
    if not qbnorm:
        write_search_index(predictor, checkpoint, split, cache)
    return hits

