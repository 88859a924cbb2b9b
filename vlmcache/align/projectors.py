"""Projector heads that map one encoder's features into the shared space.

Pooled vectors: linear, MLP, NdLinear. Token states (B, T, C) with a (B, T) mask, from `extract --tokens`:
cross-attention (learned queries), resampler (Perceiver) and NdLinear over the (tokens, channels) axes.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from vlmcache.align.config import PROJECTORS, TOKEN_CAPABLE, TOKEN_PROJECTORS


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
    """A pooled vector reshaped to a 2-D grid, mapped by NdLinear to a grid of `out_dim` cells, flattened.

    `layers` ≥ 2 stacks NdLinear layers through `hidden_grid` (default: the output grid) with a ReLU between,
    as the NdLinear README builds an MLP from NdLinear layers; 1 is the single layer (its weights keep their
    names, so earlier checkpoints load).
    """

    def __init__(self, in_dim: int, out_dim: int, in_grid: tuple[int, int] | None = None,
                 out_grid: tuple[int, int] | None = None, hidden_grid: tuple[int, int] | None = None, layers: int = 1):
        super().__init__()
        self.in_grid, self.out_grid = in_grid or grid_shape(in_dim), out_grid or grid_shape(out_dim)
        if math.prod(self.in_grid) != in_dim or math.prod(self.out_grid) != out_dim:
            raise ValueError(f"grids {self.in_grid}->{self.out_grid} do not multiply to {in_dim}->{out_dim}")
        if layers == 1:
            self.nd = NdLinear(self.in_grid, self.out_grid)
            return
        grids = [self.in_grid, *[tuple(hidden_grid or self.out_grid)] * (layers - 1), self.out_grid]
        stack: list[nn.Module] = []
        for into, out in itertools.pairwise(grids):
            stack += [NdLinear(into, out), nn.ReLU()]
        self.nd = nn.Sequential(*stack[:-1])  # no ReLU after the last layer: the output is an embedding

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.nd(features.view(-1, *self.in_grid)).flatten(1)


def build_projector(kind: str, in_dim: int, out_dim: int, tokens: int | None = None, **options) -> nn.Module:
    """A fresh projector of `kind` from in_dim to out_dim; `tokens` (the token count T) builds the token
    version, whose forward takes (B, T, in_dim) states and a (B, T) mask."""
    if tokens is None and kind in TOKEN_PROJECTORS:
        raise ValueError(f"{kind} reads token states; this input is pooled")
    if tokens is not None and kind not in TOKEN_CAPABLE:
        raise ValueError(f"{kind} reads pooled features; token states need one of {', '.join(TOKEN_CAPABLE)}")
    if kind == "linear" and options.get("rank"):
        # A rank-r bottleneck: the first map has no bias, which the second's bias would absorb anyway.
        return nn.Sequential(nn.Linear(in_dim, options["rank"], bias=False), nn.Linear(options["rank"], out_dim))
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp":
        return MLPProjector(in_dim, out_dim, **{k: v for k, v in options.items()
                                                if k in ("hidden", "dropout", "residual", "layers")})
    if kind == "ndlinear" and tokens is not None:
        return TokenNdLinearProjector(tokens, in_dim, out_dim)
    if kind == "ndlinear":
        return NdLinearProjector(in_dim, out_dim, options.get("in_grid"), options.get("out_grid"),
                                 options.get("hidden_grid"), options.get("nd_layers") or 1)
    if kind == "cross-attention":
        return CrossAttentionProjector(in_dim, out_dim, tokens, **{k: v for k, v in options.items()
                                                                   if k in ("queries", "heads", "positions", "dropout")})
    if kind == "resampler":
        return ResamplerProjector(in_dim, out_dim, tokens, **{k: v for k, v in options.items()
                                                              if k in ("queries", "heads", "depth")})
    raise ValueError(f"unknown projector {kind!r}; use one of {', '.join(PROJECTORS)}")


def count_parameters(module: nn.Module) -> int:
    """Trainable parameters of a module (what a run's `parameters` and the ablation's params column report)."""
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


class CrossAttentionProjector(nn.Module):
    """`queries` learned queries read the tokens through one multi-head attention (padding masked), then
    LayerNorm and a linear map to `out_dim`; several queries are averaged into one embedding.

    The attention's weights live in an `nn.MultiheadAttention` (width `out_dim`, keys and values of
    width `in_dim`), but the forward pass is folded for few queries: the score of token x_t for query
    head h is (W_k,h^T q_h)·x_t, so each token costs in_dim per head instead of in_dim × width, and the
    values are averaged before W_v (Σ_t a_t W_v x_t = W_v Σ_t a_t x_t, as the weights sum to 1).
    For 49×1280 image tokens and 1 query that is ~60× fewer multiply-adds. Tested equal to the module.
    `positions=True` adds a learned score bias per head and token position (for a fixed grid such as
    the 7×7 map; equivalent to a learned position embedding on the keys of this one layer). `dropout`
    drops attention weights in training (the config's --dropout).
    """

    def __init__(self, in_dim: int, out_dim: int, tokens: int, queries: int = 1, heads: int = 4,
                 positions: bool = False, dropout: float = 0.0):
        super().__init__()
        if out_dim % heads:
            raise ValueError(f"--dim {out_dim} is not divisible by --heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.queries = nn.Parameter(torch.randn(queries, out_dim) * 0.02)
        self.attention = nn.MultiheadAttention(out_dim, heads, kdim=in_dim, vdim=in_dim, batch_first=True)
        self.position_bias = nn.Parameter(torch.zeros(heads, tokens)) if positions else None
        self.norm = nn.LayerNorm(out_dim)
        self.out = nn.Linear(out_dim, out_dim)

    def attend(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, in_dim) tokens -> (B, queries, width): the attention module's output, computed folded."""
        attention, (batch, count, channels) = self.attention, tokens.shape
        heads, width = self.heads, attention.embed_dim
        head_dim = width // heads
        if attention._qkv_same_embed_dim:  # in_dim == width: PyTorch packs the three maps in one matrix
            w_q, w_k, w_v = attention.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = attention.q_proj_weight, attention.k_proj_weight, attention.v_proj_weight
        b_q, b_k, b_v = attention.in_proj_bias.chunk(3)
        q = F.linear(self.queries, w_q, b_q).view(-1, heads, head_dim) / math.sqrt(head_dim)  # (Q, H, d)
        keys = torch.einsum("qhd,hdc->qhc", q, w_k.view(heads, head_dim, channels)).reshape(-1, channels)
        # q·b_k is the same for every token, so it cancels in the softmax; kept so the scores equal the module's.
        # F.linear, not tokens @ keys.T: its weight gradient is dSᵀ·X, ~6× faster on a CPU than Xᵀ·dS here.
        scores = F.linear(tokens, keys, (q * b_k.view(heads, head_dim)).sum(-1).reshape(-1))  # (B, T, Q·H)
        scores = scores.transpose(1, 2).view(batch, -1, heads, count)  # (B, Q, H, T)
        if self.position_bias is not None:
            scores = scores + self.position_bias[:, :count]
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        # Dropout on the attention weights in training, as nn.MultiheadAttention(dropout=...) does.
        weights = F.dropout(scores.softmax(dim=-1), self.dropout, self.training).flatten(1, 2)  # (B, Q·H, T)
        pooled = (weights @ tokens).view(batch, -1, heads, channels)  # (B, Q, H, in_dim)
        values = torch.einsum("bqhc,hdc->bqhd", pooled, w_v.view(heads, head_dim, channels)) + b_v.view(heads, head_dim)
        return attention.out_proj(values.reshape(batch, -1, width))

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, in_dim) tokens, optional (B, T) bool mask (True = real token) -> (B, out_dim)."""
        return self.out(self.norm(self.attend(tokens, mask))).mean(dim=1)


class ResamplerProjector(nn.Module):
    """The Perceiver `Resampler` (`queries` latents, `depth` blocks, width `out_dim`), its latents averaged."""

    def __init__(self, in_dim: int, out_dim: int, tokens: int, queries: int = 8, heads: int = 4, depth: int = 2):
        super().__init__()
        if out_dim % heads:
            raise ValueError(f"--dim {out_dim} is not divisible by --heads {heads}")
        self.resampler = Resampler(in_dim, out_dim, latents=queries, depth=depth, heads=heads, max_tokens=tokens)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.resampler(tokens, mask).mean(dim=1)


class TokenNdLinearProjector(nn.Module):
    """NdLinear over the (channels, tokens) axes: (B, T, C) -> (B, a, b), flattened to a·b = out_dim
    (the most square grid). The channel axis goes first, on the tokens' own memory layout (no copy of
    the big input), and shrinks C to a before the token axis maps T to b. Padded tokens are zeroed
    first, so their values never reach the output."""

    def __init__(self, tokens: int, in_dim: int, out_dim: int):
        super().__init__()
        self.nd = NdLinear((in_dim, tokens), grid_shape(out_dim))

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None:
            tokens = tokens.masked_fill(~mask[..., None], 0.0)
        return self.nd(tokens.transpose(1, 2)).flatten(1)
