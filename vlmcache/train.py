"""Train image and text projectors on cached features (never an image or a frozen encoder in the loop).

All features of a split sit in memory as one tensor. Each epoch visits every training image once with
one randomly drawn caption (default `sampling="image"`), so no two captions of one image meet in a
batch as false negatives; `sampling="caption"` visits every caption and masks same-image pairs instead.
Checkpoints are safetensors: `last` every epoch (with optimiser, scheduler and RNG state, so `resume`
continues exactly) and `best` by validation mean recall.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from vlmcache.errors import VlmcacheError
from vlmcache.evaluate import retrieval_metrics
from vlmcache.losses import LOSSES, build_loss
from vlmcache.projectors import PROJECTORS, build_projector, count_parameters
from vlmcache.store import FeatureCache, Split, check_same_dataset, open_cache

SCHEDULES = ("cosine", "onecycle", "constant")
SAMPLINGS = ("image", "caption")


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved with every checkpoint)."""

    projector: str = "mlp"
    loss: str = "infonce"
    dim: int = 256
    epochs: int = 20
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 50  # optimiser steps of linear warm-up
    schedule: str = "cosine"
    grad_clip: float = 1.0
    seed: int = 0
    sampling: str = "image"
    patience: int | None = None  # stop after this many epochs without a better validation mean recall
    mlp_hidden: int | None = None
    mlp_layers: int = 2
    dropout: float = 0.1
    residual: bool = False
    image_grid: tuple[int, int] | None = None  # NdLinear input grids (default: most square factorisation)
    text_grid: tuple[int, int] | None = None
    init_scale: float | None = None
    init_bias: float | None = None
    train_split: str = "train"
    val_split: str = "val"

    def __post_init__(self):
        for name, value, allowed in (("projector", self.projector, PROJECTORS), ("loss", self.loss, LOSSES),
                                     ("schedule", self.schedule, SCHEDULES), ("sampling", self.sampling, SAMPLINGS)):
            if value not in allowed:
                raise VlmcacheError(f"--{name} {value}: use one of {', '.join(allowed)}")
        if self.epochs < 1 or self.batch_size < 2 or self.dim < 1 or self.lr <= 0:
            raise VlmcacheError("--epochs and --dim must be ≥ 1, --batch-size ≥ 2, --lr > 0")
        for name in ("image_grid", "text_grid"):
            if getattr(self, name) is not None:
                setattr(self, name, tuple(getattr(self, name)))

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})


class AlignmentModel(nn.Module):
    """The trainable part: an image projector, a text projector and the loss's temperature (and bias)."""

    def __init__(self, config: TrainConfig, image_dim: int, text_dim: int):
        super().__init__()
        common = {"hidden": config.mlp_hidden, "dropout": config.dropout, "residual": config.residual,
                  "layers": config.mlp_layers}
        try:
            self.image = build_projector(config.projector, image_dim, config.dim, in_grid=config.image_grid, **common)
            self.text = build_projector(config.projector, text_dim, config.dim, in_grid=config.text_grid, **common)
        except ValueError as error:
            raise VlmcacheError(f"--projector {config.projector}: {error}") from None
        self.loss = build_loss(config.loss, config.init_scale, config.init_bias)
        self.image_dim, self.text_dim = image_dim, text_dim

    def embed_images(self, features: torch.Tensor) -> torch.Tensor:
        """Cached image features -> unit vectors in the shared space."""
        return F.normalize(self.image(features), dim=-1)

    def embed_texts(self, features: torch.Tensor) -> torch.Tensor:
        """Cached text features -> unit vectors in the shared space."""
        return F.normalize(self.text(features), dim=-1)

    def projector_parameters(self) -> int:
        return count_parameters(self.image) + count_parameters(self.text)


def initial_model(config: TrainConfig, image_dim: int, text_dim: int) -> AlignmentModel:
    """The model a run with this config starts from (seeded), i.e. the 'untrained projector' baseline."""
    torch.manual_seed(config.seed)
    return AlignmentModel(config, image_dim, text_dim)


