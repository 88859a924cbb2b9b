"""The captioner: a projector (image → K prefix vectors) and a decoder, the small word-level GPT or a
Hugging Face causal LM; built seeded for training, or rebuilt from a checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vlmcache.align.config import MAX_WIDTH
from vlmcache.align.projectors import Resampler, build_projector
from vlmcache.caption.config import CaptionConfig
from vlmcache.caption.vocab import BOS, EOS, PAD, SPECIALS, UNK
from vlmcache.errors import VlmcacheError
from vlmcache.metrics.captions import words
from vlmcache.run.checkpoint import HINT, load_checked, model_weights, read_checkpoint

# What a captioner checkpoint's metadata holds beside what every checkpoint has (vlmcache.run.checkpoint.META).
CAPTIONER_META = {"vocabulary?": [str], "token_count?": int}


class Block(nn.Module):
    """Pre-LayerNorm transformer block with causal self-attention (nanoGPT)."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        """`cache` (decoding): keys and values of the earlier positions, extended here with those of x."""
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        if cache is not None:
            if cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        if 1 < t < k.shape[2]:  # is_causal aligns the mask to the first key: right only without earlier positions
            raise ValueError("a cached block takes either the whole start of a sequence or one new position")
        # No dropout on the attention weights: on a CPU it makes this call ~10x slower (measured); the residual
        # branches keep theirs. One new position attends to every cached one: no mask.
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1)
        x = x + F.dropout(self.out(attended.transpose(1, 2).reshape(b, t, c)), self.dropout, self.training)
        return x + self.mlp(self.norm2(x))


class SmallDecoder(nn.Module):
    """A compact GPT over a word vocabulary; the output layer shares the input embedding's weights."""

    def __init__(self, vocabulary: list[str], width: int, layers: int, heads: int, dropout: float, positions: int):
        super().__init__()
        self.vocabulary = vocabulary
        self.index = {word: i for i, word in enumerate(vocabulary)}
        self.width = width
        self.start_id, self.end_id, self.pad_id = BOS, EOS, PAD
        self.token = nn.Embedding(len(vocabulary), width)
        self.position = nn.Embedding(positions, width)
        self.blocks = nn.ModuleList(Block(width, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.drop = nn.Dropout(dropout)
        nn.init.normal_(self.token.weight, std=0.02)
        nn.init.normal_(self.position.weight, std=0.02)

    def encode(self, captions: list[str]) -> list[list[int]]:
        """Word ids of each caption (no start or end token)."""
        return [[self.index.get(word, UNK) for word in words(caption)] for caption in captions]

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.vocabulary[i] for i in ids if i >= len(SPECIALS) or i == UNK)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.token(ids)

    def logits(self, embeds: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        """(B, T, width) input vectors -> (B, T, vocabulary) next-token logits. Decoding passes `cache` (a dict,
        empty for a new sequence) and then only the new position: earlier keys and values are kept in it."""
        start = cache.get("length", 0) if cache is not None else 0
        end = start + embeds.shape[1]
        if end > len(self.position.weight):
            raise ValueError(f"sequence of {end} exceeds the decoder's {len(self.position.weight)} positions")
        x = self.drop(embeds + self.position.weight[start:end])
        for i, block in enumerate(self.blocks):
            x = block(x, None if cache is None else cache.setdefault(i, {}))
        if cache is not None:
            cache["length"] = end
        return F.linear(self.norm(x), self.token.weight)

    def reorder(self, cache: dict, rows: torch.Tensor) -> None:
        """Keep the cached keys and values of `rows` (beam search's surviving captions), in that order."""
        for key, value in cache.items():
            if isinstance(value, dict):
                cache[key] = {name: tensor[rows] for name, tensor in value.items()}


class HFDecoder(nn.Module):
    """A Hugging Face causal LM fed the image prefix through `inputs_embeds` (ClipCap)."""

    def __init__(self, name: str):
        super().__init__()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            self.lm = AutoModelForCausalLM.from_pretrained(name)
            self.tokenizer = AutoTokenizer.from_pretrained(name)
        except (ValueError, KeyError) as error:  # transformers says "Unrecognized configuration class ..."
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise VlmcacheError(f"--decoder {name}: not a causal language model AutoModelForCausalLM can load "
                                f"({first[:160]}); use 'small' or e.g. gpt2, distilgpt2, a SmolLM") from None
        except OSError as error:
            raise VlmcacheError(f"--decoder {name}: cannot load it ({str(error).splitlines()[0][:160]}); give a local "
                                "folder, or a hub name with network access or in the local HF cache") from None
        tok = self.tokenizer
        self.end_id = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
        self.start_id = next((i for i in (tok.bos_token_id, tok.cls_token_id, self.end_id) if i is not None), None)
        if self.end_id is None:
            raise VlmcacheError(f"--decoder {name}: its tokenizer has no end-of-sequence or [SEP] token to stop captions")
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.end_id
        self.width = self.lm.get_input_embeddings().embedding_dim

    def encode(self, captions: list[str]) -> list[list[int]]:
        return self.tokenizer([" " + caption.strip() for caption in captions], add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm.get_input_embeddings()(ids)

    def logits(self, embeds: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        """As SmallDecoder.logits; the cache holds the LM's own past keys and values."""
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=embeds.is_cuda):
            if cache is None:
                return self.lm(inputs_embeds=embeds).logits.float()
            output = self.lm(inputs_embeds=embeds, past_key_values=cache.get("past"), use_cache=True)
            cache["past"] = output.past_key_values
            return output.logits.float()

    def reorder(self, cache: dict, rows: torch.Tensor) -> None:
        cache["past"].reorder_cache(rows)



class Captioner(nn.Module):
    """Projector (image → K prefix vectors) + decoder."""

    def __init__(self, config: CaptionConfig, image_dim: int, vocabulary: list[str] | None, token_count: int = 0):
        super().__init__()
        self.config = config
        if config.decoder == "small":
            self.decoder: SmallDecoder | HFDecoder = SmallDecoder(
                vocabulary, config.width, config.layers, config.heads, config.dropout,
                positions=config.prefix_tokens + config.max_words + 2)
        else:
            self.decoder = HFDecoder(config.decoder)
            self.decoder.lm.requires_grad_(config.trains_lm)
        width, k = self.decoder.width, config.prefix_tokens
        if config.projector == "resampler":
            self.projector = Resampler(image_dim, width, latents=k, depth=config.resampler_depth,
                                       heads=_heads(width, config.heads), max_tokens=max(token_count, 1))
        else:
            self.projector = build_projector(config.projector, image_dim, k * width, hidden=k * width // 2)

    def prefix(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, D) or tokens (B, T, C) -> (B, K, width) prefix vectors."""
        if self.config.projector == "resampler":
            return self.projector(images)
        return self.projector(images).view(len(images), self.config.prefix_tokens, self.decoder.width)

    def trainable(self) -> nn.ModuleDict:
        """The parts whose weights a checkpoint holds: the projector, and the decoder unless frozen."""
        parts = {"projector": self.projector}
        if self.config.trains_lm:
            parts["decoder"] = self.decoder
        return nn.ModuleDict(parts)

    def loss(self, images: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Teacher-forced cross-entropy. `ids` (B, L): start, caption, end, then padding; `lengths` (B,) counts
        the real tokens of each row (by length, since a model's padding id may equal its end id)."""
        prefix = self.prefix(images)
        logits = self.decoder.logits(torch.cat([prefix, self.decoder.embed(ids[:, :-1])], dim=1))
        positions = torch.arange(1, ids.shape[1], device=ids.device)
        targets = ids[:, 1:].masked_fill(positions[None] >= lengths[:, None], -100)
        return F.cross_entropy(logits[:, prefix.shape[1]:].reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _heads(width: int, wanted: int) -> int:
    """The largest head count ≤ wanted that divides width (an HF model's width is not ours to choose)."""
    return max(h for h in range(1, wanted + 1) if width % h == 0)


def initial_captioner(config: CaptionConfig, image_dim: int, vocabulary: list[str] | None, token_count: int) -> Captioner:
    """The seeded model a run with this config starts from."""
    torch.manual_seed(config.seed)
    return Captioner(config, image_dim, vocabulary, token_count)


def load_captioner(path: str | Path, device: str = "cpu") -> tuple[Captioner, dict]:
    """Rebuild a trained captioner from a checkpoint file or run folder (its best checkpoint)."""
    tensors, header = read_checkpoint(path, "captioner", CAPTIONER_META)
    meta = header["vlmcache"]
    try:
        config = CaptionConfig.from_dict(meta["config"])
    except VlmcacheError as error:
        raise VlmcacheError(f"{header['path']}: checkpoint metadata is not valid ({error}); {HINT}") from None
    vocabulary, sizes = meta.get("vocabulary"), (meta["image_dim"], meta.get("token_count") or 1)
    if config.decoder == "small" and (vocabulary or [])[:len(SPECIALS)] != list(SPECIALS):
        raise VlmcacheError(f"{header['path']}: checkpoint metadata is not valid (the small decoder's vocabulary is "
                            f"missing or does not start with {', '.join(SPECIALS)}); {HINT}")
    if not all(1 <= size <= MAX_WIDTH for size in sizes):  # before a model of that size is allocated
        raise VlmcacheError(f"{header['path']}: checkpoint metadata asks for image inputs of {sizes[0]} features × "
                            f"{sizes[1]} tokens; not a valid checkpoint ({HINT})")
    model = Captioner(config, meta["image_dim"], vocabulary, meta.get("token_count") or 0)
    load_checked(model.trainable(), model_weights(tensors), header["path"])
    return model.to(device).eval(), meta
