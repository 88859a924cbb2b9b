"""The trainable model: an image projector, a text projector and the loss that owns the temperature.

Each side reads either pooled features (B, dim) or token states: a `Tokens` batch (B, T, dim) with its
mask, when the config asks for tokens on that side (`tokens`, `text_tokens`) and the model was built
with that side's token count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmcache.align.config import TrainConfig
from vlmcache.align.losses import build_loss
from vlmcache.align.projectors import build_projector, count_parameters
from vlmcache.cache.tokens import Tokens
from vlmcache.errors import VlmcacheError


def side_projector(config: TrainConfig, tokens: int | None) -> str:
    """The projector of one side: the config's, except that the pooled side of a token model (token images,
    pooled text: the default for token projectors) is `linear`, the best pooled projector on Flickr8k."""
    if tokens is None and (config.tokens or config.text_tokens):
        return "linear"
    return config.projector


class AlignmentModel(nn.Module):
    """The trainable part: an image projector, a text projector and the loss's temperature (and bias)."""

    def __init__(self, config: TrainConfig, image_dim: int, text_dim: int, image_tokens: int | None = None,
                 text_tokens: int | None = None):
        super().__init__()
        common = {"hidden": config.mlp_hidden, "dropout": config.dropout, "residual": config.residual,
                  "layers": config.mlp_layers, "queries": config.queries, "heads": config.heads,
                  "depth": config.resampler_depth, "positions": config.positions, "rank": config.rank,
                  "hidden_grid": config.ndlinear_hidden, "nd_layers": config.ndlinear_layers}
        for option, wanted, count in (("--tokens", config.tokens, image_tokens),
                                      ("--text-tokens", config.text_tokens, text_tokens)):
            if wanted and not count:
                raise VlmcacheError(f"{option}: no token count for this side; re-extract the cache with --tokens")
        image_tokens = image_tokens if config.tokens else None
        text_tokens = text_tokens if config.text_tokens else None
        try:
            self.image = build_projector(side_projector(config, image_tokens), image_dim, config.dim, image_tokens,
                                         in_grid=config.image_grid, **common)
            self.text = build_projector(side_projector(config, text_tokens), text_dim, config.dim, text_tokens,
                                        in_grid=config.text_grid, **common)
        except ValueError as error:
            raise VlmcacheError(f"--projector {config.projector}: {error}") from None
        self.loss = build_loss(config.loss, config.init_scale, config.init_bias)
        self.image_dim, self.text_dim = image_dim, text_dim
        self.image_tokens, self.text_tokens = image_tokens, text_tokens
        self.standardize = config.standardize
        if config.standardize:  # set from the training split by `fit_standardization`; saved with the weights
            for side, dim in (("image", image_dim), ("text", text_dim)):
                self.register_buffer(f"{side}_shift", torch.zeros(dim))
                self.register_buffer(f"{side}_scale", torch.ones(dim))

    def project_images(self, features: torch.Tensor | Tokens) -> torch.Tensor:
        """Cached image features -> the projector's output (standardised first when the config asks)."""
        return self._project("image", features)

    def project_texts(self, features: torch.Tensor | Tokens) -> torch.Tensor:
        return self._project("text", features)

    def _project(self, side: str, features: torch.Tensor | Tokens) -> torch.Tensor:
        projector = getattr(self, side)
        if isinstance(features, Tokens):  # token states are never standardised (refused in TrainConfig)
            return projector(features.states, features.mask)
        if self.standardize:
            features = (features - getattr(self, f"{side}_shift")) * getattr(self, f"{side}_scale")
        return projector(features)

    def embed_images(self, features: torch.Tensor | Tokens) -> torch.Tensor:
        """Cached image features -> unit vectors in the shared space."""
        return F.normalize(self.project_images(features), dim=-1)

    def embed_texts(self, features: torch.Tensor | Tokens) -> torch.Tensor:
        """Cached text features -> unit vectors in the shared space."""
        return F.normalize(self.project_texts(features), dim=-1)

    @torch.no_grad()
    def fit_standardization(self, images: torch.Tensor, texts: torch.Tensor, image_dims: tuple[int, ...],
                            text_dims: tuple[int, ...]) -> None:
        """Per feature set: shift by its training mean, scale by one number so its centred RMS is 1."""
        for side, features, dims in (("image", images, image_dims), ("text", texts, text_dims)):
            shift, scale = getattr(self, f"{side}_shift"), getattr(self, f"{side}_scale")
            start = 0
            for dim in dims:
                block = features[:, start:start + dim].float()
                shift[start:start + dim] = block.mean(dim=0)
                rms = (block - block.mean(dim=0)).pow(2).mean().sqrt()
                scale[start:start + dim] = 1.0 / rms.clamp(min=1e-6)
                start += dim

    def projector_parameters(self) -> int:
        """Trainable parameters of the two projectors (the loss's one or two scalars not counted)."""
        return count_parameters(self.image) + count_parameters(self.text)


class TextEmbedding(nn.Module):
    """A model's text side as one module (cached text features -> unit vectors), for export to ONNX."""

    def __init__(self, model: AlignmentModel):
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.embed_texts(features)


MAX_PARAMETERS = 1 << 28  # 1 GB of fp32 weights (3 GB with AdamW's moments): far beyond any projector here


def model_parameters(config: TrainConfig, image_dim: int, text_dim: int, image_tokens: int | None = None,
                     text_tokens: int | None = None) -> int:
    """Trainable projector parameters of the model this config builds, counted on the meta device (nothing
    allocated): --mlp-hidden 65536 would ask for 34 GB."""
    with torch.device("meta"):
        return AlignmentModel(config, image_dim, text_dim, image_tokens, text_tokens).projector_parameters()


def initial_model(config: TrainConfig, image_dim: int, text_dim: int, image_tokens: int | None = None,
                  text_tokens: int | None = None) -> AlignmentModel:
    """The model a run with this config starts from (seeded), i.e. the 'untrained projector' baseline.
    `image_tokens`/`text_tokens`: token counts of the sides that read token states."""
    counts = (image_tokens, text_tokens)
    parameters = model_parameters(config, image_dim, text_dim, *counts)  # before anything is allocated
    if parameters > MAX_PARAMETERS:
        raise VlmcacheError(f"--dim/--mlp-hidden/--mlp-layers/--rank: {parameters:,} projector parameters is more than "
                            f"{MAX_PARAMETERS:,}; choose smaller widths")
    torch.manual_seed(config.seed)
    return AlignmentModel(config, image_dim, text_dim, *counts)
