"""A trained checkpoint ready for interactive queries: rank labels for an image, search images by text.

Everything is loaded once and kept for the life of the process — projectors, the frozen text encoder
(on the first new prompt), the frozen image encoder (on the first uploaded image), the prompt store and
the searched split's image embeddings — so `serve` answers a new query with one small forward pass.
"""

from __future__ import annotations

import importlib.util
import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from vlmcache.align.config import TrainConfig
from vlmcache.align.inputs import check_input_shapes, embed_side, model_embeddings, refuse_text_tokens, token_options
from vlmcache.align.load import checkpoint_caches, load_model
from vlmcache.app.search_index import SearchHit, check_query, checkpoint_file, index_path, index_prefix
from vlmcache.cache.store import Split, load_features
from vlmcache.cache.tokens import Tokens
from vlmcache.data.datasets import ImageDecodeError, load_rgb
from vlmcache.encode import encoders
from vlmcache.encode.prompts import PromptStore, prompt_folder
from vlmcache.errors import VlmcacheError
from vlmcache.files import write_sealed_safetensors
from vlmcache.metrics.qbnorm import QueryBank, check_bank_split, query_bank
from vlmcache.metrics.retrieval import choose_beta

MAX_LABELS = 100  # labels per request: bounds the work one request can ask for
T = TypeVar("T")

# The index holds the text projector as ONNX: writing it needs onnx, reading it onnxruntime (the `fast` extra).
ONNX_AVAILABLE = all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime"))


@dataclass
class RankedPrompt:
    """One row of the classify table."""

    rank: int
    prompt: str
    cosine: float
    probability: float


