"""Scoring a trained captioner on a split beside the nearest-neighbour and constant-caption baselines."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vlmcache.align.load import check_encoders_match
from vlmcache.cache.store import open_cache
from vlmcache.caption.config import CaptionDecoding
from vlmcache.caption.data import load_split
from vlmcache.caption.decode import LENGTH_PENALTY, generate
from vlmcache.caption.model import load_captioner
from vlmcache.errors import VlmcacheError


@dataclass
class CaptionReport:
    """Caption metrics per row (trained, baselines) on one split of one cache, and some example captions."""

    cache: Path
    split: str
    beam: int
    rows: dict[str, dict]
    examples: list[tuple[str, str, str]]  # (image id, generated caption, first reference)


def evaluate_captioner(checkpoint: str | Path, cache: str | Path | None = None, split: str | None = None,
                       beam: int = 5, nn_k: int = 5, with_baselines: bool = True) -> CaptionReport:
    """The trained captioner beside the nearest-neighbour and constant baselines on one split (default: test
    when the cache has it, else val), all scored against every reference caption of each image."""
    from vlmcache.metrics.captions import most_frequent_caption, nearest_neighbour_captions, score_captions

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
    rows = {f"trained ({config.projector} → {name}, {decoding})":
            score_captions(generated, references)}
    if with_baselines:
        train_data = load_split(open_cache(meta["cache"]), config.train_split, False, config.image_sets)
        rows[f"nearest neighbour (consensus of {nn_k} images)"] = score_captions(nearest_neighbour_captions(
            train_data.pooled, train_data.texts, train_data.captions, train_data.caption_image, data.pooled, nn_k),
            references)
        rows["constant (most frequent caption)"] = score_captions([most_frequent_caption(train_data.captions)] *
                                                                  len(references), references)
    examples = [(data.image_ids[i], generated[i], references[i][0]) for i in range(min(5, len(generated)))]
    return CaptionReport(opened.path, split, beam, rows, examples)
