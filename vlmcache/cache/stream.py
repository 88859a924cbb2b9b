"""Streaming batches from a cache split that does not fit in memory: shard windows, a background reader,
exact resume.

The unit of reading is one image shard of the split together with the caption rows its images own
(captions are stored in image order, so those rows are one contiguous range of the text shards). Each
epoch:

1. the units are put in a shuffled order (seeded by seed and epoch); under torchrun rank r takes units
   r, r + N, r + 2N, ... of that order;
2. consecutive units of a rank form a *window* of about `buffer` images: the bounded shuffle buffer.
   A window is read whole, and its rows are permuted (seeded by seed, epoch, rank and window);
3. with sampling="image" (the default, as in `train`) every image of the window with a usable caption
   appears once with one caption drawn at random among its own; with sampling="caption" every usable
   caption appears once with its image;
4. the windows' rows, in order, are cut into batches of `batch_size` (a batch may span two windows).

How this differs from in-memory shuffling: in memory any two images can meet in a batch; here two images
meet only if their shards fall in the same window (or at a window boundary). With `buffer` at least the
split's size the window is the whole split and the order is a plain permutation again. Negatives in a
batch therefore come from `buffer` images around it; shards are written in dataset order, so when the
data has order (e.g. by source or time), a window's negatives share it. The README measures the effect
on Flickr8k.

Which rows a batch holds depends only on the seed, the epoch, row counts and the `valid` flags, which
are read (a few bytes per row) before any features: so position p of an epoch is reached exactly by
skipping the first p batches' rows without reading their features (`epoch(e, start=p)`). A background
thread reads the next window while the current one is trained on (a queue of `prefetch` windows: memory
is bounded by about 2 + prefetch windows); an exception in the thread is raised in the consumer, and
closing the iterator stops the thread.
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from vlmcache.cache.store import FeatureCache, read_hdf5, shard_hint
from vlmcache.cache.tokens import EMBED_BATCH, Tokens, token_batch
from vlmcache.errors import VlmcacheError

DEFAULT_BUFFER = 65_536  # images per shuffle window
TOKEN_CHUNK = 4096  # token rows read at once in chunked evaluation: 4,096 × 49 × 1280 fp16 is 0.5 GB


@dataclass
class Batch:
    """One batch: image and text features (float32), the image row of each pair when same-image pairs
    must be masked (sampling="caption"; None otherwise), and any extra fields asked for."""

    images: torch.Tensor | Tokens
    texts: torch.Tensor | Tokens
    image_ids: torch.Tensor | None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


class ShardStream:
    """Batches of a split of `cache`, read a window of shards at a time (see the module docstring).

    `extra_fields` names further per-row datasets to stream beside the features, e.g.
    {"images": ("tokens",), "texts": ("tokens", "token_mask")}; they are read from the first feature set of
    their modality and returned in `Batch.extra` as "images.tokens", ... in their stored dtype.
    `tokens` names the modalities whose token states (extract --tokens) take the place of their pooled
    features in each batch, as `Tokens` (float32 states and mask), for the token-level projectors.
    """

    resumable_mid_epoch = True  # `epoch(e, start)` continues exactly at batch `start`

    def __init__(self, cache: FeatureCache, split: str, batch_size: int, seed: int, *,
                 image_sets: tuple[str, ...] | None = None, text_sets: tuple[str, ...] | None = None,
                 sampling: str = "image", buffer: int = DEFAULT_BUFFER, prefetch: int = 1, rank: int = 0,
                 world: int = 1, extra_fields: dict[str, tuple[str, ...]] | None = None, tokens: tuple[str, ...] = ()):
        self.cache, self.split, self.batch_size, self.seed = cache, split, batch_size, seed
        self.sets = {"images": image_sets or (None,), "texts": text_sets or (None,)}
        self.sampling, self.buffer, self.prefetch, self.rank, self.world = sampling, buffer, prefetch, rank, world
        self.tokens = tokens
        self.extra_fields = {m: (*(extra_fields or {}).get(m, ()), *(("tokens", "token_mask") if m in tokens else ()))
                             for m in ("images", "texts")}
        # (tokens per row, width) of each token modality; a cache without them is refused now, not at the first window
        self.token_shapes = {modality: cache.token_shape(modality, self.sets[modality][0]) for modality in tokens}
        self.image_rows, self.caption_rows = cache.split_rows(split)
        # Per-row metadata of the whole split (bytes per row): enough to plan every batch before reading features.
        image_valid = self._valid("images", self.image_rows)
        text_valid = self._valid("texts", self.caption_rows)
        self.owner = np.asarray(cache.index_rows("caption_image", self.caption_rows), np.int64) - self.image_rows.start
        text_valid &= image_valid[self.owner] if len(self.owner) else text_valid
        self.usable_captions = np.flatnonzero(text_valid)  # split-local caption rows
        counts = np.bincount(self.owner[self.usable_captions], minlength=len(image_valid))
        self.caption_count, self.caption_first = counts, np.cumsum(counts) - counts  # into usable_captions
        # Units: the split's part of each shard of the first image set, with the caption rows its images own.
        start, stop = self.image_rows.start, self.image_rows.stop
        bounds = [(max(s["row_start"], start) - start, min(s["row_start"] + s["rows"], stop) - start)
                  for s in cache.feature_set("images", self.sets["images"][0]).shards
                  if s["row_start"] < stop and s["row_start"] + s["rows"] > start]
        self.units = [(lo, hi, int(np.searchsorted(self.owner, lo)), int(np.searchsorted(self.owner, hi)))
                      for lo, hi in bounds]
        self.unit_rows = np.asarray([self._unit_plan_rows(unit) for unit in self.units], np.int64)
        rows_per_unit = max(1, max((hi - lo for lo, hi, _, _ in self.units), default=1))
        self.units_per_window = max(1, math.ceil(buffer / rows_per_unit))

    def _valid(self, modality: str, rows: slice) -> np.ndarray:
        valid = np.ones(rows.stop - rows.start, bool)
        for name in self.sets[modality]:
            if rows.stop > rows.start:
                valid &= self.cache.read(modality, rows, "valid", name).astype(bool)
        return valid

    def _unit_plan_rows(self, unit: tuple[int, int, int, int]) -> int:
        lo, hi, _, _ = unit
        if self.sampling == "image":
            return int((self.caption_count[lo:hi] > 0).sum())
        return int(((self.owner[self.usable_captions] >= lo) & (self.owner[self.usable_captions] < hi)).sum())

    def windows(self, epoch: int, rank: int | None = None) -> list[list[int]]:
        """The unit numbers of each window `rank` (default: this stream's) reads in `epoch`, in order."""
        rank = self.rank if rank is None else rank
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.units))[rank::self.world].tolist()
        return [order[i:i + self.units_per_window] for i in range(0, len(order), self.units_per_window)]

    def rows_per_epoch(self, epoch: int, rank: int | None = None) -> int:
        """Pairs a rank sees in an epoch (known without reading features)."""
        return int(sum(self.unit_rows[window].sum() for window in self.windows(epoch, rank)))

    def steps_per_epoch(self, epoch: int = 0) -> int:
        """Batches per epoch. One process: the last batch may be short. Several ranks: every rank takes the
        same number of full batches (the all-gather needs equal shapes), so each epoch drops the ranks'
        remainders, at most world × batch_size − 1 pairs. (Window sizes differ by epoch by a shard at most;
        the count is taken per epoch.)"""
        if self.world == 1:
            return math.ceil(self.rows_per_epoch(epoch) / self.batch_size)
        return min(self.rows_per_epoch(epoch, rank) // self.batch_size for rank in range(self.world))

    def _plan(self, epoch: int, number: int, window: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(image rows, caption rows, image id per pair or None), split-local, of one window in training order."""
        rng = np.random.default_rng([self.seed, epoch, self.rank, number])
        images = np.concatenate([np.arange(self.units[u][0], self.units[u][1]) for u in window])
        if self.sampling == "image":
            images = images[self.caption_count[images] > 0]
            images = images[rng.permutation(len(images))]
            draws = rng.random(len(images))
            chosen = self.caption_first[images] + (draws * self.caption_count[images]).astype(np.int64)
            return images, self.usable_captions[chosen], None
        captions = np.concatenate([np.arange(self.units[u][2], self.units[u][3]) for u in window])
        captions = np.intersect1d(captions, self.usable_captions)
        captions = captions[rng.permutation(len(captions))]
        return self.owner[captions], captions, self.owner[captions] + self.image_rows.start

    def _read_window(self, epoch: int, number: int, window: list[int], skip: int) -> tuple:
        """Features of a window's planned pairs, in training order, from pair `skip` on (stored dtype)."""
        images, captions, ids = self._plan(epoch, number, window)
        images, captions, ids = images[skip:], captions[skip:], None if ids is None else ids[skip:]
        # Read each unit's rows contiguously once (whole-shard reads, no per-row seeks), then gather.
        blocks: dict[str, list[np.ndarray]] = {}
        for u in window:
            lo, hi, clo, chi = self.units[u]
            rows = {"images": slice(self.image_rows.start + lo, self.image_rows.start + hi),
                    "texts": slice(self.caption_rows.start + clo, self.caption_rows.start + chi)}
            for modality in ("images", "texts"):
                blocks.setdefault(modality, []).append(np.concatenate(
                    [self._read(modality, rows[modality], "features", name) for name in self.sets[modality]], axis=1))
                for name in self.extra_fields.get(modality, ()):
                    blocks.setdefault(f"{modality}.{name}", []).append(
                        self._read(modality, rows[modality], name, self.sets[modality][0]))
        image_at = _positions(np.concatenate([np.arange(self.units[u][0], self.units[u][1]) for u in window]), images)
        caption_at = _positions(np.concatenate([np.arange(self.units[u][2], self.units[u][3]) for u in window]), captions)
        joined = {name: np.concatenate(parts) for name, parts in blocks.items()}
        gathered = {name: value[image_at if name.startswith("images") else caption_at] for name, value in joined.items()}
        return gathered, ids

    def _read(self, modality: str, rows: slice, name: str, feature_set: str | None) -> np.ndarray:
        chosen = self.cache.feature_set(modality, feature_set)
        touched = [entry for entry in chosen.shards
                   if entry["row_start"] < max(rows.stop, rows.start + 1) and entry["row_start"] + entry["rows"] > rows.start]
        for entry in touched:
            if not (self.cache.path / chosen.folder / entry["file"]).exists():
                raise VlmcacheError(f"{self.cache.path / chosen.folder / entry['file']}: shard missing mid-stream (it was "
                                    f"there when training started); run vlmcache verify {self.cache.path} and "
                                    "re-extract the missing shards")
        if rows.stop > rows.start:
            return self.cache.read(modality, rows, name, feature_set)
        first = self.cache.path / chosen.folder / touched[0]["file"]
        with read_hdf5(first, shard_hint(self.cache.path)) as shard:  # no rows: the right shape
            return np.zeros((0, *shard[name].shape[1:]), shard[name].dtype)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """The batches of `epoch` from batch `start` on (0-based). Reads ahead on a background thread."""
        steps = self.steps_per_epoch(epoch)
        skip = start * self.batch_size
        work = []
        for number, window in enumerate(self.windows(epoch)):
            rows = int(self.unit_rows[window].sum())
            if skip >= rows:  # wholly before the resume point: skipped without reading a byte of features
                skip -= rows
                continue
            work.append((number, window, skip))
            skip = 0
        windows = _background(lambda: (self._read_window(epoch, number, window, offset)
                                       for number, window, offset in work), self.prefetch)
        try:
            for batch in _rechunk(windows, self.batch_size, steps - start):
                yield self._with_tokens(batch)
        finally:
            windows.close()

    def _with_tokens(self, batch: Batch) -> Batch:
        """The batch with each of `self.tokens`' pooled features replaced by its token states."""
        for modality in self.tokens:
            states, mask = batch.extra.pop(f"{modality}.tokens"), batch.extra.pop(f"{modality}.token_mask").bool()
            if not mask.any(dim=1).all():
                raise VlmcacheError(f"{self.cache.path}: split {self.split!r} has {modality[:-1]} rows with an empty "
                                    f"token mask; run vlmcache verify {self.cache.path} and re-extract")
            setattr(batch, modality, Tokens(states.float(), mask))
        return batch


def _positions(held: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Where each of `wanted` sits in `held` (distinct row numbers; every wanted one is held)."""
    order = np.argsort(held, kind="stable")
    return order[np.searchsorted(held[order], wanted)]


def _rechunk(windows: Iterator[tuple[dict, np.ndarray | None]], size: int, steps: int) -> Iterator[Batch]:
    """Cut a sequence of windows (dicts of row-aligned arrays) into `steps` batches of `size` rows (the last
    may be short); a batch spanning two windows is joined from the tail of one and the head of the next."""
    pending: list[tuple[dict, np.ndarray | None]] = []
    held = 0
    for window in windows:
        pending.append(window)
        held += len(window[0]["images"])
        while held >= size and steps > 0:
            yield _batch(pending, size)
            held, steps = held - size, steps - 1
        if steps == 0:
            return
    if held and steps > 0:
        yield _batch(pending, held)


def _batch(pending: list, size: int) -> Batch:
    """Take the first `size` rows off the front of `pending` (mutated in place) as one Batch."""
    parts, taken = [], 0
    while taken < size:
        arrays, ids = pending[0]
        need = size - taken
        if len(arrays["images"]) <= need:
            parts.append(pending.pop(0))
            taken += len(arrays["images"])
        else:
            parts.append(({k: v[:need] for k, v in arrays.items()}, None if ids is None else ids[:need]))
            pending[0] = ({k: v[need:] for k, v in arrays.items()}, None if ids is None else ids[need:])
            taken = size
    joined = {k: np.concatenate([p[0][k] for p in parts]) if len(parts) > 1 else parts[0][0][k] for k in parts[0][0]}
    ids = None if parts[0][1] is None else torch.from_numpy(np.concatenate([p[1] for p in parts]))
    images, texts = (torch.from_numpy(np.ascontiguousarray(joined.pop(k))).float() for k in ("images", "texts"))
    return Batch(images, texts, ids, {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in joined.items()})


_DONE = object()


def _background(make: callable, depth: int) -> Iterator:
    """Run the iterator `make()` on a thread, `depth` items ahead. Its exceptions are raised here; closing the
    returned generator stops the thread (it is waited for, so no reader outlives its consumer)."""
    items: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in make():
                while not stop.is_set():
                    try:
                        items.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            items.put(_DONE)
        except BaseException as error:  # noqa: BLE001 -- handed to the consumer, which raises it
            items.put(error)

    thread = threading.Thread(target=produce, name="vlmcache-stream", daemon=True)
    thread.start()

    def consume():
        try:
            while True:
                item = items.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while thread.is_alive():  # unblock a producer waiting on a full queue
                with contextlib.suppress(queue.Empty):
                    items.get(timeout=0.05)
            thread.join()

    return consume()


# Memory planning for `train --max-memory`. A window is held about four times over while streaming (the
# shard blocks as read, joined, gathered in training order, and the next window read ahead).
STREAM_COPIES = 4
BASE_BYTES = 768 << 20  # Python, torch, the model and optimiser, the split's per-row metadata (measured ≈ 0.5-0.7 GB)


def feature_bytes(cache: FeatureCache, split: str, image_sets, text_sets, itemsize: int = 4) -> int:
    """Bytes of a split's image and text features at `itemsize` bytes per value (4: float32, as `train` holds them)."""
    counts = cache.manifest["dataset"]["splits"][split]
    return itemsize * (counts["images"] * sum(cache.set_dims("images", image_sets))
                       + counts["captions"] * sum(cache.set_dims("texts", text_sets)))


def token_bytes(cache: FeatureCache, split: str, image_sets, text_sets, tokens: tuple[str, ...]) -> int:
    """Bytes of a split's token states and masks in the stored dtype (kept so in memory, and so streamed) for
    the modalities in `tokens`, read from each modality's first set."""
    counts, total = cache.manifest["dataset"]["splits"][split], 0
    for modality in tokens:
        name = {"images": image_sets, "texts": text_sets}[modality]
        name = name[0] if name else None
        count, width = cache.token_shape(modality, name)
        itemsize = 2 if cache.feature_set(modality, name).provenance["dtype"] == "float16" else 4
        total += counts["images" if modality == "images" else "captions"] * count * (width * itemsize + 1)
    return total


def in_memory_bytes(cache: FeatureCache, splits: tuple[str, ...], image_sets, text_sets, tokens: tuple[str, ...] = ()) -> int:
    """Estimated peak memory of training with `splits` loaded: the base cost plus twice their float32 features
    (a split is read in the stored dtype and converted, so both copies exist for a moment) plus their token
    states in the stored dtype (turned into float32 a batch at a time)."""
    return BASE_BYTES + sum(2 * feature_bytes(cache, split, image_sets, text_sets)
                            + token_bytes(cache, split, image_sets, text_sets, tokens) for split in splits)


def stream_buffer(cache: FeatureCache, split: str, image_sets, text_sets, batch_size: int, wanted: int,
                  max_memory: int | None, tokens: tuple[str, ...] = ()) -> int:
    """Images per shuffle window: `wanted`, made smaller to fit `max_memory` bytes; too small for one batch is
    refused. One image row costs its features plus its captions' (at their average count) in the stored dtype,
    and their token states when `tokens` streams them."""
    if max_memory is None:
        return wanted
    counts = cache.manifest["dataset"]["splits"][split]
    itemsize = 2 if cache.provenance["images"]["dtype"] == "float16" else 4
    per_image = (feature_bytes(cache, split, image_sets, text_sets, itemsize)
                 + token_bytes(cache, split, image_sets, text_sets, tokens)) / max(1, counts["images"])
    fits = int((max_memory - BASE_BYTES) // (STREAM_COPIES * per_image))
    if fits < batch_size:
        need = BASE_BYTES + STREAM_COPIES * per_image * batch_size
        raise VlmcacheError(f"--max-memory {max_memory / 2**20:,.0f}MB: too small for one batch of {batch_size} pairs "
                            f"while streaming (needs at least {need / 2**20:,.0f}MB); raise it or lower --batch-size")
    return min(wanted, fits)


@torch.no_grad()
def embed_split(model, cache: FeatureCache, split: str, image_sets=None, text_sets=None, device="cpu",
                chunk: int = 65_536, tokens: tuple[str, ...] = ()) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """(image embeddings, text embeddings, caption → image row) of a split, reading `chunk` rows at a time: only
    the embeddings are kept, never the split's features. Skipped rows are dropped as `FeatureCache.split` does.
    The modalities in `tokens` go in as their token states (first set), `TOKEN_CHUNK` rows at a time."""
    model.eval()
    image_rows, caption_rows = cache.split_rows(split)
    embedded, valid = {}, {}
    for modality, rows, sets, embed in (("images", image_rows, image_sets, model.embed_images),
                                        ("texts", caption_rows, text_sets, model.embed_texts)):
        parts, flags = [], []
        step = TOKEN_CHUNK if modality in tokens else chunk
        for start in range(rows.start, rows.stop, step):
            part = slice(start, min(start + step, rows.stop))
            features, ok = cache._read_sets(modality, part, sets)
            if modality not in tokens:
                parts.append(embed(torch.from_numpy(features[ok]).to(device)).cpu())
            elif ok.any():
                states, mask = cache.read_tokens(modality, part, ok, sets[0] if sets else None)
                parts += [embed(token_batch(states, mask, np.arange(i, min(i + EMBED_BATCH, len(states))), device)).cpu()
                          for i in range(0, len(states), EMBED_BATCH)]
            flags.append(ok)
        embedded[modality] = torch.cat(parts) if parts else torch.zeros(0, 1)
        valid[modality] = np.concatenate(flags) if flags else np.zeros(0, bool)
    owner = np.asarray(cache.index_rows("caption_image", caption_rows), np.int64) - image_rows.start
    kept = valid["texts"][valid["texts"]] & valid["images"][owner[valid["texts"]]]  # captions of skipped images go too
    new_row = np.cumsum(valid["images"]) - 1
    return embedded["images"], embedded["texts"][torch.from_numpy(kept)], new_row[owner[valid["texts"]][kept]]
