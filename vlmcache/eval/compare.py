"""`vlmcache compare A B`: the paired difference of every retrieval metric of two results on the same items.

A result is any of: a run folder or .safetensors checkpoint (ranked now on its cache, or `cache`); the
JSON of `eval --json` or its .npz of per-query ranks (its first row, the trained model, unless
`PATH#ROW` names another); an ablation cell's ranks (`<ablation>/cells/<key>.npz`). Stored ranks need no
re-embedding. Two results evaluated on different splits or different items are refused: a paired
comparison is only meaningful query by query.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vlmcache.align.config import TrainConfig
from vlmcache.align.inputs import check_input_shapes, model_ranks, token_options
from vlmcache.align.load import checkpoint_caches, load_model
from vlmcache.cache.store import load_features
from vlmcache.errors import VlmcacheError
from vlmcache.files import read_json_file
from vlmcache.metrics.retrieval import RETRIEVAL_KEYS
from vlmcache.metrics.stats import CONFIDENCE, RESAMPLES, paired_difference
from vlmcache.run.ranks import Ranked, load_ranks

TESTS = ("permutation", "bootstrap")


@dataclass(frozen=True)
class Comparison:
    """A − B per metric: {metric: {"a", "b", "difference", "ci_low", "ci_high", "p_value"}}, on one split."""

    a: str
    b: str
    split: str
    items: str
    images: int
    captions: int
    test: str
    metrics: dict[str, dict[str, float]]


def checkpoint_ranked(checkpoint: str | Path, split: str | None = None, cache: str | Path | None = None) -> Ranked:
    """A checkpoint's per-query ranks on a split of its cache (or `cache`) [default: test, else val]."""
    model, meta = load_model(checkpoint)
    opened, text_cache = checkpoint_caches(meta, cache)
    config = TrainConfig.from_dict(meta["config"])
    evaluated = load_features(opened, split or opened.default_split(), text_cache, config.image_sets, config.text_sets,
                              **token_options(config))
    check_input_shapes(meta, evaluated, opened.path)
    return Ranked.of(model_ranks(model, evaluated), evaluated)


def _stored(path: Path, row: str | None, source: str) -> Ranked:
    """A row of a ranks file (.npz), or of the ranks beside an `eval --json` file."""
    if path.suffix == ".json":
        named = read_json_file(path, "result file", "pass a file written by vlmcache eval --json", shape=dict).get("ranks")
        if not isinstance(named, str):
            raise VlmcacheError(f"{source}: holds no per-query ranks; write it again with a current vlmcache eval --json")
        path = path.parent / named
    rows = load_ranks(path)
    if row is None:
        return next(iter(rows.values()))
    if row not in rows:
        raise VlmcacheError(f"{source}: has no row {row!r}; it has {', '.join(map(repr, rows))}")
    return rows[row]


def resolve(source: str | Path, split: str | None = None, cache: str | Path | None = None) -> Ranked:
    """The per-query ranks of one side of a comparison (see the module docstring for what `source` may be)."""
    text = str(source)
    path, row = Path(text), None
    if not path.exists() and "#" in text:
        path, row = Path(text.rsplit("#", 1)[0]), text.rsplit("#", 1)[1]
    if not path.exists():
        raise VlmcacheError(f"{source}: no such run, checkpoint or result file")
    if path.suffix in (".json", ".npz"):
        if cache is not None:
            raise VlmcacheError(f"--cache {cache}: {source} holds stored ranks already; --cache applies to runs only")
        ranked = _stored(path, row, text)
        if split is not None and ranked.split != split:
            raise VlmcacheError(f"--split {split}: {source} was evaluated on split {ranked.split!r}")
        return ranked
    return checkpoint_ranked(path, split, cache)


def compare(a: str | Path, b: str | Path, cache: str | Path | None = None, split: str | None = None,
            test: str = "permutation", resamples: int = RESAMPLES) -> Comparison:
    """The paired difference A − B of every retrieval metric, its 95% bootstrap interval (over the evaluated
    images, each with its captions) and a two-sided p-value of "no difference" (`test`: "permutation",
    a sign-flip test per image, or "bootstrap"). Results on different splits or items are refused."""
    if test not in TESTS:
        raise VlmcacheError(f"--test {test}: use one of {', '.join(TESTS)}")
    first, second = resolve(a, split, cache), resolve(b, split, cache)
    if first.split != second.split:
        raise VlmcacheError(f"{a} was evaluated on split {first.split!r} and {b} on {second.split!r}; compare results "
                            "on the same split (--split)")
    if first.items != second.items:
        raise VlmcacheError(f"{a} and {b} were evaluated on different items (split {first.split!r}: items {first.items} "
                            f"vs {second.items}); compare results on the same cache and split")
    result = paired_difference(first.hits(), second.hits(), resamples, test=test)
    metrics = {metric: {"a": float(result.a[i]), "b": float(result.b[i]), "difference": float(result.difference[i]),
                        "ci_low": float(result.low[i]), "ci_high": float(result.high[i]),
                        "p_value": float(result.p_value[i])} for i, metric in enumerate(RETRIEVAL_KEYS)}
    return Comparison(str(a), str(b), first.split, first.items, len(first.image_ranks), len(first.text_ranks), test,
                      metrics)


COMPARISON_NOTE = (f"{CONFIDENCE:.0%} interval: paired bootstrap over the evaluated images (each with its captions); "
                   "p: two-sided, per metric, not corrected for the 7 metrics")
