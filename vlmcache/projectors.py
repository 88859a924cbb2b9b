"""Projector heads that map one encoder's features into the shared space: linear, MLP, NdLinear."""

from __future__ import annotations

import math

import torch
from torch import nn

PROJECTORS = ("linear", "mlp", "ndlinear")


class MLPProjector(nn.Module):
    """Linear → GELU → Linear, with dropout, and optionally the residual + LayerNorm of the widely
    copied OpenAI-CLIP tutorial head (out = LayerNorm(fc(gelu(proj(x))) + proj(x)))."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int | None = None, dropout: float = 0.1,
                 residual: bool = False, layers: int = 2):
        super().__init__()
        hidden = out_dim if residual or hidden is None else hidden  # the residual adds first(x): widths must match
        self.first = nn.Linear(in_dim, hidden)
        middle = []
        for _ in range(layers - 2):
            middle += [nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, hidden)]
        self.middle = nn.Sequential(*middle)
        self.last = nn.Sequential(nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim))
        self.norm = nn.LayerNorm(out_dim) if residual else None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        projected = self.middle(self.first(features))
        out = self.last(projected)
        return self.norm(out + projected) if self.norm is not None else out


class NdLinear(nn.Module):
    """NdLinear (Reneau et al., ensemble-core/NdLinear): one Linear per axis of a (B, *dims) tensor.

    Applies the axis-0 Linear to every fibre along axis 0, then axis 1, ... — the Kronecker-factorised
    equivalent of one big Linear on the flattened tensor, with far fewer parameters.
    """

    def __init__(self, input_dims: tuple[int, ...], output_dims: tuple[int, ...]):
        super().__init__()
        if len(input_dims) != len(output_dims):
            raise ValueError("input_dims and output_dims need the same number of axes")
        self.input_dims, self.output_dims = tuple(input_dims), tuple(output_dims)
        self.align_layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(input_dims, output_dims, strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = x.dim() - 1
        for axis, layer in enumerate(self.align_layers, start=1):
            x = layer(x.transpose(axis, last)).transpose(axis, last)
        return x


def grid_shape(dim: int) -> tuple[int, int]:
    """The most square 2-D factorisation of dim (a ≤ b, a·b = dim), e.g. 1280 → (32, 40)."""
    a = max(d for d in range(1, math.isqrt(dim) + 1) if dim % d == 0)
    return a, dim // a


class NdLinearProjector(nn.Module):
    """A pooled vector reshaped to a 2-D grid, mapped by NdLinear to a grid of `out_dim` cells, flattened."""

    def __init__(self, in_dim: int, out_dim: int, in_grid: tuple[int, int] | None = None,
                 out_grid: tuple[int, int] | None = None):
        super().__init__()
        self.in_grid, self.out_grid = in_grid or grid_shape(in_dim), out_grid or grid_shape(out_dim)
        if math.prod(self.in_grid) != in_dim or math.prod(self.out_grid) != out_dim:
            raise ValueError(f"grids {self.in_grid}->{self.out_grid} do not multiply to {in_dim}->{out_dim}")
        self.nd = NdLinear(self.in_grid, self.out_grid)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.nd(features.view(-1, *self.in_grid)).flatten(1)


def build_projector(kind: str, in_dim: int, out_dim: int, **options) -> nn.Module:
    """A fresh projector of `kind` ("linear", "mlp", "ndlinear") from in_dim to out_dim."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp":
        return MLPProjector(in_dim, out_dim, **{k: v for k, v in options.items()
                                                if k in ("hidden", "dropout", "residual", "layers")})
    if kind == "ndlinear":
        return NdLinearProjector(in_dim, out_dim, **{k: v for k, v in options.items() if k in ("in_grid", "out_grid")})
    raise ValueError(f"unknown projector {kind!r}; use one of {', '.join(PROJECTORS)}")


def count_parameters(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters() if parameter.requires_grad)


class Resampler(nn.Module):
    """A Perceiver resampler (Flamingo, Alayrac et al. 2022): `latents` learned queries read a variable
    number of tokens through `depth` blocks of cross-attention + feed-forward and come out as `latents`
    tokens of width `dim`, whatever the number of input tokens.

    As in Flamingo the keys and values are the input tokens and the latents together; `mask` (B, T),
    True where a token is real, keeps padding (e.g. of text tokens) out of the attention. Input tokens
    get a learned position embedding (up to `max_tokens`) so a spatial grid keeps where things are.
    """

    def __init__(self, in_dim: int, dim: int, latents: int = 8, depth: int = 2, heads: int = 4,
                 max_tokens: int = 256, ff_mult: int = 4):
        super().__init__()
        self.input = nn.Linear(in_dim, dim)
        self.positions = nn.Parameter(torch.zeros(max_tokens, dim))
        self.latents = nn.Parameter(torch.randn(latents, dim) * 0.02)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"norm_tokens": nn.LayerNorm(dim), "norm_latents": nn.LayerNorm(dim),
                           "attention": nn.MultiheadAttention(dim, heads, batch_first=True),
                           "ff": nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, ff_mult * dim), nn.GELU(),
                                               nn.Linear(ff_mult * dim, dim))})
            for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, in_dim) tokens, optional (B, T) bool mask -> (B, latents, dim)."""
        if tokens.shape[1] > len(self.positions):
            raise ValueError(f"{tokens.shape[1]} tokens, but this resampler has positions for {len(self.positions)}")
        x = self.input(tokens) + self.positions[:tokens.shape[1]]
        latents = self.latents.expand(len(tokens), -1, -1)
        # The latents are always valid keys, so a row whose tokens are all masked still attends somewhere.
        padding = None if mask is None else torch.cat([~mask.bool(), mask.new_zeros(len(tokens), latents.shape[1],
                                                                                     dtype=torch.bool)], dim=1)
        for block in self.blocks:
            queries = block["norm_latents"](latents)
            keys = torch.cat([block["norm_tokens"](x), queries], dim=1)
            attended, _ = block["attention"](queries, keys, keys, key_padding_mask=padding, need_weights=False)
            latents = latents + attended
            latents = latents + block["ff"](latents)
        return self.norm(latents)