class Predictor:
    """A checkpoint loaded once for `classify`, `search` and the web page.

    Safe to share between threads (the web page's workers): each lazily loaded part is made once, under a
    lock, however many requests ask for it at the same moment.
    """

    def __init__(self, checkpoint: str | Path):
        self.model, self.meta = load_model(checkpoint)
        self.config = TrainConfig.from_dict(self.meta["config"])
        refuse_text_tokens(self.config, "classify, search and serve")
        self.prompts = PromptStore(self.meta["text_encoder"], prompt_folder(self.meta))
        self._loaded: dict[tuple, object] = {}
        # Re-entrant: making the QB-Norm bank needs the searched split, itself loaded through `_once`.
        self._lock = threading.RLock()

    def _once(self, key: tuple, make: Callable[[], T]) -> T:
        """`make()` the first time `key` is asked for, and the same object ever after, whichever thread asks."""
        if key not in self._loaded:  # loaded parts are never removed, so a hit needs no lock
            with self._lock:
                if key not in self._loaded:
                    self._loaded[key] = make()
        return self._loaded[key]

    @property
    def image_encoders(self) -> list[encoders.ImageEncoder]:
        """The frozen image encoder of every feature set the run was trained on, loaded on first use and kept."""
        recorded = self.meta.get("image_encoders") or [self.meta["image_encoder"]]
        return self._once(("image encoders",), lambda: [encoders.image_encoder_from_provenance(p, "cpu")
                                                        for p in recorded])

    def share_image_encoders(self, loaded: list[encoders.ImageEncoder], recorded: list[dict]) -> None:
        """Use image encoders another model already loaded (a captioner on the same page) when they are
        exactly the ones this run recorded: one copy in memory, loaded once."""
        if recorded == (self.meta.get("image_encoders") or [self.meta["image_encoder"]]):
            self._image_encoders = loaded

    def image_features(self, image: str | Path) -> torch.Tensor | Tokens:
        """One image file -> its features as the run saw them: every set's encoder, concatenated (1, dim), or
        the encoder's token states when the run's image side reads tokens."""
        try:
            picture = load_rgb(image)
        except ImageDecodeError as error:
            raise VlmcacheError(f"{image}: {error}") from None
        encoded = [encoder.encode(torch.from_numpy(encoder.preprocess(picture))[None], tokens=self.config.tokens)
                   for encoder in self.image_encoders]
        if self.config.tokens:  # one feature set (store.split refuses token projectors on several)
            return Tokens(encoded[0].tokens, encoded[0].mask)
        return torch.cat([output.pooled for output in encoded], dim=1)

    @torch.no_grad()
    def embed_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Prompts → unit vectors in the shared space (frozen text features from the prompt store)."""
        return self.model.embed_texts(torch.from_numpy(self.prompts.encode(prompts)))

    def rank_labels(self, image: str | Path, labels: list[str], template: str = "{}") -> tuple[list[RankedPrompt], float]:
        """Rank prompts for one image file. Returns the rows and the (learned) softmax scale used."""
        labels = [label.strip() for label in labels if label.strip()]
        if len(labels) < 2:
            raise VlmcacheError("--labels: give at least two labels, comma-separated (or --labels-file, one per line)")
        if len(labels) > MAX_LABELS:
            raise VlmcacheError(f"--labels: {len(labels)} labels; give at most {MAX_LABELS}")
        prompts = [apply_template(template, label) for label in labels]
        features = self.image_features(image)
        with torch.no_grad():
            image_emb = self.model.embed_images(features)
        cosine = (image_emb @ self.embed_prompts(prompts).T)[0]
        scale = self.model.loss.scale()
        probability = torch.softmax(scale * cosine, dim=0)
        order = torch.argsort(cosine, descending=True, stable=True)
        rows = [RankedPrompt(rank + 1, prompts[index], float(cosine[index]), float(probability[index]))
                for rank, index in enumerate(order.tolist())]
        return rows, scale

    def searchable(self, split: str | None = None, cache: str | Path | None = None) -> tuple[Split, torch.Tensor]:
        """(split data, unit image embeddings) of the cached split searched; computed once per split."""

        def make() -> tuple[Split, torch.Tensor]:
            opened, _ = checkpoint_caches(self.meta, cache)
            chosen = opened.split(split or opened.default_split(), self.config.image_sets, with_texts=False,
                                  image_tokens=self.config.tokens)
            check_input_shapes(self.meta, chosen, opened.path, sides=("image",))
            return chosen, embed_side(self.model, chosen, "image")

        return self._once(("searched", split, cache), make)

    def image_bank(self, split: str | None = None, cache: str | Path | None = None) -> QueryBank:
        """The QB-Norm normaliser of the searched images: a bank of the run's training captions, β chosen on
        its validation split; computed once per split."""

        def make() -> QueryBank:
            searched, image_emb = self.searchable(split, cache)
            check_bank_split(self.config.train_split, searched.name)
            opened, text_cache = checkpoint_caches(self.meta)
            sets = {"image_sets": self.config.image_sets, "text_sets": self.config.text_sets,
                    **token_options(self.config)}
            bank = load_features(opened, self.config.train_split, text_cache, **sets)
            val = load_features(opened, self.config.val_split, text_cache, **sets)
            beta, _, bank_texts = choose_beta(model_embeddings(self.model), bank, val)
            return query_bank(bank_texts, image_emb, beta)

        return self._once(("bank", split, cache), make)

    def search(self, query: str, top: int = 5, split: str | None = None,
               cache: str | Path | None = None, qbnorm: bool = False) -> list[SearchHit]:
        """The `top` cached images of a split closest to a text query in the trained shared space
        (rescored by QB-Norm with `qbnorm`: scores are then log inverted-softmax values, not cosines)."""
        check_query(query, top)
        chosen, image_emb = self.searchable(split, cache)
        scores = self.embed_prompts([query]) @ image_emb.T
        scores = (self.image_bank(split, cache).rescore(scores) if qbnorm else scores)[0]
        best = torch.topk(scores, min(top, len(scores)))
        return [SearchHit(rank + 1, float(score), chosen.image_ids[index], chosen.image_paths[index], index)
                for rank, (score, index) in enumerate(zip(best.values.tolist(), best.indices.tolist(), strict=True))]


def apply_template(template: str, label: str) -> str:
    """`template` with {} replaced by the label; a template without exactly one {} is refused."""
    if template.count("{}") != 1 or template.replace("{}", "").count("{") or template.replace("{}", "").count("}"):
        raise VlmcacheError(f"--template {template!r}: use exactly one {{}} where the label goes, e.g. 'a photo of {{}}.'")
    return template.replace("{}", label)


def classify_image(checkpoint: str | Path, image: str | Path, labels: list[str],
                   template: str = "{}") -> tuple[list[RankedPrompt], float]:
    """Rank prompts for one image file with a checkpoint (runs the frozen image encoder on it).

    Returns the ranked rows and the softmax scale used (the checkpoint's learned logit scale).
    """
    return Predictor(checkpoint).rank_labels(image, labels, template)


def write_search_index(predictor: Predictor, checkpoint: str | Path, split: str | None = None,
                cache: str | Path | None = None) -> Path | None:
    """Keep the index of a split for later searches; returns its path (None where it cannot be written)."""
    import torch
    from safetensors.numpy import save

    from vlmcache.align.model import TextEmbedding

    path = checkpoint_file(checkpoint)
    index = index_path(path, predictor.meta, split, cache)
    several_text_sets = len(predictor.meta.get("text_encoders") or []) > 1
    if index is None or several_text_sets or not os.access(path.parent, os.W_OK) or not ONNX_AVAILABLE:
        return None  # the index only speeds searches up: without it they take the PyTorch path
    chosen, image_emb = predictor.searchable(split, cache)
    text_dim = int(predictor.meta["text_dim"])
    exported = encoders.onnx_export(TextEmbedding(predictor.model).eval(), (torch.zeros(2, text_dim),),
                                    input_names=["features"], output_names=["embedding"],
                                    dynamic_axes={"features": {0: "rows"}})
    index.parent.mkdir(exist_ok=True)
    for stale in index.parent.glob(f"{index_prefix(path, split)}*.safetensors"):  # of older weights or caches
        stale.unlink(missing_ok=True)
    write_sealed_safetensors(index, save(
        {"images": image_emb.numpy().astype(np.float32), "text_projector": np.frombuffer(exported, np.uint8)},
        metadata={"split": chosen.name, "image_ids": json.dumps(list(chosen.image_ids)),
                  "image_paths": json.dumps(list(chosen.image_paths))}))
    return index

