"""The trainable model: an image projector, a text projector and the loss that owns the temperature."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmcache.config import TrainConfig
from vlmcache.errors import VlmcacheError
from vlmcache.losses import build_loss
from vlmcache.projectors import build_projector, count_parameters


class AlignmentModel(nn.Module):
    """The trainable part: an image projector, a text projector and the loss's temperature (and bias)."""

    def __init__(self, config: TrainConfig, image_dim: int, text_dim: int):
        super().__init__()
        common = {"hidden": config.mlp_hidden, "dropout": config.dropout, "residual": config.residual,
                  "layers": config.mlp_layers}
        try:
            self.image = build_projector(config.projector, image_dim, config.dim, in_grid=config.image_grid, **common)
            self.text = build_projector(config.projector, text_dim, config.dim, in_grid=config.text_grid, **common)
        except ValueError as error:
            raise VlmcacheError(f"--projector {config.projector}: {error}") from None
        self.loss = build_loss(config.loss, config.init_scale, config.init_bias)
        self.image_dim, self.text_dim = image_dim, text_dim

    def embed_images(self, features: torch.Tensor) -> torch.Tensor:
        """Cached image features -> unit vectors in the shared space."""
        return F.normalize(self.image(features), dim=-1)

    def embed_texts(self, features: torch.Tensor) -> torch.Tensor:
        """Cached text features -> unit vectors in the shared space."""
        return F.normalize(self.text(features), dim=-1)

    def projector_parameters(self) -> int:
        """Trainable parameters of the two projectors (the loss's one or two scalars not counted)."""
        return count_parameters(self.image) + count_parameters(self.text)


MAX_PARAMETERS = 1 << 28  # 1 GB of fp32 weights (3 GB with AdamW's moments): far beyond any projector here


def initial_model(config: TrainConfig, image_dim: int, text_dim: int) -> AlignmentModel:
    """The model a run with this config starts from (seeded), i.e. the 'untrained projector' baseline."""
    with torch.device("meta"):  # counted before anything is allocated: --mlp-hidden 65536 would ask for 34 GB
        parameters = AlignmentModel(config, image_dim, text_dim).projector_parameters()
    if parameters > MAX_PARAMETERS:
        raise VlmcacheError(f"--dim/--mlp-hidden/--mlp-layers: {parameters:,} projector parameters is more than "
                            f"{MAX_PARAMETERS:,}; choose smaller widths")
    torch.manual_seed(config.seed)
    return AlignmentModel(config, image_dim, text_dim)
