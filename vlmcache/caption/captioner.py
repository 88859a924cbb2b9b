"""Captioning on cached image features: a projector turns an image into K prefix vectors, a language
model continues them into a caption (ClipCap, Mokady et al. 2021; LLaVA stage 1).

Two decoders:
- `small`: a compact GPT-style transformer trained from scratch on the cache's training captions, with a
  word vocabulary built from those captions (words seen at least `min_count` times). Words, not the
  MiniLM WordPiece vocabulary, because the output softmax is the dominant cost on a CPU: ~2.5k words
  instead of 30k word pieces, and sequences are shorter; the metrics are computed on words anyway.
- any Hugging Face causal LM (`AutoModelForCausalLM`, a hub name or a local folder): the projected prefix
  goes in as `inputs_embeds`; frozen by default (only the projector trains), `tune_lm` trains it too.

Projectors: `linear` and `mlp` map the pooled feature to K·width numbers; `resampler` (a Perceiver
resampler over the cache's token states, `extract --tokens`) reads the image's tokens into K latents.

Training visits every training caption once per epoch in length-bucketed batches (captions of one
length together, so almost no position is padding), with teacher forcing and cross-entropy on the
caption words and end token. Checkpoints are safetensors: `last` every epoch with optimiser, scheduler
and RNG state (so `resume` ends with the same weights), `best` by validation CIDEr (greedy decoding).
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlmcache.align.config import MAX_WIDTH, TrainConfig
from vlmcache.align.load import check_encoders_match, set_encoders
from vlmcache.align.projectors import Resampler, build_projector, count_parameters
from vlmcache.cache.layout import parse_sets
from vlmcache.cache.store import FeatureCache, open_cache
from vlmcache.errors import VlmcacheError
from vlmcache.files import FolderLock, remove_stale_temporaries
from vlmcache.metrics.captions import words
from vlmcache.options import check_options, option, option_like
from vlmcache.run.checkpoint import (
    HINT,
    finish_epoch,
    load_checked,
    model_weights,
    read_checkpoint,
    restore,
    write_metrics_log,
)
from vlmcache.run.schedule import lr_factor

CAPTION_PROJECTORS = ("linear", "mlp", "resampler")
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD, BOS, EOS, UNK = range(4)
# Beam search ranks by total log-probability / length**this: 1 (the mean per token) measured best on both final
# Flickr8k models (Lite2 / Lite0: +0.8 / +0.0 BLEU-4, +2.5 / +1.0 CIDEr over 0 with beam 3; 1.5 was worse; README)
LENGTH_PENALTY = 1.0
# What a captioner checkpoint's metadata holds beside what every checkpoint has (vlmcache.run.checkpoint.META).
CAPTIONER_META = {"vocabulary?": [str], "token_count?": int}


MAX_BEAM = 64  # captions kept per image while decoding; wider only costs time


@dataclass
class CaptionConfig:
    """Everything that defines a captioning run (saved with every checkpoint). Every field is an option with its
    type and range (vlmcache.options), checked in one place when the config is made: on the command line, from
    Python and from a checkpoint alike."""

    decoder: str = option("small", "'small', or a Hugging Face causal LM name or folder.")
    projector: str = option("mlp", "linear | mlp | resampler", choices=CAPTION_PROJECTORS)
    image_features: str | None = option(None, "Image feature sets joined by '+' [default: the default set]")
    prefix_tokens: int = option(4, "K: image prefix vectors fed to the decoder.", low=1, high=256)
    tune_lm: bool | None = option(None, "Train the language model too [default: the small decoder trained, a "
                                        "pretrained LM frozen]")
    layers: int = option(3, "Small decoder: transformer blocks.", low=1, high=64)
    width: int = option(256, "Small decoder: model width.", low=1, high=8192)
    heads: int = option(4, "Small decoder: attention heads.", low=1, high=256)
    dropout: float = option(0.1, "Small decoder: dropout.", low=0.0, high=0.99)
    min_count: int = option(5, "Words seen fewer times in the training captions become <unk>.", low=1, high=1 << 30)
    max_words: int = option(32, "Longer training captions are cut (Flickr8k: 99.9% are shorter).", low=1, high=1024)
    resampler_depth: int = option(2, "Resampler: cross-attention blocks.", low=1, high=64)
    # 4 epochs of batch 128 at lr 1.5e-3: the measured recipe that fits 15 CPU-minutes (README). The training
    # loop's options are TrainConfig's (same ranges and checks), with the captioner's defaults.
    epochs: int = option_like(TrainConfig, "epochs", 4, help="Passes over all training captions.")
    batch_size: int = option_like(TrainConfig, "batch_size", 128, help="Captions per step.", low=1)
    lr: float = option_like(TrainConfig, "lr", 1.5e-3)
    weight_decay: float = option_like(TrainConfig, "weight_decay", 0.01)
    warmup: int = option_like(TrainConfig, "warmup", 200)
    schedule: str = option_like(TrainConfig, "schedule", "cosine")
    grad_clip: float = option_like(TrainConfig, "grad_clip", 1.0)
    seed: int = option_like(TrainConfig, "seed", 0)
    patience: int | None = option_like(TrainConfig, "patience", None, help="Stop after N epochs without a better val "
                                                                            "CIDEr.")
    max_length: int = option(20, "Decoding: most tokens generated per caption.", low=1, high=1024)
    train_split: str = option_like(TrainConfig, "train_split", "train")
    val_split: str = option_like(TrainConfig, "val_split", "val")

    def __post_init__(self):
        check_options(self)
        if self.decoder == "small" and self.tune_lm is False:
            raise VlmcacheError("--freeze-lm: the small decoder is trained from scratch; freeze only a pretrained "
                                "--decoder (a Hugging Face causal LM)")
        if self.width % self.heads:
            raise VlmcacheError(f"width {self.width} is not divisible by {self.heads} heads")
        self.image_features = None if self.image_sets is None else "+".join(self.image_sets)
        if self.projector == "resampler" and self.image_sets and len(self.image_sets) > 1:
            raise VlmcacheError(f"--image-features {self.image_features}: the resampler reads the tokens of one "
                                "feature set; name one")

    @property
    def image_sets(self) -> tuple[str, ...] | None:
        """The image feature sets as a tuple of names (None: the cache's default set)."""
        return parse_sets(self.image_features)

    @property
    def trains_lm(self) -> bool:
        return self.decoder == "small" or bool(self.tune_lm)

    @classmethod
    def from_dict(cls, values: dict) -> CaptionConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})


