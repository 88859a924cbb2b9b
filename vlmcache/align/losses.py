"""Contrastive losses as small modules, each owning its learnable temperature (and bias)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlmcache.align.config import LOSSES


def _same_image_off_diagonal(image_ids: torch.Tensor | None, size: int, device) -> torch.Tensor | None:
    """Pairs (i, j), i ≠ j, whose captions belong to one image: neither positive nor negative."""
    if image_ids is None:
        return None
    same = image_ids[:, None] == image_ids[None, :]
    return same & ~torch.eye(size, dtype=torch.bool, device=device)


class InfoNCELoss(nn.Module):
    """CLIP's symmetric cross-entropy over the image–text similarity matrix.

    The logit scale is learned as a log, starts at log(1/0.07), and is clamped to at most 100 by
    `clamp_()` after each optimiser step (as CLIP does).
    """

    max_scale = 100.0

    def __init__(self, init_scale: float = 1 / 0.07):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(init_scale)))

    def forward(self, image: torch.Tensor, text: torch.Tensor, image_ids: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.logit_scale.exp() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
        ignore = _same_image_off_diagonal(image_ids, len(logits), logits.device)
        if ignore is not None:
            logits = logits.masked_fill(ignore, -torch.inf)
        labels = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

    @torch.no_grad()
    def clamp_(self) -> None:
        self.logit_scale.clamp_(max=math.log(self.max_scale))

    def scale(self) -> float:
        """The multiplier applied to cosine similarities (the inverse temperature)."""
        return float(self.logit_scale.detach().exp())


class SigmoidLoss(nn.Module):
    """SigLIP's pairwise sigmoid loss: −mean over pairs of log σ(z·(t·x·y + b)), z = +1 on the
    diagonal and −1 off it; t = exp(t'), t' starts at log 10, b at −10.

    The SigLIP paper sums over pairs and divides by the batch size; this takes the mean over pairs as
    the issue specifies. The two differ by a constant factor (the batch size), which AdamW's per-parameter
    normalisation makes nearly irrelevant.
    """

    def __init__(self, init_scale: float = 10.0, init_bias: float = -10.0):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(init_bias)))

    def forward(self, image: torch.Tensor, text: torch.Tensor, image_ids: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.logit_scale.exp() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T + self.logit_bias
        signs = 2 * torch.eye(len(logits), device=logits.device) - 1
        pair_loss = -F.logsigmoid(signs * logits)
        ignore = _same_image_off_diagonal(image_ids, len(logits), logits.device)
        if ignore is None:
            return pair_loss.mean()
        keep = (~ignore).float()
        return (pair_loss * keep).sum() / keep.sum()

    @torch.no_grad()
    def clamp_(self) -> None:
        """SigLIP does not clamp its temperature; kept so the training loop treats losses alike."""

    def scale(self) -> float:
        return float(self.logit_scale.detach().exp())


def build_loss(kind: str, init_scale: float | None = None, init_bias: float | None = None) -> nn.Module:
    """A fresh loss module: "infonce" or "sigmoid", with optional initial scale (and bias for sigmoid)."""
    if kind == "infonce":
        return InfoNCELoss(init_scale if init_scale is not None else 1 / 0.07)
    if kind == "sigmoid":
        return SigmoidLoss(init_scale if init_scale is not None else 10.0, init_bias if init_bias is not None else -10.0)
    raise ValueError(f"unknown loss {kind!r}; use one of {', '.join(LOSSES)}")
