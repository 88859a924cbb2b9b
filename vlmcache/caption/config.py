"""A captioning run's configuration (saved with every checkpoint)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from vlmcache.cache.store import parse_sets
from vlmcache.errors import VlmcacheError
from vlmcache.run.options import OptimConfig

CAPTION_PROJECTORS = ("linear", "mlp", "resampler")


@dataclass
class CaptionConfig(OptimConfig):
    """Everything that defines a captioning run (saved with every checkpoint); the optimiser, schedule, patience
    (by validation CIDEr), seed and splits are OptimConfig's fields."""

    decoder: str = "small"  # "small", or a Hugging Face causal LM name or folder
    projector: str = "mlp"
    image_features: str | None = None  # image feature sets joined by '+' (concatenated); None: the default set
    prefix_tokens: int = 4
    tune_lm: bool | None = None  # None: train the small decoder, freeze a pretrained one
    layers: int = 3  # small decoder
    width: int = 256
    heads: int = 4
    dropout: float = 0.1
    min_count: int = 5  # words seen fewer times in the training captions become <unk>
    max_words: int = 32  # longer training captions are cut (Flickr8k: 99.9% are shorter)
    resampler_depth: int = 2
    max_length: int = 20  # decoding: most tokens generated per caption
    # OptimConfig's fields with a captioner's defaults: 4 epochs of batch 128 at lr 1.5e-3 is the measured
    # recipe that fits 15 CPU-minutes (README)
    epochs: int = 4
    batch_size: int = 128
    lr: float = 1.5e-3
    weight_decay: float = 0.01
    warmup: int = 200

    def __post_init__(self):
        if self.projector not in CAPTION_PROJECTORS:
            raise VlmcacheError(f"--projector {self.projector}: use one of {', '.join(CAPTION_PROJECTORS)}")
        if self.decoder == "small" and self.tune_lm is False:
            raise VlmcacheError("--freeze-lm: the small decoder is trained from scratch; freeze only a pretrained "
                                "--decoder (a Hugging Face causal LM)")
        if min(self.epochs, self.prefix_tokens, self.layers, self.width, self.max_length) < 1 or self.batch_size < 1 \
                or self.lr <= 0:
            raise VlmcacheError("--epochs, --prefix-tokens, --batch-size and the decoder sizes must be ≥ 1, --lr > 0")
        if self.width % self.heads:
            raise VlmcacheError(f"width {self.width} is not divisible by {self.heads} heads")
        self.image_features = None if self.image_sets is None else "+".join(self.image_sets)
        if self.projector == "resampler" and self.image_sets and len(self.image_sets) > 1:
            raise VlmcacheError(f"--image-features {self.image_features}: the resampler reads the tokens of one "
                                "feature set; name one")

    @property
    def image_sets(self) -> tuple[str, ...] | None:
        """The image feature sets as a tuple of names (None: the cache's default set)."""
        return parse_sets(self.image_features)

    @property
    def trains_lm(self) -> bool:
        return self.decoder == "small" or bool(self.tune_lm)

    @classmethod
    def from_dict(cls, values: dict) -> CaptionConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})