@dataclass
class CaptionDecoding:
    """How a trained captioner writes captions: the option of `caption eval` and `caption predict`, checked where
    the config is made, as CaptionConfig's are."""

    beam: int = option(5, "Beam width; 1 is greedy decoding.", low=1, high=MAX_BEAM)

    def __post_init__(self):
        check_options(self)


# --- tokenisation --------------------------------------------------------------------------------------

def build_vocabulary(captions: list[str], min_count: int) -> list[str]:
    """Special tokens, then the words seen at least `min_count` times, most frequent first."""
    counts = Counter(word for caption in captions for word in words(caption))
    kept = sorted((word for word, count in counts.items() if count >= min_count), key=lambda w: (-counts[w], w))
    return [*SPECIALS, *kept]


# --- decoders ------------------------------------------------------------------------------------------

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


# --- the captioner ---------------------------------------------------------------------------------------

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


# --- data ----------------------------------------------------------------------------------------------

@dataclass
class CaptionData:
    """One split for captioning: each image's input (pooled feature or tokens) and its captions."""

    images: torch.Tensor  # (N, D) pooled features, or (N, T, C) token states (kept in the cache dtype)
    pooled: np.ndarray  # (N, D) pooled features, float32 (for the nearest-neighbour baseline)
    texts: np.ndarray  # (captions, text_dim) cached caption features (for its consensus)
    captions: list[str]
    caption_image: np.ndarray  # (captions,) image row of each caption
    image_ids: list[str]

    def references(self) -> list[list[str]]:
        """All captions of each image, in image order."""
        found: list[list[str]] = [[] for _ in range(len(self.image_ids))]
        for caption, image in zip(self.captions, self.caption_image.tolist(), strict=True):
            found[image].append(caption)
        return found


