"""A captioning run's configuration (saved with every checkpoint)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from vlmcache.align.config import IMAGE_FEATURES_HELP
from vlmcache.cache.layout import parse_sets
from vlmcache.errors import VlmcacheError
from vlmcache.options import check_options, option, option_like
from vlmcache.run.options import OptimConfig

CAPTION_PROJECTORS = ("linear", "mlp", "resampler")
MAX_BEAM = 64  # captions kept per image while decoding; wider only costs time


@dataclass
class CaptionConfig(OptimConfig):
    """Everything that defines a captioning run (saved with every checkpoint); the optimiser, schedule, patience
    (by validation CIDEr), seed and splits are OptimConfig's fields."""

    decoder: str = option("small", "'small' (trained from scratch) or a Hugging Face causal LM name or folder.")
    projector: str = option("mlp", "linear | mlp (pooled features) | resampler (the cache's tokens; extract --tokens)",
                            choices=CAPTION_PROJECTORS)
    image_features: str | None = option(None, IMAGE_FEATURES_HELP)
    prefix_tokens: int = option(4, "K: image prefix vectors fed to the decoder.", low=1, high=256)
    tune_lm: bool | None = option(None, "Train the language model too [default: small decoder trained, a pretrained "
                                  "LM frozen]", flag="--tune-lm/--freeze-lm")
    layers: int = option(3, "Small decoder: transformer blocks.", low=1, high=64)
    width: int = option(256, "Small decoder: model width.", low=1, high=8192)
    heads: int = option(4, "Small decoder and resampler: attention heads (must divide --width).", low=1, high=256)
    dropout: float = option(0.1, "Decoder dropout.", low=0.0, high=0.99)
    min_count: int = option(5, "Words seen fewer times in the training captions become <unk>.", low=1, high=1 << 20)
    max_words: int = option(32, "Longer training captions are cut (Flickr8k: 99.9% are shorter).", low=1, high=1024)
    resampler_depth: int = option(2, "Resampler: blocks of cross-attention + feed-forward.", low=1, high=64)
    max_length: int = option(20, "Decoding: most tokens generated per caption.", low=1, high=1024)
    # OptimConfig's options (their ranges too) with a captioner's defaults: 4 epochs of batch 128 at lr 1.5e-3 is
    # the measured recipe that fits 15 CPU-minutes (docs/captioning.md)
    epochs: int = option_like(OptimConfig, "epochs", 4, help="Passes over all training captions.")
    batch_size: int = option_like(OptimConfig, "batch_size", 128, help="Captions per step (batches are length-bucketed).",
                                  low=1)
    lr: float = option_like(OptimConfig, "lr", 1.5e-3, help="AdamW peak learning rate (warm-up, then cosine).")
    weight_decay: float = option_like(OptimConfig, "weight_decay", 0.01)
    warmup: int = option_like(OptimConfig, "warmup", 200)

    def __post_init__(self):
        check_options(self)  # types, ranges and choices of every field, from its option() definition
        if self.decoder == "small" and self.tune_lm is False:
            raise VlmcacheError("--freeze-lm: the small decoder is trained from scratch; freeze only a pretrained "
                                "--decoder (a Hugging Face causal LM)")
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


@dataclass
class CaptionDecoding:
    """How a trained captioner writes captions: the option of `caption eval` and `caption IMAGE`, checked where
    the config is made, as CaptionConfig's are."""

    beam: int = option(5, "Beam width; 1 is greedy decoding.", low=1, high=MAX_BEAM)

    def __post_init__(self):
        check_options(self)
