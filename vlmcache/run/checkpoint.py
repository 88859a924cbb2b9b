"""Checkpoints: safetensors tensors plus JSON metadata in the header (and a .json copy beside it); a `last`
checkpoint also holds the optimiser, scheduler and RNG states a resumed run restores, and a run's metrics log.

Saving is atomic and seals the file with the SHA-256 of its content, checked on every read (see
vlmcache.files); checkpoints written before that are read unchecked. Reading never unpickles, and the
metadata's types are checked before any of it is used; vlmcache.align.load builds a model from what is read.
"""

from __future__ import annotations

import json
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from vlmcache.cache.store import ENCODER
from vlmcache.errors import VlmcacheError
from vlmcache.files import (
    read_safetensors,
    shape_error,
    write_json_atomic,
    write_sealed_safetensors,
    write_text_atomic,
)
from vlmcache.run.loop import LoopState, Optimisation
from vlmcache.run.tracking import TRACKING_KEYS

# What every checkpoint's metadata holds (vlmcache.files.shape_error); each kind adds its own keys
# (vlmcache.align.load, vlmcache.caption.model).
META = {"config": dict, "cache": str, "fingerprint": str, "image_dim": int, "image_encoder": ENCODER,
        "image_encoders?": [ENCODER]}
HINT = "pass a run folder or .safetensors file written by vlmcache train (or train again)"
KINDS = {"alignment": "vlmcache train", "captioner": "vlmcache caption train"}  # a checkpoint's kind: who writes it


def save_checkpoint(path: Path, meta: dict, model: nn.Module, optimisation: Optimisation | None = None) -> None:
    """Write a checkpoint atomically: tensors in safetensors, everything else as JSON in its metadata.

    With an `optimisation` the file also holds what `restore` needs to continue the run exactly: optimiser
    moments, scheduler state and both RNG states.
    """
    # clone: tied weights (e.g. a tuned GPT-2's embedding and output layer) share memory, which safetensors refuses
    tensors = {f"model.{name}": value.detach().cpu().clone() for name, value in model.state_dict().items()}
    header = {"vlmcache": json.dumps(meta)}
    if optimisation is not None:
        optim_state = optimisation.optimizer.state_dict()
        for index, values in optim_state["state"].items():
            for name, value in values.items():
                tensors[f"optim.{index}.{name}"] = value.detach().cpu().contiguous()
        header["optimizer_groups"] = json.dumps(optim_state["param_groups"])
        header["scheduler"] = json.dumps({k: v for k, v in optimisation.scheduler.state_dict().items()
                                          if k != "lr_lambdas"})
        tensors["rng.torch"] = torch.get_rng_state()
        tensors["rng.sampler"] = optimisation.generator.get_state()
    write_sealed_safetensors(path, safetensors.torch.save(tensors, metadata=header))
    write_json_atomic(path.with_suffix(".json"), meta)


