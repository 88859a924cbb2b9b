"""Token-state inputs for the token-level projectors (cross-attention, resampler, NdLinear over tokens).

A split read with tokens keeps each side's states in the cache dtype (fp16: 6,000 Flickr8k images of
49×1280 Lite0 tokens are 750 MB) and `token_batch` turns the rows of one batch into float32. It is the
one place training and evaluation read token batches, so a streaming shard reader can stand in for it.
Which sides read tokens is the config's choice (`tokens`, `text_tokens`), recorded in the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from vlmcache.model import AlignmentModel
    from vlmcache.store import Split

EMBED_BATCH = 512  # token rows embedded at once in evaluation: 512×49×1280 float32 is 128 MB
POOLED_BATCH = 65_536  # pooled rows embedded at once


@dataclass
class Tokens:
    """A batch of token states (B, T, C) float32 and their mask (B, T) bool, True where a token is real."""

    states: torch.Tensor
    mask: torch.Tensor

    def to(self, device: str | torch.device) -> Tokens:
        """The batch on `device` (as Tensor.to, so the training loop moves either kind of input alike)."""
        return Tokens(self.states.to(device), self.mask.to(device))


def token_options(config) -> dict:
    """The `load_features` keywords that read the token states a config's projectors need."""
    return {"image_tokens": config.tokens, "text_tokens": config.text_tokens}


def token_sides(config) -> tuple[str, ...]:
    """The modalities ("images", "texts") whose token states a config's projectors read."""
    return tuple(modality for modality, wanted in (("images", config.tokens), ("texts", config.text_tokens)) if wanted)


def token_batch(states: np.ndarray, mask: np.ndarray, rows, device: str | torch.device = "cpu") -> Tokens:
    """Rows of a side's in-memory token states as one float32 batch on `device`."""
    index = rows.cpu().numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows)
    # numpy's fp16 -> fp32 cast is about twice as fast as torch's on a CPU
    return Tokens(torch.from_numpy(states[index].astype(np.float32)).to(device), torch.from_numpy(mask[index]).to(device))


def batch_inputs(split: Split, side: str, rows: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor | Tokens:
    """A batch of one side's model input: its token states when the split holds them, else `pooled[rows]`."""
    states = getattr(split, f"{side}_tokens")
    if states is None:
        return pooled[rows]
    return token_batch(states, getattr(split, f"{side}_token_mask"), rows, pooled.device)


def input_shape(split: Split, side: str) -> tuple[int, int | None]:
    """(feature width, token count or None) of one side's model input."""
    states = getattr(split, f"{side}_tokens")
    if states is None:
        return getattr(split, f"{side}_features").shape[1], None
    return states.shape[2], states.shape[1]


@torch.no_grad()
def embed_side(model: AlignmentModel, split: Split, side: str, device: str | torch.device = "cpu") -> torch.Tensor:
    """Unit embeddings of every row of one side of a split; token states go through in batches."""
    pooled = torch.from_numpy(getattr(split, f"{side}_features")).to(device)
    embed = model.embed_images if side == "image" else model.embed_texts
    # In chunks either way: a million pooled rows must not make a million-row hidden activation either.
    step = POOLED_BATCH if getattr(split, f"{side}_tokens") is None else EMBED_BATCH
    rows = torch.arange(len(pooled))
    parts = [embed(batch_inputs(split, side, rows[start:start + step], pooled))
             for start in range(0, max(1, len(rows)), step)]
    return torch.cat(parts)
