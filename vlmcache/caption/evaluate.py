"""Scoring a trained captioner on a split beside the nearest-neighbour and constant-caption baselines, with
95% intervals (bootstrap over the evaluated images) and a paired test of every row against the best one."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vlmcache.align.load import check_encoders_match
from vlmcache.cache.store import open_cache
from vlmcache.caption.config import CaptionDecoding
from vlmcache.caption.data import load_split
from vlmcache.caption.decode import LENGTH_PENALTY, generate
from vlmcache.caption.model import load_captioner
from vlmcache.errors import VlmcacheError
from vlmcache.metrics.stats import RESAMPLES, method


@dataclass
class CaptionReport:
    """Caption metrics per row (trained, baselines) on one split of one cache, and some example captions.

    Each row also holds, per metric with an interval, <metric>_ci_low, _ci_high, _p_vs_best and _mark (see
    vlmcache.metrics.captions.caption_table_statistics); `statistics` says how they were made."""

    cache: Path
    split: str
    beam: int
    rows: dict[str, dict]
    examples: list[tuple[str, str, str]]  # (image id, generated caption, first reference)
    statistics: dict = field(default_factory=dict)


def evaluate_captioner(checkpoint: str | Path, cache: str | Path | None = None, split: str | None = None,
                       beam: int = 5, nn_k: int = 5, with_baselines: bool = True, resamples: int = RESAMPLES,
                       bootstrap_seed: int = 0) -> CaptionReport:
    """The trained captioner beside the nearest-neighbour and constant baselines on one split (default: test
    when the cache has it, else val), all scored against every reference caption of each image, each row
    with its 95% intervals (`resamples` bootstrap replicates drawn with `bootstrap_seed`)."""
    from vlmcache.metrics.captions import (
        caption_scores,
        caption_table_statistics,
        most_frequent_caption,
        nearest_neighbour_captions,
    )

    CaptionDecoding(beam)  # refuses a beam out of range before any work
    model, meta = load_captioner(checkpoint)
    opened = open_cache(cache or meta["cache"])
    check_encoders_match(meta, opened, modalities=("images",))
    config = model.config
    split = split or opened.default_split()
    data = load_split(opened, split, config.projector == "resampler", config.image_sets)
    if data.images.shape[-1] != meta["image_dim"]:
        raise VlmcacheError(f"{opened.path}: image inputs are {data.images.shape[-1]}-d, the checkpoint expects "
                            f"{meta['image_dim']}-d")
    references = data.references()
    generated = generate(model, data.images, beam)
    name = "small decoder" if config.decoder == "small" else Path(config.decoder).name
    decoding = "greedy" if beam == 1 else f"beam {beam}, length penalty {LENGTH_PENALTY:g}"
    scored = {f"trained ({config.projector} → {name}, {decoding})": caption_scores(generated, references)}
    if with_baselines:
        train_data = load_split(open_cache(meta["cache"]), config.train_split, False, config.image_sets)
        scored[f"nearest neighbour (consensus of {nn_k} images)"] = caption_scores(nearest_neighbour_captions(
            train_data.pooled, train_data.texts, train_data.captions, train_data.caption_image, data.pooled, nn_k),
            references)
        scored["constant (most frequent caption)"] = caption_scores([most_frequent_caption(train_data.captions)] *
                                                                    len(references), references)
    table = caption_table_statistics(list(scored.values()), resamples, bootstrap_seed)
    rows = {name: {**row.scores, **table.row(index)} for index, (name, row) in enumerate(scored.items())}
    examples = [(data.image_ids[i], generated[i], references[i][0]) for i in range(min(5, len(generated)))]
    return CaptionReport(opened.path, split, beam, rows, examples,
                         method("the evaluated images (each with all its references)", resamples, bootstrap_seed))
