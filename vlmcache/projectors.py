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