@torch.no_grad()
def evaluate_model(model: AlignmentModel, split: Split, device: str | torch.device = "cpu") -> dict[str, float]:
    """Retrieval metrics of a model on a split of cached features."""
    model.eval()
    images, texts, owner = split.torch(device)
    return retrieval_metrics(model.embed_images(images), model.embed_texts(texts), owner)


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


def _schedule(config: TrainConfig, total_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if config.schedule == "constant":
            return 1.0
        if config.schedule == "onecycle":  # linear up over the first 30%, cosine down to 0
            peak = max(1, int(0.3 * total_steps))
            return step / peak if step < peak else 0.5 * (1 + math.cos(math.pi * (step - peak) / max(1, total_steps - peak)))
        if step < config.warmup:
            return (step + 1) / config.warmup
        progress = (step - config.warmup) / max(1, total_steps - config.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def load_features(cache: FeatureCache, split: str, text_cache: FeatureCache | None = None) -> Split:
    """A split of `cache`, its text features taken from `text_cache` when given (same dataset only)."""
    loaded = cache.split(split)
    if text_cache is not None:
        check_same_dataset(cache, text_cache)
        texts = text_cache.split(split)
        if texts.caption_image.tolist() != loaded.caption_image.tolist():
            raise VlmcacheError(f"{cache.path} and {text_cache.path}: skipped different items; re-extract both")
        loaded.text_features = texts.text_features
    return loaded


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
    cache = cache if isinstance(cache, FeatureCache) else open_cache(cache)
    text_source = None if text_cache is None else text_cache if isinstance(text_cache, FeatureCache) else open_cache(text_cache)
    train_split = load_features(cache, config.train_split, text_source)
    val_split = load_features(cache, config.val_split, text_source)
    if len(train_split.image_features) < 2 or len(train_split.text_features) < 2:
        raise VlmcacheError(f"{cache.path}: split {config.train_split!r} has fewer than 2 usable image–caption pairs")
    image_dim = train_split.image_features.shape[1]
    text_dim = train_split.text_features.shape[1]
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise VlmcacheError(f"--out {out}: is a file; pass a folder for the run")
    if (out / "last.safetensors").exists() and not (resume or overwrite):
        raise VlmcacheError(f"{out}: already holds a run; pass --resume to continue it or --overwrite to start again")
    out.mkdir(parents=True, exist_ok=True)

    torch_device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                "cpu" if device == "auto" else device)
    model = initial_model(config, image_dim, text_dim).to(torch_device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(train_split.image_features if config.sampling == "image"
                                    else train_split.text_features) / config.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config, steps_per_epoch * config.epochs))
    generator = torch.Generator().manual_seed(config.seed)
    meta = {"config": _config_json(config), "cache": str(cache.path.resolve()),
            "text_cache": None if text_source is None else str(text_source.path.resolve()),
            "fingerprint": cache.fingerprint, "image_dim": image_dim, "text_dim": text_dim,
            "image_encoder": cache.provenance["images"]["encoder"],
            "text_encoder": (text_source or cache).provenance["texts"]["encoder"],
            "parameters": model.projector_parameters()}
    state = {"epoch": 0, "best_epoch": 0, "best_metrics": {}, "bad_epochs": 0, "history": [], "stopped_early": False}
    if resume and (out / "last.safetensors").exists():
        state = _restore(out / "last.safetensors", meta, model, optimizer, scheduler, generator)
    elif overwrite:
        (out / "metrics.jsonl").unlink(missing_ok=True)

    images, texts, owner = train_split.torch(torch_device)
    starts, counts = _caption_ranges(train_split, torch_device)
    while state["epoch"] < config.epochs and not state["stopped_early"]:
        epoch_started = time.perf_counter()
        model.train()
        total, batches = 0.0, 0
        for image_index, caption_index, ids in _batches(config, len(images), len(texts), owner, starts, counts,
                                                        generator, torch_device):
            loss = model.loss(model.image(images[image_index]), model.text(texts[caption_index]), ids)
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
        state["history"].append(record)
        if metrics["mean_recall"] > state["best_metrics"].get("mean_recall", -1.0):
            state.update(best_epoch=state["epoch"], best_metrics=metrics, bad_epochs=0)
            _save(out / "best.safetensors", {**meta, **_public(state)}, model)
        else:
            state["bad_epochs"] += 1
            state["stopped_early"] = config.patience is not None and state["bad_epochs"] >= config.patience
        _save(out / "last.safetensors", {**meta, **state}, model, optimizer, scheduler, generator)
        with open(out / "metrics.jsonl", "a") as log:
            log.write(json.dumps(record) + "\n")
        if on_epoch is not None:
            on_epoch(record)
    return TrainResult(out, config, state["best_epoch"], state["best_metrics"], state["history"],
                       meta["parameters"], time.perf_counter() - started)