def load_split(cache: FeatureCache, split: str, tokens: bool, image_sets: tuple[str, ...] | None = None) -> CaptionData:
    """A split of a cache for captioning: its `image_sets` (None: the default set) concatenated, or with
    `tokens` the token states of its one set (extract --tokens)."""
    if cache.classes:
        raise VlmcacheError(f"{cache.path}: a labelled image folder (classes, no captions) cannot train or score a "
                            "captioner; extract an image–caption dataset (Flickr8k, Karpathy JSON, CSV/JSONL pairs)")
    loaded = cache.split(split, image_sets)
    if len(loaded.captions) == 0:
        raise VlmcacheError(f"{cache.path}: split {split!r} has no captions; a captioner needs image–caption pairs")
    images = torch.from_numpy(loaded.image_features)
    if tokens:
        chosen = image_sets[0] if image_sets else None
        if not cache.feature_set("images", chosen).provenance.get("tokens"):
            raise VlmcacheError(f"{cache.path}: has no image tokens for --projector resampler; re-extract with "
                                "vlmcache extract ... --tokens (or use --projector linear or mlp)")
        rows, _ = cache.split_rows(split)
        valid = cache.read("images", rows, "valid", chosen).astype(bool)
        images = torch.from_numpy(cache.read_tokens("images", rows, valid, chosen)[0])  # the store's checked reader
    return CaptionData(images, loaded.image_features, loaded.text_features, loaded.captions,
                       loaded.caption_image, loaded.image_ids)


def _sequences(decoder, captions: list[str], max_words: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, max_words + 2) token ids (start, caption, end, padding) and each row's real length."""
    encoded = [ids[:max_words] for ids in decoder.encode(captions)]
    lengths = np.array([len(ids) + 2 for ids in encoded], dtype=np.int64)
    table = np.full((len(encoded), max_words + 2), decoder.pad_id, dtype=np.int64)
    for row, ids in enumerate(encoded):
        table[row, :len(ids) + 2] = [decoder.start_id, *ids, decoder.end_id]
    return table, lengths


def length_batches(lengths: np.ndarray, batch_size: int, generator: torch.Generator) -> list[np.ndarray]:
    """One epoch of caption rows in batches of equal (or nearly equal) length, in a seeded random order:
    shuffle, stable-sort by length, cut into batches, shuffle the batches. Little padding, no bias in order."""
    order = torch.randperm(len(lengths), generator=generator).numpy()
    order = order[np.argsort(lengths[order], kind="stable")]
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


# --- decoding ------------------------------------------------------------------------------------------

def _strip(ids: list[int], end_id: int) -> list[int]:
    """Generated ids up to (not including) the first end token."""
    return ids[:ids.index(end_id)] if end_id in ids else ids


@torch.no_grad()
def greedy(decoder, prefix: torch.Tensor, max_length: int) -> list[list[int]]:
    """Most likely next token at every step, for a batch of prefixes (B, K, width); ids without start/end."""
    ids = torch.full((len(prefix), 1), decoder.start_id, dtype=torch.long, device=prefix.device)
    done = torch.zeros(len(prefix), dtype=torch.bool, device=prefix.device)
    cache: dict = {}  # keys and values of the positions already seen: each step runs one new position
    inputs = torch.cat([prefix, decoder.embed(ids)], dim=1)
    for _ in range(max_length):
        logits = decoder.logits(inputs, cache)[:, -1]
        chosen = torch.where(done, decoder.end_id, logits.argmax(-1))
        ids = torch.cat([ids, chosen[:, None]], dim=1)
        done |= chosen == decoder.end_id
        if done.all():
            break
        inputs = decoder.embed(chosen[:, None])
    return [_strip(row[1:], decoder.end_id) for row in ids.tolist()]


