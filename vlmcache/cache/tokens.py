"""Token states as model input: a batch of states and their mask, read from a split's in-memory arrays.

A split read with tokens keeps each side's states in the cache dtype (fp16: 6,000 Flickr8k images of
49×1280 Lite0 tokens are 750 MB) and `token_batch` turns the rows of one batch into float32. It is the
one place training and evaluation read token batches, so a streaming shard reader can stand in for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    pass


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


def token_batch(states: np.ndarray, mask: np.ndarray, rows, device: str | torch.device = "cpu") -> Tokens:
    """Rows of a side's in-memory token states as one float32 batch on `device`."""
    index = rows.cpu().numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows)
    # numpy's fp16 -> fp32 cast is about twice as fast as torch's on a CPU
    return Tokens(torch.from_numpy(states[index].astype(np.float32)).to(device), torch.from_numpy(mask[index]).to(device))