def read_checkpoint(path: str | Path, kind: str | None = None,
                    shape: dict | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, header) of a checkpoint file or run folder (its best checkpoint). Never unpickles.

    Refused in one line naming the file: not a safetensors file, cut short, content that differs from its seal,
    a checkpoint of another `kind` than asked for (None: any), or metadata without the keys every checkpoint
    has (META) and those of `shape` (the kind's own), or with values of other types."""
    path = Path(path)
    if path.is_dir():
        path = path / "best.safetensors"
    if not path.is_file():
        raise VlmcacheError(f"{path}: no checkpoint here; pass a run folder written by vlmcache train or a .safetensors file")
    tensors, header = read_safetensors(path, "safetensors checkpoint", HINT, load=safetensors.torch.load)
    try:
        meta = json.loads(header["vlmcache"]) if "vlmcache" in header else None
    except (ValueError, RecursionError) as error:
        raise VlmcacheError(f"{path}: checkpoint metadata is not JSON ({error}); {HINT}") from None
    if not isinstance(meta, dict):
        raise VlmcacheError(f"{path}: a safetensors file, but not a vlmcache checkpoint")
    found = meta.get("kind", "alignment")
    if kind is not None and found != kind:
        raise VlmcacheError(f"{path}: not {'an' if kind[0] in 'aeiou' else 'a'} {kind} checkpoint (it was written by "
                            f"{KINDS.get(found, 'another program')}); train one with {KINDS[kind]} CACHE --out RUN")
    if why := shape_error(meta, {**META, **(shape or {})}):
        raise VlmcacheError(f"{path}: checkpoint metadata is not valid ({why}); {HINT}")
    return tensors, {**header, "vlmcache": meta, "path": str(path)}


def model_weights(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name[len("model."):]: value for name, value in tensors.items() if name.startswith("model.")}


def load_checked(model: nn.Module, weights: dict[str, torch.Tensor], path: str | Path, assign: bool = False) -> None:
    """Put a checkpoint's weights in `model` once they are exactly its tensors, by name and shape, and finite; a
    checkpoint whose metadata describes another model than its tensors is refused in one line naming it.
    `assign=True` puts the tensors themselves in place (a model built on the meta device has no memory to copy
    into); otherwise they are copied, which keeps tied weights tied."""
    expected = {name: tuple(value.shape) for name, value in model.state_dict().items()}
    found = {name: tuple(value.shape) for name, value in weights.items()}
    if expected != found:
        differing = sorted(set(expected.items()) ^ set(found.items()))[:3]
        raise VlmcacheError(f"{path}: checkpoint metadata disagrees with its tensors ({differing}); the file was "
                            "altered or not written by vlmcache")
    if not all(torch.isfinite(value).all() for value in weights.values() if value.is_floating_point()):
        raise VlmcacheError(f"{path}: checkpoint holds NaN or infinite weights (a diverged run); retrain with a lower --lr")
    model.load_state_dict(weights, assign=assign)


def write_metrics_log(out: Path, history: list[dict]) -> None:
    """A run's metrics.jsonl rewritten whole from its checkpoint's history (atomic), so no kill loses a line."""
    write_text_atomic(out / "metrics.jsonl", "".join(json.dumps(record) + "\n" for record in history))


def _without_tracking(value):
    """A config without the tracking options: resuming may add --log (and checkpoints older than it lack the keys)."""
    return {k: v for k, v in value.items() if k not in TRACKING_KEYS} if isinstance(value, dict) else value


def restore(path: Path, meta: dict, optimisation: Optimisation) -> LoopState:
    """Load a `last` checkpoint into the live model, optimiser, scheduler and RNGs; returns the loop state."""
    tensors, header = read_checkpoint(path)
    saved = header["vlmcache"]
    for key in ("config", "fingerprint", "image_dim", "text_dim"):
        if _without_tracking(saved.get(key)) != _without_tracking(meta[key]):
            raise VlmcacheError(f"{path}: was trained with a different {key} than requested now; resume with the "
                                "same cache and options, or start a new run with --overwrite or another --out")
    try:
        state = LoopState.from_meta(saved)
        optimisation.model.load_state_dict(model_weights(tensors))
        optim_state: dict = {"state": {}, "param_groups": json.loads(header["optimizer_groups"])}
        for name, value in tensors.items():
            if name.startswith("optim."):
                _, index, key = name.split(".", 2)
                optim_state["state"].setdefault(int(index), {})[key] = value
        optimisation.optimizer.load_state_dict(optim_state)
        optimisation.scheduler.load_state_dict({**json.loads(header["scheduler"]), "lr_lambdas": [None]})
        torch.set_rng_state(tensors["rng.torch"])
        optimisation.generator.set_state(tensors["rng.sampler"])
        return state
    except (KeyError, ValueError, TypeError, RuntimeError, RecursionError) as error:
        raise VlmcacheError(f"{path}: cannot resume from this checkpoint ({str(error)[:200]}); "
                            "start again with --overwrite") from None
