"""Train image and text projectors on cached features (never an image or a frozen encoder in the loop).

All features of a split sit in memory as one tensor. Each epoch visits every training image once with
one randomly drawn caption (default `sampling="image"`), so no two captions of one image meet in a
batch as false negatives; `sampling="caption"` visits every caption and masks same-image pairs instead.
Checkpoints are safetensors: `last` every epoch (with optimiser, scheduler and RNG state, so `resume`
continues exactly) and `best` by validation mean recall. A run folder is locked while a run writes it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlmcache import __version__
from vlmcache.checkpoint import feature_set_meta, finish_epoch, restore, write_metrics_log
from vlmcache.config import TrainConfig, to_toml
from vlmcache.encoders import pick_device
from vlmcache.errors import VlmcacheError
from vlmcache.evaluate import evaluate_model
from vlmcache.files import FolderLock, remove_stale_temporaries, write_text_atomic
from vlmcache.model import initial_model
from vlmcache.store import FeatureCache, Split, load_features, open_cache
from vlmcache.tokens import batch_inputs, input_shape, token_options


@dataclass
class TrainResult:
    """A finished (or early-stopped) run: where it is, its best epoch and metrics, and its history."""

    out: Path
    config: TrainConfig
    best_epoch: int
    best_metrics: dict
    history: list[dict] = field(default_factory=list)
    parameters: int = 0
    seconds: float = 0.0


def lr_factor(config: TrainConfig, step: int, total_steps: int) -> float:
    """The learning-rate multiplier at optimiser step `step` (0-based) of `total_steps`."""
    if config.schedule == "constant":
        return 1.0
    if config.schedule == "onecycle":  # linear up over the first 30%, cosine down to 0
        peak = max(1, int(0.3 * total_steps))
        return step / peak if step < peak else 0.5 * (1 + math.cos(math.pi * (step - peak) / max(1, total_steps - peak)))
    if step < config.warmup:
        return (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, total_steps - config.warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


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
) -> TrainResult:
    """Train projectors on a cache and write checkpoints to `out`; returns the run's result.

    `on_epoch(record)` is called after each epoch with its metrics (the CLI prints a live table from
    it). `resume=True` continues the run in `out` exactly where its last checkpoint left it.
    """
    started = time.perf_counter()
    config = config or TrainConfig()
    torch_device = pick_device(device)
    cache = cache if isinstance(cache, FeatureCache) else open_cache(cache)
    text_source = None if text_cache is None else text_cache if isinstance(text_cache, FeatureCache) else open_cache(text_cache)
    sets = {"image_sets": config.image_sets, "text_sets": config.text_sets, **token_options(config)}
    train_split = load_features(cache, config.train_split, text_source, **sets)
    val_split = load_features(cache, config.val_split, text_source, **sets)
    if len(train_split.image_features) < 2 or len(train_split.text_features) < 2:
        raise VlmcacheError(f"{cache.path}: split {config.train_split!r} has fewer than 2 usable image–caption pairs")
    (image_dim, image_tokens), (text_dim, text_tokens) = input_shape(train_split, "image"), input_shape(train_split, "text")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise VlmcacheError(f"--out {out}: is a file; pass a folder for the run")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise VlmcacheError(f"--out {out}: cannot create it ({error.strerror})") from None
    with FolderLock(out, "train run"):
        remove_stale_temporaries(out)
        if (out / "last.safetensors").exists() and not (resume or overwrite):
            raise VlmcacheError(f"{out}: already holds a run; pass --resume to continue it or --overwrite to start again")
        model = initial_model(config, image_dim, text_dim, image_tokens, text_tokens)
        if config.standardize:
            model.fit_standardization(*train_split.torch()[:2], cache.set_dims("images", config.image_sets),
                                      (text_source or cache).set_dims("texts", config.text_sets))
        model = model.to(torch_device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        steps_per_epoch = math.ceil(len(train_split.image_features if config.sampling == "image"
                                        else train_split.text_features) / config.batch_size)
        total_steps = steps_per_epoch * config.epochs
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(config, step, total_steps))
        generator = torch.Generator().manual_seed(config.seed)
        meta = {"config": config.to_dict(), "cache": str(cache.path.resolve()),
                "text_cache": None if text_source is None else str(text_source.path.resolve()),
                "fingerprint": cache.fingerprint, "image_dim": image_dim, "text_dim": text_dim,
                "image_tokens": image_tokens, "text_tokens": text_tokens,
                **feature_set_meta(cache, text_source or cache, config),
                "parameters": model.projector_parameters(), "vlmcache_version": __version__}
        state = {"epoch": 0, "best_epoch": 0, "best_metrics": {}, "bad_epochs": 0, "history": [], "stopped_early": False}
        if resume and (out / "last.safetensors").exists():
            state = restore(out / "last.safetensors", meta, model, optimizer, scheduler, generator)
        write_text_atomic(out / "config.toml", to_toml({"cache": meta["cache"], "text_cache": meta["text_cache"],
                                                        **config.to_dict()}))
        write_metrics_log(out, state["history"])  # the log always matches the checkpoint, even after a kill

        images, texts, owner = train_split.torch(torch_device)
        starts, counts = _caption_ranges(train_split, torch_device)
        while state["epoch"] < config.epochs and not state["stopped_early"]:
            epoch_started = time.perf_counter()
            model.train()
            total, batches = 0.0, 0
            for image_index, caption_index, ids in _batches(config, len(images), len(texts), owner, starts, counts,
                                                            generator, torch_device):
                loss = model.loss(model.project_images(batch_inputs(train_split, "image", image_index, images)),
                                  model.project_texts(batch_inputs(train_split, "text", caption_index, texts)), ids)
                if not torch.isfinite(loss):
                    raise VlmcacheError(f"epoch {state['epoch'] + 1}, step {batches + 1}: the loss is {float(loss)} "
                                        f"(training diverged); lower --lr (now {config.lr:g}). The last good "
                                        f"checkpoints in {out} are kept")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                optimizer.step()
                scheduler.step()
                model.loss.clamp_()
                total, batches = total + float(loss.detach()), batches + 1
            state["epoch"] += 1
            train_seconds = time.perf_counter() - epoch_started
            metrics = evaluate_model(model, val_split, torch_device)
            record = {"epoch": state["epoch"], "train_loss": total / max(1, batches), "logit_scale": model.loss.scale(),
                      "lr": optimizer.param_groups[0]["lr"], **{f"val_{k}": v for k, v in metrics.items()},
                      "train_seconds": train_seconds, "seconds": time.perf_counter() - epoch_started}
            finish_epoch(out, meta, state, record, metrics, "mean_recall", config.patience, model, optimizer, scheduler,
                         generator)
            if on_epoch is not None:
                on_epoch(record)
    return TrainResult(out, config, state["best_epoch"], state["best_metrics"], state["history"],
                       meta["parameters"], time.perf_counter() - started)


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
