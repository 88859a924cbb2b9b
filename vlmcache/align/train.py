"""Train image and text projectors on cached features (never an image or a frozen encoder in the loop).

By default all features of a split sit in memory as one tensor; with `stream` (or when they would pass
`max_memory`, or under torchrun) the split is streamed a window of shards at a time (vlmcache.cache.stream),
validation embeds the val split chunk by chunk, and `last` is also saved every CHECKPOINT_STEPS steps
with the stream position, so `resume` continues mid-epoch exactly. Under torchrun each rank streams its
part of the shards and the loss is taken over the global batch (vlmcache.distributed); rank 0 writes.

Each epoch visits every training image once with one randomly drawn caption (default
`sampling="image"`), so no two captions of one image meet in a batch as false negatives;
`sampling="caption"` visits every caption and masks same-image pairs instead.
Checkpoints are safetensors: `last` every epoch (with optimiser, scheduler and RNG state, so `resume`
continues exactly) and `best` by validation mean recall. A run folder is locked while a run writes it.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from vlmcache import __version__, distributed
from vlmcache.align.config import TrainConfig, parse_size, to_toml
from vlmcache.align.inputs import batch_inputs, evaluate_model, input_shape, token_options, token_sides
from vlmcache.align.load import feature_set_meta
from vlmcache.align.model import AlignmentModel, initial_model
from vlmcache.cache.carve import carve
from vlmcache.cache.store import FeatureCache, Split, load_features, open_cache
from vlmcache.cache.stream import Batch, ShardStream, embed_split, in_memory_bytes, stream_buffer
from vlmcache.encode.encoders import pick_device
from vlmcache.errors import VlmcacheError
from vlmcache.files import write_text_atomic
from vlmcache.metrics.retrieval import retrieval_metrics
from vlmcache.run.epochs import Run, run_epochs
from vlmcache.run.folder import open_run_folder
from vlmcache.run.loop import Optimisation, RunResult
from vlmcache.run.tracking import Tracking, check_tracking

CHECKPOINT_STEPS = 1000  # a streamed epoch also saves `last` every this many steps (resume continues mid-epoch)


# Streamed token windows' budget when --max-memory is not given. Measured on Flickr8k (README): 1.5 GiB windows
# (~1,500 images) train at 93% of in-memory speed; one 3 GiB window of the whole split at 57% (no read-ahead).
TOKEN_STREAM_MEMORY = 3 << 29


@dataclass
class TrainResult(RunResult):
    """A finished (or early-stopped) projector run: where it is, its best epoch and metrics, and its history."""

    config: TrainConfig


def train(
    cache: str | Path | FeatureCache,
    out: str | Path,
    config: TrainConfig | None = None,
    *,
    text_cache: str | Path | FeatureCache | None = None,
    resume: bool = False,
    overwrite: bool = False,
    device: str = "cpu",
    on_epoch: Callable[[dict], None] | None = None,
    tracking: Tracking | None = None,
) -> TrainResult:
    """Train projectors on a cache and write checkpoints to `out`; returns the run's result.

    `on_epoch(record)` is called after each epoch with its metrics (the CLI prints a live table from
    it). `resume=True` continues the run in `out` exactly where its last checkpoint left it. The trackers of
    `config.log` record the run; `tracking` says where when not beside it (an ablation cell) and which plots.
    """
    started = time.perf_counter()
    config = config or TrainConfig()
    check_tracking(config.log, config.log_uri)
    torch_device = pick_device(device)
    rank, world, torch_device = distributed.setup(torch_device)
    cache = cache if isinstance(cache, FeatureCache) else open_cache(cache)
    text_source = None if text_cache is None else text_cache if isinstance(text_cache, FeatureCache) else open_cache(text_cache)
    distributed.check_same_inputs({"fingerprint": cache.fingerprint, "config": config.to_dict(),
                                   "shards": {f"{m}:{n}": [s.get("sha256") for s in cache.feature_set(m, n).shards]
                                              for m, names in (("images", config.image_sets), ("texts", config.text_sets))
                                              for n in names or (None,)}}, world)
    generator = torch.Generator().manual_seed(config.seed)
    source, val_split = _training_data(cache, text_source, config, rank, world, generator, torch_device)
    if isinstance(source, InMemoryBatches):
        (image_dim, image_tokens), (text_dim, text_tokens) = (input_shape(source.split, side) for side in ("image", "text"))
    else:
        image_dim, text_dim = sum(cache.set_dims("images", config.image_sets)), sum(
            (text_source or cache).set_dims("texts", config.text_sets))
        image_tokens, text_tokens = (source.token_shapes.get(modality, (None,))[0] for modality in ("images", "texts"))
    with open_run_folder(out, "train run", resume=resume, overwrite=overwrite, rank=rank, world=world) as folder:
        model = initial_model(config, image_dim, text_dim, image_tokens, text_tokens)
        if config.standardize:
            model.fit_standardization(*source.split.torch()[:2], cache.set_dims("images", config.image_sets),
                                      (text_source or cache).set_dims("texts", config.text_sets))
        model = model.to(torch_device)
        total_steps = sum(source.steps_per_epoch(epoch) for epoch in range(config.epochs))
        optimisation = Optimisation.start(config, model, total_steps, generator)
        meta = {"config": config.to_dict(), "cache": str(cache.path.resolve()),
                "text_cache": None if text_source is None else str(text_source.path.resolve()),
                "fingerprint": cache.fingerprint, "image_dim": image_dim, "text_dim": text_dim,
                "image_tokens": image_tokens, "text_tokens": text_tokens,
                **feature_set_meta(cache, text_source or cache, config),
                "parameters": model.projector_parameters(), "vlmcache_version": __version__,
                "streamed": None if isinstance(source, InMemoryBatches) else {"buffer": source.buffer, "ranks": world}}
        run = Run.start(folder, meta, optimisation, "mean_recall", config.patience)
        if folder.writes:  # after the restore, so a refused resume leaves the run's config.toml as it was
            write_text_atomic(folder.out / "config.toml", to_toml({"cache": meta["cache"], "text_cache": meta["text_cache"],
                                                                   **config.to_dict()}))
        run_epochs(run, config.epochs, lambda: _train_epoch(run, model, source, config.lr, world, torch_device),
                   lambda: _validate(model, cache, val_split, config, torch_device),
                   extras=lambda: {"logit_scale": model.loss.scale()}, on_epoch=on_epoch,
                   tracking=Tracking.of(config, tracking))
    distributed.finish(world)
    return run.result(TrainResult, config, started)


def _train_epoch(run: Run, model: AlignmentModel, source: InMemoryBatches | ShardStream, lr: float, world: int,
                 device) -> None:
    """The running epoch's steps, from its saved position when resumed mid-epoch; a streamed epoch also saves
    `last` every CHECKPOINT_STEPS steps. `lr` (the option) is named when the loss diverges."""
    state = run.state
    model.train()
    steps = source.steps_per_epoch(state.epoch)
    all_reduce = functools.partial(distributed.reduce_gradients, model, model.loss, world)
    for batch in source.epoch(state.epoch, state.position):
        loss = model.loss(distributed.gather(model.project_images(batch.images.to(device)), world),
                          distributed.gather(model.project_texts(batch.texts.to(device)), world),
                          None if batch.image_ids is None else distributed.gather(batch.image_ids, world))
        if not torch.isfinite(loss):
            raise VlmcacheError(f"epoch {state.epoch + 1}, step {state.position + 1}: the loss is {float(loss)} "
                                f"(training diverged); lower --lr (now {lr:g}). The last good "
                                f"checkpoints in {run.folder.out} are kept")
        run.step(loss, after_backward=all_reduce)
        model.loss.clamp_()
        if state.position % CHECKPOINT_STEPS == 0 and state.position < steps and source.resumable_mid_epoch:
            run.save_last()


def _validate(model: AlignmentModel, cache: FeatureCache, val_split: Split | None, config: TrainConfig,
              device) -> dict:
    """Retrieval metrics on the validation split: in memory, or embedded chunk by chunk when streaming."""
    if val_split is not None:
        return evaluate_model(model, val_split, device)
    return retrieval_metrics(*embed_split(model, cache, config.selection[0], config.image_sets, config.text_sets, device,
                                          tokens=token_sides(config)))


def _training_data(cache: FeatureCache, text_source: FeatureCache | None, config: TrainConfig, rank: int,
                   world: int, generator: torch.Generator, device) -> tuple[InMemoryBatches | ShardStream, Split | None]:
    """(the training batches, the validation split in memory or None when it is evaluated chunk by chunk).

    In memory unless `--stream`, several ranks, or an estimated in-memory peak above `--max-memory`."""
    max_memory = None if config.max_memory is None else parse_size(config.max_memory, "--max-memory")
    tokens = token_sides(config)
    streaming = config.stream or world > 1 or (max_memory is not None and text_source is None and max_memory < in_memory_bytes(
        cache, tuple(dict.fromkeys((config.train_split, config.selection[0]))), config.image_sets, config.text_sets, tokens))
    if not streaming:
        sets = {"image_sets": config.image_sets, "text_sets": config.text_sets, **token_options(config)}
        train_split = load_features(cache, config.train_split, text_source, **sets)
        selection, carved = config.selection
        # --select-on train:N: the best epoch is chosen on N training images, which are then not trained on.
        train_split, val_split = (carve(train_split, carved) if carved else
                                  (train_split, load_features(cache, selection, text_source, **sets)))
        if len(train_split.image_features) < 2 or len(train_split.text_features) < 2:
            raise VlmcacheError(f"{cache.path}: split {config.train_split!r} has fewer than 2 usable image–caption pairs")
        return InMemoryBatches(train_split, config, generator, device), val_split
    why = "--stream" if config.stream else "torchrun" if world > 1 else f"--max-memory {config.max_memory}"
    if text_source is not None or config.standardize:
        raise VlmcacheError(f"{why}: streaming does not support {'--text-cache' if text_source else '--standardize'} "
                            "yet; train in memory (drop the option) or on one cache without it")
    if config.batch_size % world:
        raise VlmcacheError(f"--batch-size {config.batch_size}: must be a multiple of the {world} ranks (the global "
                            "batch is split evenly between them)")
    if config.selection[1]:
        raise VlmcacheError(f"--select-on {config.select_on}: carving needs the training split in memory; drop {why} "
                            "or select on a whole split")
    cache.split_rows(config.selection[0])  # a missing val split is refused now, not after the first epoch
    local = config.batch_size // world
    # Token states are ~100x the pooled features: without --max-memory their windows are still held to a budget.
    budget = max_memory if max_memory is not None or not tokens else TOKEN_STREAM_MEMORY
    buffer = stream_buffer(cache, config.train_split, config.image_sets, config.text_sets, local, config.stream_buffer,
                           budget, tokens)
    stream = ShardStream(cache, config.train_split, local, config.seed, image_sets=config.image_sets,
                         text_sets=config.text_sets, sampling=config.sampling, buffer=buffer, rank=rank, world=world,
                         tokens=tokens)
    if stream.steps_per_epoch(0) < 1 or stream.rows_per_epoch(0) < 2:
        raise VlmcacheError(f"{cache.path}: split {config.train_split!r} has too few usable image–caption pairs for one "
                            f"batch of {local} per rank")
    return stream, None


class InMemoryBatches:
    """The whole training split in memory, shuffled each epoch by the run's generator (its state is in every
    checkpoint, so a run resumes at epoch boundaries exactly)."""

    resumable_mid_epoch = False

    def __init__(self, split: Split, config: TrainConfig, generator: torch.Generator, device):
        self.split, self.config, self.generator, self.device = split, config, generator, device
        self.images, self.texts, self.owner = split.torch(device)
        self.starts, self.counts = _caption_ranges(split, device)

    def steps_per_epoch(self, epoch: int = 0) -> int:
        return math.ceil(len(self.images if self.config.sampling == "image" else self.texts) / self.config.batch_size)

    def epoch(self, epoch: int, start: int = 0):
        """One epoch's batches (always from its start: in-memory checkpoints are written between epochs)."""
        for image_index, caption_index, ids in _batches(self.config, len(self.images), len(self.texts), self.owner,
                                                        self.starts, self.counts, self.generator, self.device):
            yield Batch(batch_inputs(self.split, "image", image_index, self.images),
                        batch_inputs(self.split, "text", caption_index, self.texts), ids)


