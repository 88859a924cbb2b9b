"""A model's inputs and embeddings: which sides read token states, one batch of a side's input, a whole
split embedded in chunks, and the checks that a split's inputs fit a checkpoint.

Which sides read tokens is the config's choice (`tokens`, `text_tokens`), recorded in the checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from vlmcache.align.config import TrainConfig
from vlmcache.align.model import AlignmentModel
from vlmcache.cache.store import Split
from vlmcache.cache.tokens import EMBED_BATCH, POOLED_BATCH, Tokens, token_batch
from vlmcache.errors import VlmcacheError
from vlmcache.metrics.retrieval import cosine_ranks, recall_from_ranks


def trained_row(config: TrainConfig) -> str:
    """The table row name of a trained model."""
    return f"trained ({config.projector} + {config.loss})"


def model_embeddings(model: AlignmentModel) -> Callable[[Split], tuple[torch.Tensor, torch.Tensor]]:
    """split -> (unit image embeddings, unit text embeddings) of a model, without autograd."""
    def embed(split: Split) -> tuple[torch.Tensor, torch.Tensor]:
        return embed_side(model, split, "image"), embed_side(model, split, "text")
    return embed


@torch.no_grad()
def model_ranks(model: AlignmentModel, split: Split, device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Per-query retrieval ranks (image ranks, caption ranks) of a model on a split of cached features."""
    model.eval()
    return cosine_ranks(embed_side(model, split, "image", device), embed_side(model, split, "text", device),
                        torch.from_numpy(split.caption_image).to(device))


def evaluate_model(model: AlignmentModel, split: Split, device: str | torch.device = "cpu") -> dict[str, float]:
    """Retrieval metrics of a model on a split of cached features."""
    return recall_from_ranks(*model_ranks(model, split, device))


def check_input_shapes(meta: dict, split: Split, path, sides=("image", "text")) -> None:
    """Refuse features (or token states) whose width or token count is not what the checkpoint was trained on."""
    for side in sides:
        found, expected = input_shape(split, side), (meta[f"{side}_dim"], meta.get(f"{side}_tokens"))
        if found != expected:
            raise VlmcacheError(f"{path}: {side} inputs are {_describe_input(*found)} but the checkpoint expects "
                                f"{_describe_input(*expected)}; use a cache extracted like the run's")


def _describe_input(dim: int, count: int | None) -> str:
    return f"{count}×{dim} token states" if count else f"{dim}-d features"


def refuse_text_tokens(config: TrainConfig, command: str) -> None:
    """New text (prompts, queries) is encoded to pooled features only: a text-token checkpoint cannot rank it."""
    if config.text_tokens:
        raise VlmcacheError(f"{command}: this checkpoint's text side reads token states (--text-tokens), but new "
                            "prompts and queries are encoded as pooled features; train with --no-text-tokens for it")


def token_options(config) -> dict:
    """The `load_features` keywords that read the token states a config's projectors need."""
    return {"image_tokens": config.tokens, "text_tokens": config.text_tokens}


def token_sides(config) -> tuple[str, ...]:
    """The modalities ("images", "texts") whose token states a config's projectors read."""
    return tuple(modality for modality, wanted in (("images", config.tokens), ("texts", config.text_tokens)) if wanted)


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

