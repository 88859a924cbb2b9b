"""A training run's configuration: one dataclass, validated once, readable from and written to TOML.

`vlmcache train --config run.toml` reads a file whose keys are TrainConfig fields (dashes or
underscores); options given on the command line override it. Each run saves its resolved config as
`<run>/config.toml`, so `vlmcache train CACHE --config runs/x/config.toml` repeats it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from vlmcache.cache.layout import parse_selection, parse_sets
from vlmcache.errors import VlmcacheError
from vlmcache.options import check_options, option, read_toml, toml_types, typed_values
from vlmcache.run.options import OptimConfig

# The projector and loss names (their modules import these; defined here so reading a config needs no torch).
PROJECTORS = ("linear", "mlp", "ndlinear", "cross-attention", "resampler")
TOKEN_PROJECTORS = ("cross-attention", "resampler")  # read token states only
TOKEN_CAPABLE = ("ndlinear", *TOKEN_PROJECTORS)  # can read token states (ndlinear with --tokens)
# Each pooled projector's size knobs: what `ablate --capacity` sets to match a parameter count, and what a table
# row's label shows for that projector only (vlmcache.align.capacity).
KNOBS = {"linear": ("rank",), "mlp": ("mlp_hidden",), "ndlinear": ("ndlinear_layers", "ndlinear_hidden")}
LOSSES = ("infonce", "sigmoid")
SAMPLINGS = ("image", "caption")
IMAGE_FEATURES_HELP = ("Image feature sets of the cache to train on, joined by '+' (concatenated), e.g. "
                       "efficientnet-lite0+efficientnet-lite2 [default: the default set; vlmcache info lists them]")
MAX_WIDTH = 65_536  # no projector here needs wider layers; a larger value is a typo or a crafted file
# An NdLinear hidden grid holds at most as many cells as the widest layer: its activations are a·b floats per pair
# (256 KB at 256x256; 64 MB per layer for a batch of 256), while its parameters grow only with a + b.
MAX_GRID_CELLS = MAX_WIDTH


def parse_grid(value) -> tuple[int, int]:
    """An NdLinear grid from '32x40' (command line, TOML) or a pair of integers (Python, a checkpoint)."""
    if isinstance(value, str):
        first, _, second = value.lower().partition("x")
        try:
            return int(first), int(second)
        except ValueError:
            raise VlmcacheError(f"grid {value!r}: write it as AxB, e.g. 32x40") from None
    if not isinstance(value, list | tuple) or len(value) != 2 or not all(
            isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_WIDTH for v in value):
        raise VlmcacheError(f"grid {value!r}: give two positive integers, e.g. 32x40")
    return tuple(value)


@dataclass
class TrainConfig(OptimConfig):
    """Everything that defines a training run (saved with every checkpoint). Each field is one option of
    `vlmcache train` (and a key of its --config file); see vlmcache.options. The optimiser, schedule, patience
    (by validation mean recall), seed and splits are OptimConfig's fields."""

    projector: str = option("mlp", "linear | mlp | ndlinear (pooled features) | cross-attention | resampler (token "
                            "states: extract --tokens)", choices=PROJECTORS)
    loss: str = option("infonce", "infonce (CLIP) | sigmoid (SigLIP)", choices=LOSSES)
    dim: int = option(256, "Shared embedding size.", low=1, high=MAX_WIDTH)
    sampling: str = option("image", "image: each step pairs every image with ONE random caption, so captions of one "
                           "image never meet as negatives; caption: every caption each epoch, same-image pairs masked "
                           "out of the loss.", choices=SAMPLINGS)
    mlp_hidden: int | None = option(None, "MLP hidden width [default: --dim]", low=1, high=MAX_WIDTH)
    mlp_layers: int = option(2, "MLP linear layers.", low=2, high=64)
    dropout: float = option(0.1, "MLP dropout; cross-attention: dropout of the attention weights.", low=0.0, high=0.99)
    residual: bool = option(False, "MLP: residual + LayerNorm head (OpenAI-CLIP tutorial).", flag="--residual")
    rank: int | None = option(None, "Linear: a rank-r bottleneck, Linear(in, r, no bias) -> Linear(r, --dim) "
                              "[default: one full Linear; 0 = the same]", low=0, high=MAX_WIDTH)
    ndlinear_layers: int = option(1, "NdLinear (pooled): stacked NdLinear layers, ReLU between (as the NdLinear "
                                  "README's MLP); 1 = one layer from the input grid to the output grid.", low=1, high=64)
    ndlinear_hidden: tuple[int, int] | None = option(None, "NdLinear (pooled) with --ndlinear-layers 2 or more: the "
                                                     f"hidden grid, e.g. 16x16, at most {MAX_GRID_CELLS:,} cells "
                                                     "[default: the output grid]", parse=parse_grid, cli_type=str)
    # NdLinear input grids (default: most square factorisation)
    image_grid: tuple[int, int] | None = option(None, "NdLinear grid for image features, e.g. 32x40 [default: most "
                                                "square]", parse=parse_grid, cli_type=str)
    text_grid: tuple[int, int] | None = option(None, "NdLinear grid for text features, e.g. 16x24.", parse=parse_grid,
                                               cli_type=str)
    init_scale: float | None = option(None, "Initial logit scale [default: the loss's].", cli=False)
    init_bias: float | None = option(None, "Initial logit bias of the sigmoid loss [default: the loss's].", cli=False)
    # Where the best epoch is chosen: a split, or N images carved out of the training split (vlmcache.cache.carve),
    # so that selection never happens on the split a table reports (Flickr8k has train and dev only).
    select_on: str | None = option(None, "Choose the best epoch on this split instead of --val-split, or on N images "
                                   "carved out of the training split (train:N; a fixed choice by image id, not trained "
                                   "on; default: --val-split)")
    # Feature sets of the cache, joined by '+' and concatenated in that order (None: the default set).
    image_features: str | None = option(None, IMAGE_FEATURES_HELP)
    text_features: str | None = option(None, "Text feature sets, joined by '+' [default: the default set]")
    # Per-set standardisation of the concatenated input: each set centred and scaled to unit RMS on the
    # training split, so no encoder dominates by its feature scale (docs: measured on Flickr8k).
    standardize: bool = option(False, "Centre each feature set and scale it to unit RMS (training-split statistics, "
                               "kept in the checkpoint).")
    # Streaming (vlmcache.cache.stream): read the training split a window of shards at a time instead of loading it.
    # `max_memory` ("4GB") turns streaming on when the splits' features would not fit, and bounds the window.
    stream: bool = option(False, "Stream the training split a window of shards at a time (background reads, exact "
                          "mid-epoch resume) instead of loading it; for splits larger than memory.", flag="--stream")
    max_memory: str | None = option(None, "Memory budget, e.g. 4GB: stream automatically when the splits' features "
                                    "would not fit, and size the shuffle window to fit.")
    stream_buffer: int = option(65_536, "Streaming: images per shuffle window (rows mix only within a window).",
                                low=1, high=1 << 40)
    # Token-level projectors (extract --tokens). `tokens`: the image side reads the cache's token states
    # (always for cross-attention and resampler; ndlinear then works over the (tokens, channels) axes).
    # `text_tokens`: the text side reads token states too; off by default, since MiniLM's mean pooling is
    # what it was trained to produce for sentences (docs: both measured).
    tokens: bool = option(False, "Image side reads the cache's token states (always for cross-attention and "
                          "resampler; ndlinear then maps the (tokens, channels) axes).")
    text_tokens: bool = option(False, "Text side reads token states too (with a token projector) instead of the "
                               "pooled sentence features.")
    queries: int = option(1, "Cross-attention: learned queries (averaged); resampler: latents.", low=1, high=1024)
    heads: int = option(4, "Attention heads of cross-attention and resampler (must divide --dim).", low=1, high=256)
    resampler_depth: int = option(2, "Resampler: blocks of cross-attention + feed-forward.", low=1, high=64)
    positions: bool = option(False, "Cross-attention: a learned score bias per head and token position.")

    def __post_init__(self):
        check_options(self)  # types, ranges and choices of every field, from its option() definition
        if self.projector in TOKEN_PROJECTORS:
            self.tokens = True
        for option_name, wanted in (("tokens", self.tokens), ("text-tokens", self.text_tokens)):
            if wanted and self.projector not in TOKEN_CAPABLE:
                raise VlmcacheError(f"--{option_name}: --projector {self.projector} reads pooled features; use one of "
                                    f"{', '.join(TOKEN_CAPABLE)}")
        for option_name, wanted, sets in (("image-features", self.tokens, self.image_sets),
                                          ("text-features", self.text_tokens, self.text_sets)):
            if wanted and sets and len(sets) > 1:
                raise VlmcacheError(f"--{option_name} {'+'.join(sets)}: token projectors read the tokens of one "
                                    "feature set; name one")
        if self.standardize and (self.tokens or self.text_tokens):
            raise VlmcacheError("--standardize works on pooled features only; leave it off for token projectors")
        if self.rank == 0:  # the same plain Linear as None: one spelling, so both give one ablation cell key
            self.rank = None
        if self.ndlinear_hidden is not None and math.prod(self.ndlinear_hidden) > MAX_GRID_CELLS:
            raise VlmcacheError(f"--ndlinear-hidden {'x'.join(map(str, self.ndlinear_hidden))}: "
                                f"{math.prod(self.ndlinear_hidden):,} cells; at most {MAX_GRID_CELLS:,}")
        if self.max_memory is not None:
            parse_size(self.max_memory, "--max-memory")
        if self.select_on is not None:
            name, count = parse_selection(self.select_on)
            if (count is None) == (name == self.train_split):
                raise VlmcacheError(f"--select-on {self.select_on}: " + (
                    f"carve from the training split ({self.train_split}:N), or name a whole split" if count else
                    f"is the training split; carve part of it instead ({self.train_split}:1000)"))
        for name in ("init_scale", "init_bias"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise VlmcacheError(f"{name} {value}: must be a finite number")
        for name in ("image_features", "text_features"):
            names = parse_sets(getattr(self, name))
            setattr(self, name, None if names is None else "+".join(names))

    @property
    def image_sets(self) -> tuple[str, ...] | None:
        """The image feature sets as a tuple of names (None: the cache's default set)."""
        return parse_sets(self.image_features)

    @property
    def text_sets(self) -> tuple[str, ...] | None:
        return parse_sets(self.text_features)

    @property
    def selection(self) -> tuple[str, int | None]:
        """(split the best epoch is chosen on, images carved out of it or None for the whole split)."""
        return parse_selection(self.select_on) if self.select_on else (self.val_split, None)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """A config from a dict (checkpoint metadata, a TOML file); unknown keys are ignored."""
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{key: value for key, value in values.items() if key in known})
        except TypeError as error:
            raise VlmcacheError(f"training config: {error}") from None

    def to_dict(self) -> dict:
        """Plain JSON/TOML types (tuples become lists)."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}


_UNITS = {"": 1, "B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}


def parse_size(value: str | int, option: str) -> int:
    """'4GB', '512MB', '1.5G', 1000000 -> bytes (powers of 1024)."""
    text = str(value).strip().upper().replace("IB", "B")
    number = text.rstrip("KMGTB")
    unit = text[len(number):]
    unit = unit if unit.endswith("B") or not unit else unit + "B"
    try:
        size = float(number) * _UNITS[unit]
    except (ValueError, KeyError):
        raise VlmcacheError(f"{option} {value}: give a size such as 4GB, 512MB or 1.5G") from None
    if not math.isfinite(size) or size <= 0:
        raise VlmcacheError(f"{option} {value}: must be a positive size such as 4GB")
    return int(size)


def read_config_file(path: str | Path, extra: dict[str, tuple] | None = None, what: str = "vlmcache train") -> dict:
    """The keys of a TOML config file (dashes turned into underscores), each checked against the type of its
    TrainConfig option (or of `extra`'s {key: (type, parser)}): unknown keys and wrong types are refused."""
    return typed_values(path, read_toml(path), {**toml_types(TrainConfig), **(extra or {})}, what)


def to_toml(values: dict) -> str:
    """A flat dict of str/int/float/bool/list values as TOML (None values are left out: TOML has no null)."""
    lines = []
    for key, value in values.items():
        if value is not None:
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'
