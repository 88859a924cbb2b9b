"""A training run's configuration: one dataclass, validated once, readable from and written to TOML.

`vlmcache train --config run.toml` reads a file whose keys are TrainConfig fields (dashes or
underscores); options given on the command line override it. Each run saves its resolved config as
`<run>/config.toml`, so `vlmcache train CACHE --config runs/x/config.toml` repeats it.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from vlmcache.align.losses import LOSSES
from vlmcache.align.projectors import PROJECTORS, TOKEN_CAPABLE, TOKEN_PROJECTORS
from vlmcache.cache.store import parse_sets
from vlmcache.errors import VlmcacheError
from vlmcache.run.options import OptimConfig

SCHEDULES = ("cosine", "onecycle", "constant")
SAMPLINGS = ("image", "caption")
MAX_WIDTH = 65_536  # no projector here needs wider layers; a larger value is a typo or a crafted file


@dataclass
class TrainConfig(OptimConfig):
    """Everything that defines a training run (saved with every checkpoint); the optimiser, schedule, patience
    (by validation mean recall), seed and splits are OptimConfig's fields."""

    projector: str = "mlp"
    loss: str = "infonce"
    dim: int = 256
    sampling: str = "image"
    mlp_hidden: int | None = None
    mlp_layers: int = 2
    dropout: float = 0.1
    residual: bool = False
    image_grid: tuple[int, int] | None = None  # NdLinear input grids (default: most square factorisation)
    text_grid: tuple[int, int] | None = None
    init_scale: float | None = None
    init_bias: float | None = None
    # Feature sets of the cache, joined by '+' and concatenated in that order (None: the default set).
    image_features: str | None = None
    text_features: str | None = None
    # Per-set standardisation of the concatenated input: each set centred and scaled to unit RMS on the
    # training split, so no encoder dominates by its feature scale (README: measured on Flickr8k).
    standardize: bool = False
    # Streaming (vlmcache.cache.stream): read the training split a window of shards at a time instead of loading it.
    # `max_memory` ("4GB") turns streaming on when the splits' features would not fit, and bounds the window.
    stream: bool = False
    max_memory: str | None = None
    stream_buffer: int = 65_536  # images per shuffle window
    # Token-level projectors (extract --tokens). `tokens`: the image side reads the cache's token states
    # (always for cross-attention and resampler; ndlinear then works over the (tokens, channels) axes).
    # `text_tokens`: the text side reads token states too; off by default, since MiniLM's mean pooling is
    # what it was trained to produce for sentences (README: both measured).
    tokens: bool = False
    text_tokens: bool = False
    queries: int = 1  # cross-attention queries / resampler latents
    heads: int = 4
    resampler_depth: int = 2
    positions: bool = False  # cross-attention: a learned score bias per head and token position

    def __post_init__(self):
        for name, value, allowed in (("projector", self.projector, PROJECTORS), ("loss", self.loss, LOSSES),
                                     ("schedule", self.schedule, SCHEDULES), ("sampling", self.sampling, SAMPLINGS)):
            if value not in allowed:
                raise VlmcacheError(f"--{name} {value}: use one of {', '.join(allowed)}")
        if self.projector in TOKEN_PROJECTORS:
            self.tokens = True
        for option, wanted in (("tokens", self.tokens), ("text-tokens", self.text_tokens)):
            if wanted and self.projector not in TOKEN_CAPABLE:
                raise VlmcacheError(f"--{option}: --projector {self.projector} reads pooled features; use one of "
                                    f"{', '.join(TOKEN_CAPABLE)}")
        for option, wanted, sets in (("image-features", self.tokens, self.image_sets),
                                     ("text-features", self.text_tokens, self.text_sets)):
            if wanted and sets and len(sets) > 1:
                raise VlmcacheError(f"--{option} {'+'.join(sets)}: token projectors read the tokens of one feature "
                                    "set; name one")
        if self.standardize and (self.tokens or self.text_tokens):
            raise VlmcacheError("--standardize works on pooled features only; leave it off for token projectors")
        _check_range("queries", self.queries, 1, 1024)
        _check_range("heads", self.heads, 1, 256)
        _check_range("resampler-depth", self.resampler_depth, 1, 64)
        _check_range("epochs", self.epochs, 1, 100_000)
        _check_range("batch-size", self.batch_size, 2, 1 << 20)
        _check_range("dim", self.dim, 1, MAX_WIDTH)
        _check_range("mlp-layers", self.mlp_layers, 2, 64)
        _check_range("warmup", self.warmup, 0, 1 << 30)
        _check_range("seed", self.seed, -(1 << 63), (1 << 63) - 1)  # what torch.manual_seed accepts
        _check_range("stream-buffer", self.stream_buffer, 1, 1 << 40)
        if self.max_memory is not None:
            parse_size(self.max_memory, "--max-memory")
        if self.mlp_hidden is not None:
            _check_range("mlp-hidden", self.mlp_hidden, 1, MAX_WIDTH)
        if self.patience is not None:
            _check_range("patience", self.patience, 1, 100_000)
        _check_range("lr", self.lr, 0.0, 10.0, open_low=True)
        _check_range("weight-decay", self.weight_decay, 0.0, 100.0)
        _check_range("dropout", self.dropout, 0.0, 0.99)
        _check_range("grad-clip", self.grad_clip, 0.0, 1e6)
        for name in ("init_scale", "init_bias"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise VlmcacheError(f"{name} {value}: must be a finite number")
        for name in ("image_features", "text_features"):
            names = parse_sets(getattr(self, name))
            setattr(self, name, None if names is None else "+".join(names))
        for name in ("image_grid", "text_grid"):
            grid = getattr(self, name)
            if grid is not None:
                grid = tuple(grid)
                if len(grid) != 2 or not all(isinstance(v, int) and 1 <= v <= MAX_WIDTH for v in grid):
                    raise VlmcacheError(f"--{name.replace('_', '-')} {grid}: give two positive integers, e.g. 32x40")
                setattr(self, name, grid)

    @property
    def image_sets(self) -> tuple[str, ...] | None:
        """The image feature sets as a tuple of names (None: the cache's default set)."""
        return parse_sets(self.image_features)

    @property
    def text_sets(self) -> tuple[str, ...] | None:
        return parse_sets(self.text_features)

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


def _check_range(option: str, value, low, high, open_low: bool = False) -> None:
    """Refuse a value of the wrong type (integer bounds ask for an integer), a non-finite one, or one out of range."""
    integer = isinstance(low, int) and isinstance(high, int)
    if isinstance(value, bool) or not isinstance(value, int if integer else int | float):
        raise VlmcacheError(f"--{option} {value!r}: must be {'an integer' if integer else 'a number'}")
    if not math.isfinite(value) or value < low or value > high or (open_low and value == low):
        bound = f"> {low}" if open_low else f"≥ {low}"
        raise VlmcacheError(f"--{option} {value}: must be a finite number {bound} and ≤ {high}")


def read_config_file(path: str | Path) -> dict:
    """The keys of a TOML config file, dashes turned into underscores."""
    path = Path(path)
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VlmcacheError(f"--config {path}: file not found") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise VlmcacheError(f"--config {path}: not a readable TOML file ({error})") from None
    return {key.replace("-", "_"): value for key, value in values.items()}


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
