"""A selection split carved out of a loaded split (`--select-on train:N`), so that choices (best epoch, tuned
values, QB-Norm β) are made on images that are neither trained on nor reported.

The carved images are chosen by a hash of their ids, not by row order or a seed: every cell of a grid,
every seed and every cache of the same dataset (whatever its encoders) carves the same images.
"""

from __future__ import annotations

import hashlib

import numpy as np

from vlmcache.cache.store import Split
from vlmcache.errors import VlmcacheError


def carved_images(image_ids: list[str], count: int) -> np.ndarray:
    """A boolean mask of the `count` images whose id hashes lowest (a fixed pseudo-random choice)."""
    keys = [hashlib.sha256(image_id.encode()).digest() for image_id in image_ids]
    chosen = np.zeros(len(image_ids), dtype=bool)
    chosen[sorted(range(len(keys)), key=keys.__getitem__)[:count]] = True
    return chosen


def subset(split: Split, images: np.ndarray, name: str) -> Split:
    """The images of `split` where the mask `images` is true, with their captions (and token states)."""
    captions = images[split.caption_image]
    new_row = np.cumsum(images) - 1

    def rows(array: np.ndarray | None, mask: np.ndarray) -> np.ndarray | None:
        return None if array is None else array[mask]

    return Split(name=name, image_features=split.image_features[images], text_features=split.text_features[captions],
                 caption_image=new_row[split.caption_image[captions]].astype(np.int64),
                 image_ids=[i for i, keep in zip(split.image_ids, images, strict=True) if keep],
                 image_paths=[p for p, keep in zip(split.image_paths, images, strict=True) if keep],
                 captions=[c for c, keep in zip(split.captions, captions, strict=True) if keep],
                 image_labels=rows(split.image_labels, images), image_tokens=rows(split.image_tokens, images),
                 image_token_mask=rows(split.image_token_mask, images), text_tokens=rows(split.text_tokens, captions),
                 text_token_mask=rows(split.text_token_mask, captions))


def carve(split: Split, count: int) -> tuple[Split, Split]:
    """(the rest of `split`, `count` of its images carved out as a selection split named '<split>:<count>')."""
    if not 1 <= count < len(split.image_ids):
        raise VlmcacheError(f"--select-on {split.name}:{count}: split {split.name!r} has {len(split.image_ids)} images; "
                            "carve fewer, leaving some to train on")
    chosen = carved_images(split.image_ids, count)
    return subset(split, ~chosen, split.name), subset(split, chosen, f"{split.name}:{count}")
