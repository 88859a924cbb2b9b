"""How a cache names its feature sets and their folders: pure string rules, importable without h5py or torch
(the command line and a config file need them before any cache is opened)."""

from __future__ import annotations

from pathlib import Path

from vlmcache.errors import VlmcacheError

MODALITIES = ("images", "texts")


def set_name(model: str) -> str:
    """The feature-set name of an encoder: its name, or a folder's last part, made safe as a folder name."""
    name = Path(model).name if Path(model).is_dir() else model
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name) or "set"


def layer_set_name(model: str, layer: str | None) -> str:
    """The feature-set name of an encoder read at a layer: NAME:LAYER (efficientnet-lite0:block5, minilm:l4);
    the final output (None) keeps the encoder's own name, so caches without layers read as before."""
    return set_name(model) if layer is None else f"{set_name(model)}:{layer}"


def set_folder(modality: str, name: str, default: bool) -> str:
    """`images`/`texts` for the default set, `images@NAME`/`texts@NAME` for the others."""
    return modality if default else f"{modality}@{name}"


def parse_sets(value: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...] | None:
    """'a+b' (or a list of names) -> ('a', 'b'); None or '' -> None (the default set)."""
    if value is None or value == "":
        return None
    names = tuple(part.strip() for part in (value.split("+") if isinstance(value, str) else value))
    if not all(names) or len(set(names)) != len(names):
        raise VlmcacheError(f"feature sets {value!r}: give distinct set names joined by '+', e.g. "
                            "efficientnet-lite0+efficientnet-lite2")
    return names


def parse_selection(value: str) -> tuple[str, int | None]:
    """'train:1000' -> ('train', 1000): 1000 images carved out of split train; 'val' -> ('val', None): a whole split."""
    name, carve, count = value.strip().partition(":")
    if not name or (carve and not count.strip().isdigit()) or (carve and int(count) < 1):
        raise VlmcacheError(f"--select-on {value}: give a split name (e.g. val) or SPLIT:N to carve N images out of "
                            "the training split (e.g. train:1000)")
    return name.strip(), int(count) if carve else None
