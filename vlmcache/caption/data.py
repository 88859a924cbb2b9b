"""A cache split for captioning (each image's input and its captions), and its captions as length-bucketed
batches of token rows for training."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from vlmcache.cache.store import FeatureCache
from vlmcache.errors import VlmcacheError


@dataclass
class CaptionData:
    """One split for captioning: each image's input (pooled feature or tokens) and its captions."""

    images: torch.Tensor  # (N, D) pooled features, or (N, T, C) token states (kept in the cache dtype)
    pooled: np.ndarray  # (N, D) pooled features, float32 (for the nearest-neighbour baseline)
    texts: np.ndarray  # (captions, text_dim) cached caption features (for its consensus)
    captions: list[str]
    caption_image: np.ndarray  # (captions,) image row of each caption
    image_ids: list[str]

    def references(self) -> list[list[str]]:
        """All captions of each image, in image order."""
        found: list[list[str]] = [[] for _ in range(len(self.image_ids))]
        for caption, image in zip(self.captions, self.caption_image.tolist(), strict=True):
            found[image].append(caption)
        return found


def load_split(cache: FeatureCache, split: str, tokens: bool, image_sets: tuple[str, ...] | None = None) -> CaptionData:
    """A split of a cache for captioning: its `image_sets` (None: the default set) concatenated, or with
    `tokens` the token states of its one set (extract --tokens)."""
    if cache.classes:
        raise VlmcacheError(f"{cache.path}: a labelled image folder (classes, no captions) cannot train or score a "
                            "captioner; extract an image–caption dataset (Flickr8k, Karpathy JSON, CSV/JSONL pairs)")
    loaded = cache.split(split, image_sets)
    if len(loaded.captions) == 0:
        raise VlmcacheError(f"{cache.path}: split {split!r} has no captions; a captioner needs image–caption pairs")
    images = torch.from_numpy(loaded.image_features)
    if tokens:
        chosen = image_sets[0] if image_sets else None
        if not cache.feature_set("images", chosen).provenance.get("tokens"):
            raise VlmcacheError(f"{cache.path}: has no image tokens for --projector resampler; re-extract with "
                                "vlmcache extract ... --tokens (or use --projector linear or mlp)")
        rows, _ = cache.split_rows(split)
        valid = cache.read("images", rows, "valid", chosen).astype(bool)
        images = torch.from_numpy(cache.read_tokens("images", rows, valid, chosen)[0])  # the store's checked reader
    return CaptionData(images, loaded.image_features, loaded.text_features, loaded.captions,
                       loaded.caption_image, loaded.image_ids)


@dataclass
class CaptionBatches:
    """A split's captions as token rows for teacher forcing (start, caption, end, padding), in length-bucketed
    batches with their images' inputs."""

    images: torch.Tensor  # each image's input, as CaptionData.images
    owner: torch.Tensor  # (N,) the image row of each caption
    sequences: torch.Tensor  # (N, max_words + 2) token ids
    lengths: np.ndarray  # (N,) real tokens of each row
    batch_size: int

    @classmethod
    def of(cls, data: CaptionData, decoder, max_words: int, batch_size: int) -> CaptionBatches:
        """The captions of `data` encoded by `decoder`, cut to `max_words`."""
        sequences, lengths = _sequences(decoder, data.captions, max_words)
        return cls(data.images, torch.from_numpy(data.caption_image), torch.from_numpy(sequences), lengths, batch_size)

    def steps_per_epoch(self) -> int:
        """Batches in one epoch (every caption once)."""
        return math.ceil(len(self.lengths) / self.batch_size)

    def epoch(self, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(image inputs, token ids cut to the longest row, lengths) of each batch of one epoch."""
        lengths = torch.from_numpy(self.lengths)
        for rows in length_batches(self.lengths, self.batch_size, generator):
            rows_t = torch.from_numpy(rows)
            longest = int(lengths[rows_t].max())
            yield self.images[self.owner[rows_t]], self.sequences[rows_t, :longest], lengths[rows_t]


def _sequences(decoder, captions: list[str], max_words: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, max_words + 2) token ids (start, caption, end, padding) and each row's real length."""
    encoded = [ids[:max_words] for ids in decoder.encode(captions)]
    lengths = np.array([len(ids) + 2 for ids in encoded], dtype=np.int64)
    table = np.full((len(encoded), max_words + 2), decoder.pad_id, dtype=np.int64)
    for row, ids in enumerate(encoded):
        table[row, :len(ids) + 2] = [decoder.start_id, *ids, decoder.end_id]
    return table, lengths


def length_batches(lengths: np.ndarray, batch_size: int, generator: torch.Generator) -> list[np.ndarray]:
    """One epoch of caption rows in batches of equal (or nearly equal) length, in a seeded random order:
    shuffle, stable-sort by length, cut into batches, shuffle the batches. Little padding, no bias in order."""
    order = torch.randperm(len(lengths), generator=generator).numpy()
    order = order[np.argsort(lengths[order], kind="stable")]
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