def _config_json(config: TrainConfig) -> dict:
    return json.loads(json.dumps(asdict(config)))


def _public(state: dict) -> dict:
    return {key: state[key] for key in ("epoch", "best_epoch", "best_metrics", "history")}


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


def _save(path: Path, meta: dict, model: nn.Module, optimizer=None, scheduler=None, generator=None) -> None:
    """Write a checkpoint atomically: tensors in safetensors, everything else as JSON in its metadata."""
    # clone: tied weights (e.g. a tuned GPT-2's embedding and output layer) share memory, which safetensors refuses
    tensors = {f"model.{name}": value.detach().cpu().clone() for name, value in model.state_dict().items()}
    header = {"vlmcache": json.dumps(meta)}
    if optimizer is not None:
        optim_state = optimizer.state_dict()
        for index, values in optim_state["state"].items():
            for name, value in values.items():
                tensors[f"optim.{index}.{name}"] = value.detach().cpu().contiguous()
        header["optimizer_groups"] = json.dumps(optim_state["param_groups"])
        header["scheduler"] = json.dumps({k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"})
        tensors["rng.torch"] = torch.get_rng_state()
        tensors["rng.sampler"] = generator.get_state()
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(temporary), metadata=header)
    os.replace(temporary, path)
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2))


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a checkpoint file or run folder (its best checkpoint). Never unpickles."""
    path = Path(path)
    if path.is_dir():
        path = path / "best.safetensors"
    if not path.exists():
        raise VlmcacheError(f"{path}: no checkpoint here; pass a run folder written by vlmcache train or a .safetensors file")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as handle:
            header = handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise VlmcacheError(f"{path}: not a readable safetensors checkpoint ({error})") from None
    if "vlmcache" not in header:
        raise VlmcacheError(f"{path}: a safetensors file, but not a vlmcache checkpoint")
    return tensors, {**header, "vlmcache": json.loads(header["vlmcache"])}


def load_model(path: str | Path, device: str = "cpu") -> tuple[AlignmentModel, dict]:
    """Rebuild a trained AlignmentModel from a checkpoint; returns (model in eval mode, its metadata)."""
    tensors, header = read_checkpoint(path)
    meta = header["vlmcache"]
    model = AlignmentModel(TrainConfig.from_dict(meta["config"]), meta["image_dim"], meta["text_dim"])
    _load_weights(model, tensors)
    return model.to(device).eval(), meta


def _load_weights(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load the `model.*` tensors of a checkpoint into `model`."""
    model.load_state_dict({name[len("model."):]: value for name, value in tensors.items() if name.startswith("model.")})


def _restore(path: Path, meta: dict, model, optimizer, scheduler, generator) -> dict:
    tensors, header = read_checkpoint(path)
    saved = header["vlmcache"]
    for key in ("config", "fingerprint", "image_dim", "text_dim"):
        if saved.get(key) != meta[key]:
            raise VlmcacheError(f"{path}: was trained with a different {key} than requested now; resume with the "
                                "same cache and options, or start a new run with --overwrite or another --out")
    _load_weights(model, tensors)
    optim_state: dict = {"state": {}, "param_groups": json.loads(header["optimizer_groups"])}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            optim_state["state"].setdefault(int(index), {})[key] = value
    optimizer.load_state_dict(optim_state)
    scheduler.load_state_dict({**json.loads(header["scheduler"]), "lr_lambdas": [None]})
    torch.set_rng_state(tensors["rng.torch"])
    generator.set_state(tensors["rng.sampler"])
    return {key: saved[key] for key in ("epoch", "best_epoch", "best_metrics", "bad_epochs", "history", "stopped_early")}
