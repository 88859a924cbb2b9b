"""A trained alignment model from its checkpoint, checked against its metadata, and the caches it belongs to.

Loading never unpickles and never trusts the metadata alone: the model is first built on PyTorch's
"meta" device (no memory), its tensor shapes are compared with the file's, and only then are the file's
tensors put in place — a crafted header asking for a huge model, or one that disagrees with its tensors,
is refused in one line.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlmcache.align.config import MAX_WIDTH, TrainConfig, parse_sets
from vlmcache.align.model import AlignmentModel
from vlmcache.cache.store import ENCODER, FeatureCache, open_cache
from vlmcache.encode import encoders
from vlmcache.errors import VlmcacheError
from vlmcache.run.checkpoint import load_checked, model_weights, read_checkpoint

# What an alignment checkpoint's metadata holds beside what every checkpoint has (vlmcache.run.checkpoint.META).
ALIGNMENT_META = {"text_dim": int, "text_encoder": ENCODER, "text_encoders?": [ENCODER], "text_cache?": str,
                  "image_tokens?": int, "text_tokens?": int}


def build_checked(meta: dict, tensors: dict[str, torch.Tensor], path: str) -> AlignmentModel:
    """The AlignmentModel the metadata describes, holding the file's tensors, after checking they agree."""
    try:
        config = TrainConfig.from_dict(meta["config"])
        image_dim, text_dim = int(meta["image_dim"]), int(meta["text_dim"])
        counts = [None if meta.get(key) is None else int(meta[key]) for key in ("image_tokens", "text_tokens")]
    except (KeyError, TypeError, ValueError, VlmcacheError) as error:
        raise VlmcacheError(f"{path}: checkpoint metadata is not valid ({error}); use a file written by vlmcache train") from None
    if not (1 <= image_dim <= MAX_WIDTH and 1 <= text_dim <= MAX_WIDTH):
        raise VlmcacheError(f"{path}: checkpoint metadata asks for {image_dim}/{text_dim}-d features; not a valid checkpoint")
    if not all(count is None or 1 <= count <= MAX_WIDTH for count in counts):
        raise VlmcacheError(f"{path}: checkpoint metadata asks for {counts} tokens; not a valid checkpoint")
    with torch.device("meta"):  # shapes only: nothing is allocated however large the header says it is
        model = AlignmentModel(config, image_dim, text_dim, *counts)
    load_checked(model, model_weights(tensors), path, assign=True)
    return model


def load_model(path: str | Path, device: str = "cpu") -> tuple[AlignmentModel, dict]:
    """Rebuild a trained AlignmentModel from a checkpoint; returns (model in eval mode, its metadata)."""
    tensors, header = read_checkpoint(path, "alignment", ALIGNMENT_META)
    model = build_checked(header["vlmcache"], tensors, header["path"])
    return model.to(device).eval(), header["vlmcache"]


def set_encoders(cache: FeatureCache, modality: str, names: tuple[str, ...] | None) -> list[dict]:
    """The encoder provenance of each named feature set (None: the default set), in order."""
    return [cache.feature_set(modality, name).provenance["encoder"] for name in names or (None,)]


def feature_set_meta(cache: FeatureCache, text_cache: FeatureCache, config: TrainConfig) -> dict:
    """What a checkpoint records of its inputs: the encoder of every feature set it reads, in order.

    `image_encoder`/`text_encoder` (the first set's) stay for readers that know one encoder per side."""
    image_encoders, text_encoders = set_encoders(cache, "images", config.image_sets), set_encoders(
        text_cache, "texts", config.text_sets)
    return {"image_encoder": image_encoders[0], "text_encoder": text_encoders[0],
            "image_encoders": image_encoders, "text_encoders": text_encoders}


def checkpoint_sets(meta: dict) -> tuple[tuple[str, ...] | None, tuple[str, ...] | None]:
    """(image feature sets, text feature sets) a checkpoint was trained on (None: the default set).

    Read from the config dict itself: a captioner's config is not a TrainConfig."""
    return parse_sets(meta["config"].get("image_features")), parse_sets(meta["config"].get("text_features"))


def check_encoders_match(meta: dict, cache: FeatureCache, modalities=("images", "texts")) -> None:
    """Refuse a cache whose features come from other encoders than the checkpoint was trained on."""
    for modality, key, names in zip(("images", "texts"), ("image_encoder", "text_encoder"), checkpoint_sets(meta),
                                    strict=True):
        if modality not in modalities:
            continue
        for name, expected in zip(names or (None,), meta.get(f"{key}s") or [meta[key]], strict=True):
            actual = cache.feature_set(modality, name).provenance["encoder"]
            if actual != expected:
                raise VlmcacheError(f"{cache.path}: its {modality} features come from {encoders.describe(actual)}, "
                                    f"but the checkpoint was trained on {encoders.describe(expected)}; use a cache "
                                    "made with the same encoders")


def checkpoint_caches(meta: dict, cache: str | Path | None = None) -> tuple[FeatureCache, FeatureCache | None]:
    """(image cache, text cache or None) to use a checkpoint on: the ones it was trained on, or `cache`.

    Text features come from the run's `--text-cache` when it had one (and no other cache is asked for),
    so the encoder checks compare each modality with the cache it is actually read from.
    """
    opened = open_cache(cache or meta["cache"])
    if cache is None and opened.fingerprint != meta["fingerprint"]:
        raise VlmcacheError(f"{opened.path}: changed since the checkpoint was trained (dataset fingerprint differs)")
    text_cache = open_cache(meta["text_cache"]) if meta.get("text_cache") and cache is None else None
    check_encoders_match(meta, opened, modalities=("images",) if text_cache else ("images", "texts"))
    if text_cache is not None:
        check_encoders_match(meta, text_cache, modalities=("texts",))
    return opened, text_cache