def _caption_ranges(split: Split, device) -> tuple[torch.Tensor, torch.Tensor]:
    """First caption row and caption count of each image (captions of an image are contiguous)."""
    owner = torch.from_numpy(split.caption_image)
    counts = torch.bincount(owner, minlength=len(split.image_features))
    starts = torch.cumsum(counts, 0) - counts
    return starts.to(device), counts.to(device)


def _batches(config: TrainConfig, n_images: int, n_texts: int, owner, starts, counts, generator, device):
    """Yield (image rows, caption rows, image ids for masking or None) for one epoch."""
    if config.sampling == "image":
        order = torch.randperm(n_images, generator=generator)
        order = order[counts.cpu()[order] > 0]  # an image whose captions were all skipped cannot be paired
        draws = torch.rand(len(order), generator=generator)
        chosen = (starts.cpu()[order] + (draws * counts.cpu()[order]).long()).to(device)
        order = order.to(device)
        for begin in range(0, len(order), config.batch_size):
            yield order[begin:begin + config.batch_size], chosen[begin:begin + config.batch_size], None
    else:
        order = torch.randperm(n_texts, generator=generator).to(device)
        for begin in range(0, n_texts, config.batch_size):
            captions = order[begin:begin + config.batch_size]
            yield owner[captions], captions, owner[captions]

