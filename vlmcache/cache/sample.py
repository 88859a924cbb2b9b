"""A paired sample of a split, read from every feature set of a cache: row i of each set is one image, or
one of its captions. What compatibility scores (vlmcache.metrics.compat) are computed on.

Only the sampled rows are kept in memory (one set's split at a time is read, then indexed), so scoring
a cache of many sets needs memory for the sample, not for the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vlmcache.cache.store import FeatureCache
from vlmcache.errors import VlmcacheError


@dataclass
class PairedSample:
    """Features of the same n (image, caption) pairs in every feature set; rows are split-relative."""

    split: str
    image_rows: np.ndarray  # (n,) image row of each pair within the split
    caption_rows: np.ndarray  # (n,) caption row of each pair within the split
    images: dict[str, np.ndarray]  # image set name -> (n, dim) float32
    texts: dict[str, np.ndarray]  # text set name -> (n, dim) float32


def paired_rows(caption_image: np.ndarray, image_valid: np.ndarray, caption_valid: np.ndarray, sample: int | None,
                seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(image rows, caption rows) of a paired sample: one valid caption per valid image, drawn with `seed`,
    then `sample` of those images drawn with the same seed (all of them when `sample` is None or larger).

    One caption per image, not every caption: five captions of one image would be one another's nearest
    neighbours on the text side with no counterpart on the image side. Rows come back in split order.
    """
    rng = np.random.default_rng(seed)
    usable = caption_valid & image_valid[caption_image]
    captions = np.flatnonzero(usable)
    # A random key per caption, then the caption with the smallest key per image: a uniform draw per image.
    order = np.lexsort((rng.random(len(captions)), caption_image[captions]))
    images, first = np.unique(caption_image[captions[order]], return_index=True)
    chosen = captions[order][first]
    if sample is not None and sample < len(images):
        keep = np.sort(rng.choice(len(images), sample, replace=False))
        images, chosen = images[keep], chosen[keep]
    return images.astype(np.int64), chosen.astype(np.int64)


def read_paired_sample(cache: FeatureCache, split: str, sample: int | None = None, seed: int = 0,
                       image_sets: list[str] | None = None, text_sets: list[str] | None = None) -> PairedSample:
    """The paired sample of `split` in the named sets (None: every complete set of that modality).

    Images skipped in any image set and captions skipped in any text set are left out, so every set
    holds the same pairs.
    """
    image_sets = list(cache.feature_sets("images")) if image_sets is None else image_sets
    text_sets = list(cache.feature_sets("texts")) if text_sets is None else text_sets
    image_slice, caption_slice = cache.split_rows(split)
    caption_image = np.asarray(cache.index_rows("caption_image", caption_slice)) - image_slice.start
    valid = {modality: np.logical_and.reduce([cache.read(modality, rows, "valid", name).astype(bool) for name in names])
             for modality, rows, names in (("images", image_slice, image_sets), ("texts", caption_slice, text_sets))}
    image_rows, caption_rows = paired_rows(caption_image, valid["images"], valid["texts"], sample, seed)
    if len(image_rows) == 0:
        raise VlmcacheError(f"{cache.path}: split {split!r} has no image with a readable caption to score")

    def rows_of(modality: str, rows: slice, name: str, chosen: np.ndarray) -> np.ndarray:
        features = cache.read(modality, rows, feature_set=name)[chosen].astype(np.float32)
        if not np.isfinite(features).all():
            raise VlmcacheError(f"{cache.path}: {modality} set {name!r} has NaN or infinite features in split "
                                f"{split!r}; run vlmcache verify {cache.path} and re-extract")
        return features

    return PairedSample(split, image_rows, caption_rows,
                        {name: rows_of("images", image_slice, name, image_rows) for name in image_sets},
                        {name: rows_of("texts", caption_slice, name, caption_rows) for name in text_sets})
