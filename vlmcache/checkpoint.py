"""Checkpoints: safetensors tensors plus JSON metadata in the header (and a .json copy beside it).

Saving is atomic (see vlmcache.files). Loading never unpickles and never trusts the metadata alone: the
model is first built on PyTorch's "meta" device (no memory), its tensor shapes are compared with the
file's, and only then are the file's tensors put in place — a crafted header asking for a huge model,
or one that disagrees with its tensors, is refused in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from vlmcache import encoders
from vlmcache.config import MAX_WIDTH, TrainConfig, parse_sets
from vlmcache.errors import VlmcacheError
from vlmcache.files import atomic_write, write_json_atomic, write_text_atomic
from vlmcache.model import AlignmentModel
from vlmcache.store import FeatureCache, open_cache


def save_checkpoint(path: Path, meta: dict, model: nn.Module, optimizer=None, scheduler=None, generator=None) -> None:
    """Write a checkpoint atomically: tensors in safetensors, everything else as JSON in its metadata.

    With an optimiser (and its scheduler and sampling generator) the file also holds what `restore`
    needs to continue the run exactly: optimiser moments, scheduler state and both RNG states.
    """
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
    with atomic_write(path) as temporary:
        save_file(tensors, str(temporary), metadata=header)
    write_json_atomic(path.with_suffix(".json"), meta)


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, header) of a checkpoint file or run folder (its best checkpoint). Never unpickles."""
    path = Path(path)
    if path.is_dir():
        path = path / "best.safetensors"
    if not path.is_file():
        raise VlmcacheError(f"{path}: no checkpoint here; pass a run folder written by vlmcache train or a .safetensors file")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as handle:
            header = handle.metadata() or {}
        meta = json.loads(header["vlmcache"]) if "vlmcache" in header else None
    except (SafetensorError, OSError, ValueError) as error:
        raise VlmcacheError(f"{path}: not a readable safetensors checkpoint ({error})") from None
    if not isinstance(meta, dict):
        raise VlmcacheError(f"{path}: a safetensors file, but not a vlmcache checkpoint")
    return tensors, {**header, "vlmcache": meta, "path": str(path)}


def model_weights(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name[len("model."):]: value for name, value in tensors.items() if name.startswith("model.")}


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
    weights = model_weights(tensors)
    expected = {name: tuple(value.shape) for name, value in model.state_dict().items()}
    found = {name: tuple(value.shape) for name, value in weights.items()}
    if expected != found:
        differing = sorted(set(expected.items()) ^ set(found.items()))[:3]
        raise VlmcacheError(f"{path}: checkpoint metadata disagrees with its tensors ({differing}); the file was "
                            "altered or not written by vlmcache train")
    if not all(torch.isfinite(value).all() for value in weights.values()):
        raise VlmcacheError(f"{path}: checkpoint holds NaN or infinite weights (a diverged run); retrain with a lower --lr")
    model.load_state_dict(weights, assign=True)
    return model


def load_model(path: str | Path, device: str = "cpu") -> tuple[AlignmentModel, dict]:
    """Rebuild a trained AlignmentModel from a checkpoint; returns (model in eval mode, its metadata)."""
    tensors, header = read_checkpoint(path)
    model = build_checked(header["vlmcache"], tensors, header["path"])
    return model.to(device).eval(), header["vlmcache"]


def write_metrics_log(out: Path, history: list[dict]) -> None:
    """A run's metrics.jsonl rewritten whole from its checkpoint's history (atomic), so no kill loses a line."""
    write_text_atomic(out / "metrics.jsonl", "".join(json.dumps(record) + "\n" for record in history))


def finish_epoch(out: Path | None, meta: dict, state: dict, record: dict, metrics: dict, score_key: str,
                 patience: int | None, model: nn.Module, optimizer, scheduler, generator) -> None:
    """Book a finished epoch: its record in the history, `best` when `metrics[score_key]` improved (else one
    more epoch towards `patience`), then `last` with everything needed to resume, then metrics.jsonl.
    `out=None` keeps the books without writing (the ranks of a torchrun other than rank 0)."""
    state["history"].append(record)
    if metrics[score_key] > state["best_metrics"].get(score_key, -1.0):
        state.update(best_epoch=state["epoch"], best_metrics=metrics, bad_epochs=0)
        public = {key: state[key] for key in ("epoch", "best_epoch", "best_metrics", "history")}
        if out is not None:
            save_checkpoint(out / "best.safetensors", {**meta, **public}, model)
    else:
        state["bad_epochs"] += 1
        state["stopped_early"] = patience is not None and state["bad_epochs"] >= patience
    if out is None:
        return
    save_checkpoint(out / "last.safetensors", {**meta, **state}, model, optimizer, scheduler, generator)
    write_metrics_log(out, state["history"])


def restore(path: Path, meta: dict, model: nn.Module, optimizer, scheduler, generator) -> dict:
    """Load a `last` checkpoint into the live model, optimiser, scheduler and RNGs; returns the loop state."""
    tensors, header = read_checkpoint(path)
    saved = header["vlmcache"]
    for key in ("config", "fingerprint", "image_dim", "text_dim"):
        if saved.get(key) != meta[key]:
            raise VlmcacheError(f"{path}: was trained with a different {key} than requested now; resume with the "
                                "same cache and options, or start a new run with --overwrite or another --out")
    try:
        model.load_state_dict(model_weights(tensors))
        optim_state: dict = {"state": {}, "param_groups": json.loads(header["optimizer_groups"])}
        for name, value in tensors.items():
            if name.startswith("optim."):
                _, index, key = name.split(".", 2)
                optim_state["state"].setdefault(int(index), {})[key] = value
        optimizer.load_state_dict(optim_state)
        scheduler.load_state_dict({**json.loads(header["scheduler"]), "lr_lambdas": [None]})
        torch.set_rng_state(tensors["rng.torch"])
        generator.set_state(tensors["rng.sampler"])
        return {**{key: saved[key] for key in ("epoch", "best_epoch", "best_metrics", "bad_epochs", "history",
                                                "stopped_early")},
                "position": saved.get("position", 0), "loss_sum": saved.get("loss_sum", 0.0)}  # mid-epoch (streamed)
    except (KeyError, ValueError, RuntimeError) as error:
        raise VlmcacheError(f"{path}: cannot resume from this checkpoint ({str(error)[:200]}); "
                            "start again with --overwrite") from None


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