@torch.no_grad()
def beam_search(decoder, prefix: torch.Tensor, beam: int, max_length: int, length_penalty: float = 0.0) -> list[list[int]]:
    """The best caption found keeping `beam` partial captions per image, ranked by total log-probability
    divided by length**length_penalty (length counts the end token; 0: the total itself, which favours
    short captions; 1: the mean per token)."""
    batch, device = len(prefix), prefix.device
    prefix = prefix.repeat_interleave(beam, 0)
    ids = torch.full((batch * beam, 1), decoder.start_id, dtype=torch.long, device=device)
    scores = torch.full((batch, beam), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: keep one, or the top-k would be k copies of one caption
    lengths = torch.zeros(batch * beam, device=device)
    done = torch.zeros(batch * beam, dtype=torch.bool, device=device)
    cache: dict = {}
    inputs = torch.cat([prefix, decoder.embed(ids)], dim=1)
    for _ in range(max_length):
        log_probs = torch.log_softmax(decoder.logits(inputs, cache)[:, -1].float(), -1)
        vocabulary = log_probs.shape[-1]
        # A finished caption can only be continued by the end token, at no cost: its score stays fixed.
        log_probs[done] = float("-inf")
        log_probs[done, decoder.end_id] = 0.0
        total = (scores.view(-1, 1) + log_probs).view(batch, beam * vocabulary)
        grown = (lengths + (~done).float()).repeat_interleave(vocabulary).view(batch, beam * vocabulary)
        _, index = (total / grown ** length_penalty).topk(beam, dim=1)
        scores, lengths = total.gather(1, index), grown.gather(1, index).view(-1)
        rows = (torch.arange(batch, device=device)[:, None] * beam + index // vocabulary).view(-1)
        tokens = (index % vocabulary).view(-1)
        ids = torch.cat([ids[rows], tokens[:, None]], dim=1)
        done = done[rows] | (tokens == decoder.end_id)
        if done.all():
            break
        decoder.reorder(cache, rows)
        inputs = decoder.embed(tokens[:, None])
    best = torch.arange(batch, device=device) * beam + (scores / lengths.view(batch, beam) ** length_penalty).argmax(1)
    return [_strip(row[1:], decoder.end_id) for row in ids[best].tolist()]


@torch.no_grad()
def generate(model: Captioner, images: torch.Tensor, beam: int = 1, max_length: int | None = None,
             batch_size: int = 250, length_penalty: float = LENGTH_PENALTY) -> list[str]:
    """Captions for a batch of image inputs: greedy when beam is 1, else beam search; deterministic."""
    model.eval()
    device = next(model.parameters()).device
    max_length = max_length or model.config.max_length
    captions = []
    for start in range(0, len(images), batch_size):
        prefix = model.prefix(images[start:start + batch_size].to(device).float())
        found = (greedy(model.decoder, prefix, max_length) if beam == 1 else
                 beam_search(model.decoder, prefix, beam, max_length, length_penalty))
        captions += [model.decoder.decode(ids) for ids in found]
    return captions


# --- training ------------------------------------------------------------------------------------------

@dataclass
class CaptionResult:
    """A finished captioning run: where it is, its best epoch and validation metrics, its history."""

    out: Path
    config: CaptionConfig
    best_epoch: int
    best_metrics: dict
    history: list[dict] = field(default_factory=list)
    parameters: int = 0
    seconds: float = 0.0


def validate(model: Captioner, data: CaptionData, beam: int = 1, meteor: bool = False) -> dict:
    """Caption metrics of a model's captions for every image of a split."""
    from vlmcache.metrics.captions import score_captions

    return score_captions(generate(model, data.images, beam), data.references(), meteor=meteor)


def initial_captioner(config: CaptionConfig, image_dim: int, vocabulary: list[str] | None, token_count: int) -> Captioner:
    """The seeded model a run with this config starts from."""
    torch.manual_seed(config.seed)
    return Captioner(config, image_dim, vocabulary, token_count)


def train_captioner(
    cache: str | Path | FeatureCache,
    out: str | Path,
    config: CaptionConfig | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    device: str = "auto",
    on_epoch: Callable[[dict], None] | None = None,
) -> CaptionResult:
    """Train a captioner on a cache's training captions; checkpoints and metrics.jsonl go to `out`."""
    started = time.perf_counter()
    config = config or CaptionConfig()
    cache = cache if isinstance(cache, FeatureCache) else open_cache(cache)
    tokens = config.projector == "resampler"
    train_data = load_split(cache, config.train_split, tokens, config.image_sets)
    val_data = load_split(cache, config.val_split, tokens, config.image_sets)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise VlmcacheError(f"--out {out}: is a file; pass a folder for the run")
    if (out / "last.safetensors").exists() and not (resume or overwrite):
        raise VlmcacheError(f"{out}: already holds a run; pass --resume to continue it or --overwrite to start again")
    torch_device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                "cpu" if device == "auto" else device)
    vocabulary = build_vocabulary(train_data.captions, config.min_count) if config.decoder == "small" else None
    image_dim = train_data.images.shape[-1]
    token_count = train_data.images.shape[1] if tokens else 0
    model = initial_captioner(config, image_dim, vocabulary, token_count).to(torch_device)
    trainable = model.trainable()
    optimizer = torch.optim.AdamW([p for p in trainable.parameters() if p.requires_grad], lr=config.lr,
                                  weight_decay=config.weight_decay)
    sequences, lengths = _sequences(model.decoder, train_data.captions, config.max_words)
    steps_per_epoch = math.ceil(len(lengths) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(config, step, total_steps))
    generator = torch.Generator().manual_seed(config.seed)
    image_encoders = set_encoders(cache, "images", config.image_sets)
    meta = {"kind": "captioner", "config": json.loads(json.dumps(asdict(config))), "cache": str(cache.path.resolve()),
            "fingerprint": cache.fingerprint, "image_dim": image_dim, "text_dim": None, "token_count": token_count,
            "vocabulary": vocabulary, "image_encoder": image_encoders[0],
            "image_encoders": image_encoders,
            "parameters": count_parameters(trainable)}
    state = {"epoch": 0, "best_epoch": 0, "best_metrics": {}, "bad_epochs": 0, "history": [], "stopped_early": False}
    out.mkdir(parents=True, exist_ok=True)
    with FolderLock(out, "caption run"):
        remove_stale_temporaries(out)
        if resume and (out / "last.safetensors").exists():
            state = restore(out / "last.safetensors", meta, trainable, optimizer, scheduler, generator)
        write_metrics_log(out, state["history"])  # the log always matches the checkpoint, even after a kill

        sequences_t, lengths_t = torch.from_numpy(sequences), torch.from_numpy(lengths)
        owner = torch.from_numpy(train_data.caption_image)
        while state["epoch"] < config.epochs and not state["stopped_early"]:
            epoch_started = time.perf_counter()
            model.train()
            if not config.trains_lm:
                model.decoder.eval()  # a frozen LM runs as at inference (no dropout)
            total, batches = 0.0, 0
            for rows in length_batches(lengths, config.batch_size, generator):
                rows_t = torch.from_numpy(rows)
                longest = int(lengths_t[rows_t].max())
                loss = model.loss(train_data.images[owner[rows_t]].to(torch_device).float(),
                                  sequences_t[rows_t, :longest].to(torch_device), lengths_t[rows_t].to(torch_device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(trainable.parameters(), config.grad_clip)
                optimizer.step()
                scheduler.step()
                total, batches = total + float(loss.detach()), batches + 1
            state["epoch"] += 1
            train_seconds = time.perf_counter() - epoch_started
            metrics = validate(model, val_data)
            record = {"epoch": state["epoch"], "train_loss": total / max(1, batches), "lr": optimizer.param_groups[0]["lr"],
                      **{f"val_{name}": value for name, value in metrics.items() if value is not None},
                      "train_seconds": train_seconds, "seconds": time.perf_counter() - epoch_started}
            finish_epoch(out, meta, state, record, metrics, "cider", config.patience, trainable, optimizer, scheduler,
                         generator)
            if on_epoch is not None:
                on_epoch(record)
    return CaptionResult(out, config, state["best_epoch"], state["best_metrics"], state["history"],
                         meta["parameters"], time.perf_counter() - started)


# --- using a trained captioner -----------------------------------------------------------------------------

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


@dataclass
class CaptionReport:
    """Caption metrics per row (trained, baselines) on one split of one cache, and some example captions."""

    cache: Path
    split: str
    beam: int
    rows: dict[str, dict]
    examples: list[tuple[str, str, str]]  # (image id, generated caption, first reference)


def evaluate_captioner(checkpoint: str | Path, cache: str | Path | None = None, split: str | None = None,
                       beam: int = 5, nn_k: int = 5, with_baselines: bool = True) -> CaptionReport:
    """The trained captioner beside the nearest-neighbour and constant baselines on one split (default: test
    when the cache has it, else val), all scored against every reference caption of each image."""
    from vlmcache.metrics.captions import most_frequent_caption, nearest_neighbour_captions, score_captions

    CaptionDecoding(beam)  # refuses a beam out of range before any work
    model, meta = load_captioner(checkpoint)
    opened = open_cache(cache or meta["cache"])
    check_encoders_match(meta, opened, modalities=("images",))
    config = model.config
    split = split or opened.default_split()
    data = load_split(opened, split, config.projector == "resampler", config.image_sets)
    if data.images.shape[-1] != meta["image_dim"]:
        raise VlmcacheError(f"{opened.path}: image inputs are {data.images.shape[-1]}-d, the checkpoint expects "
                            f"{meta['image_dim']}-d")
    references = data.references()
    generated = generate(model, data.images, beam)
    name = "small decoder" if config.decoder == "small" else Path(config.decoder).name
    decoding = "greedy" if beam == 1 else f"beam {beam}, length penalty {LENGTH_PENALTY:g}"
    rows = {f"trained ({config.projector} → {name}, {decoding})":
            score_captions(generated, references)}
    if with_baselines:
        train_data = load_split(open_cache(meta["cache"]), config.train_split, False, config.image_sets)
        rows[f"nearest neighbour (consensus of {nn_k} images)"] = score_captions(nearest_neighbour_captions(
            train_data.pooled, train_data.texts, train_data.captions, train_data.caption_image, data.pooled, nn_k),
            references)
        rows["constant (most frequent caption)"] = score_captions([most_frequent_caption(train_data.captions)] *
                                                                  len(references), references)
    examples = [(data.image_ids[i], generated[i], references[i][0]) for i in range(min(5, len(generated)))]
    return CaptionReport(opened.path, split, beam, rows, examples)


class CaptionPredictor:
    """A captioner with its frozen image encoder, loaded once: captions for image files."""

    def __init__(self, checkpoint: str | Path):
        from vlmcache.encode import encoders

        self.model, self.meta = load_captioner(checkpoint)
        self.encoders = [encoders.image_encoder_from_provenance(provenance, "cpu")
                         for provenance in self.meta.get("image_encoders") or [self.meta["image_encoder"]]]

    def caption(self, images: list[str | Path], beam: int = 5) -> list[str]:
        """One caption per image file (the image encoder runs on each, as `extract` would)."""
        from vlmcache.data.datasets import ImageDecodeError, load_rgb

        CaptionDecoding(beam)  # refuses a beam out of range before any image is read

        tokens = self.model.config.projector == "resampler"
        inputs = []
        for image in images:
            if not Path(image).is_file():
                raise VlmcacheError(f"{image}: image file not found")
            try:
                picture = load_rgb(image)
            except ImageDecodeError as error:
                raise VlmcacheError(f"{image}: {error}") from None
            encoded = [encoder.encode(torch.from_numpy(encoder.preprocess(picture))[None], tokens)
                       for encoder in self.encoders]  # every feature set's encoder, concatenated as in the cache
            inputs.append(encoded[0].tokens if tokens else torch.cat([output.pooled for output in encoded], dim=1))
        return generate(self.model, torch.cat(inputs), beam)


def caption_images(checkpoint: str | Path, images: list[str | Path], beam: int = 5) -> list[str]:
    """Captions for image files with a trained captioner (see CaptionPredictor)."""
    CaptionDecoding(beam)  # before the captioner and its image encoder are loaded
    return CaptionPredictor(checkpoint).caption(images, beam)
