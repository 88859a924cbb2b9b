"""Training a captioner on a cache: every training caption once per epoch in length-bucketed batches (captions
of one length together, so almost no position is padding), teacher forcing and cross-entropy on the caption
words and end token, through the shared run machinery (vlmcache.run): `last` every epoch with optimiser,
scheduler and RNG state (so `resume` ends with the same weights), `best` by validation CIDEr (greedy)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from vlmcache.align.load import set_encoders
from vlmcache.align.projectors import count_parameters
from vlmcache.cache.store import FeatureCache, open_cache
from vlmcache.caption.config import CaptionConfig
from vlmcache.caption.data import CaptionBatches, CaptionData, load_split
from vlmcache.caption.decode import generate
from vlmcache.caption.model import Captioner, initial_captioner
from vlmcache.caption.vocab import build_vocabulary
from vlmcache.run.epochs import Run, run_epochs
from vlmcache.run.folder import open_run_folder
from vlmcache.run.loop import Optimisation, RunResult
from vlmcache.run.tracking import Tracking, check_tracking


@dataclass
class CaptionResult(RunResult):
    """A finished captioning run: where it is, its best epoch and validation metrics, its history."""

    config: CaptionConfig


def validate(model: Captioner, data: CaptionData, beam: int = 1, meteor: bool = False) -> dict:
    """Caption metrics of a model's captions for every image of a split."""
    from vlmcache.metrics.captions import score_captions

    return score_captions(generate(model, data.images, beam), data.references(), meteor=meteor)


def train_captioner(
    cache: str | Path | FeatureCache,
    out: str | Path,
    config: CaptionConfig | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    device: str = "auto",
    on_epoch: Callable[[dict], None] | None = None,
    tracking: Tracking | None = None,
) -> CaptionResult:
    """Train a captioner on a cache's training captions; checkpoints and metrics.jsonl go to `out`. The trackers
    of `config.log` record the run (`tracking`: which plots, and where when not beside it)."""
    started = time.perf_counter()
    config = config or CaptionConfig()
    check_tracking(config.log, config.log_uri)
    cache = cache if isinstance(cache, FeatureCache) else open_cache(cache)
    tokens = config.projector == "resampler"
    train_data = load_split(cache, config.train_split, tokens, config.image_sets)
    val_data = load_split(cache, config.val_split, tokens, config.image_sets)
    torch_device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                "cpu" if device == "auto" else device)
    with open_run_folder(out, "caption run", resume=resume, overwrite=overwrite) as folder:
        vocabulary = build_vocabulary(train_data.captions, config.min_count) if config.decoder == "small" else None
        image_dim = train_data.images.shape[-1]
        token_count = train_data.images.shape[1] if tokens else 0
        model = initial_captioner(config, image_dim, vocabulary, token_count).to(torch_device)
        trainable = model.trainable()
        batches = CaptionBatches.of(train_data, model.decoder, config.max_words, config.batch_size)
        optimisation = Optimisation.start(config, trainable, batches.steps_per_epoch() * config.epochs,
                                          torch.Generator().manual_seed(config.seed),
                                          [p for p in trainable.parameters() if p.requires_grad])
        image_encoders = set_encoders(cache, "images", config.image_sets)
        meta = {"kind": "captioner", "config": json.loads(json.dumps(asdict(config))),
                "cache": str(cache.path.resolve()), "fingerprint": cache.fingerprint, "image_dim": image_dim,
                "text_dim": None, "token_count": token_count, "vocabulary": vocabulary,
                "image_encoder": image_encoders[0], "image_encoders": image_encoders,
                "parameters": count_parameters(trainable)}
        run = Run.start(folder, meta, optimisation, "cider", config.patience)
        run_epochs(run, config.epochs, lambda: _train_epoch(run, model, batches, torch_device),
                   lambda: validate(model, val_data), on_epoch=on_epoch, tracking=Tracking.of(config, tracking))
    return run.result(CaptionResult, config, started)


def _train_epoch(run: Run, model: Captioner, batches: CaptionBatches, device: torch.device) -> None:
    """One pass over every training caption, teacher-forced."""
    model.train()
    if not model.config.trains_lm:
        model.decoder.eval()  # a frozen LM runs as at inference (no dropout)
    for images, ids, lengths in batches.epoch(run.optimisation.generator):
        run.step(model.loss(images.to(device).float(), ids.to(device), lengths.to(device)))
