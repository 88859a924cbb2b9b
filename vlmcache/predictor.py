"""A trained checkpoint ready for interactive queries: rank labels for an image, search images by text.

Everything is loaded once and kept for the life of the process — projectors, the frozen text encoder
(on the first new prompt), the frozen image encoder (on the first uploaded image), the prompt store and
the searched split's image embeddings — so `serve` answers a new query with one small forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vlmcache import encoders
from vlmcache.checkpoint import checkpoint_caches, load_model
from vlmcache.config import TrainConfig
from vlmcache.datasets import ImageDecodeError, load_rgb
from vlmcache.errors import VlmcacheError
from vlmcache.evaluate import check_input_shapes, choose_beta, model_embeddings, refuse_text_tokens
from vlmcache.prompts import PromptStore, prompt_folder
from vlmcache.qbnorm import QueryBank, check_bank_split, query_bank
from vlmcache.search_index import SearchHit, check_query
from vlmcache.store import Split, load_features
from vlmcache.tokens import Tokens, embed_side, token_options

MAX_LABELS = 100  # labels per request: bounds the work one request can ask for


@dataclass
class RankedPrompt:
    """One row of the classify table."""

    rank: int
    prompt: str
    cosine: float
    probability: float


class Predictor:
    """A checkpoint loaded once for `classify`, `search` and the web page."""

    def __init__(self, checkpoint: str | Path):
        self.model, self.meta = load_model(checkpoint)
        self.config = TrainConfig.from_dict(self.meta["config"])
        refuse_text_tokens(self.config, "classify, search and serve")
        self.prompts = PromptStore(self.meta["text_encoder"], prompt_folder(self.meta))
        self._image_encoders: list[encoders.ImageEncoder] | None = None
        self._searched: dict[tuple, tuple[Split, torch.Tensor]] = {}
        self._banks: dict[tuple, QueryBank] = {}

    @property
    def image_encoders(self) -> list[encoders.ImageEncoder]:
        """The frozen image encoder of every feature set the run was trained on, loaded on first use and kept."""
        if self._image_encoders is None:
            recorded = self.meta.get("image_encoders") or [self.meta["image_encoder"]]
            self._image_encoders = [encoders.image_encoder_from_provenance(p, "cpu") for p in recorded]
        return self._image_encoders

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
        if (split, cache) not in self._searched:
            opened, _ = checkpoint_caches(self.meta, cache)
            chosen = opened.split(split or opened.default_split(), self.config.image_sets, with_texts=False,
                                  image_tokens=self.config.tokens)
            check_input_shapes(self.meta, chosen, opened.path, sides=("image",))
            embedded = embed_side(self.model, chosen, "image")
            self._searched[(split, cache)] = (chosen, embedded)
        return self._searched[(split, cache)]

    def image_bank(self, split: str | None = None, cache: str | Path | None = None) -> QueryBank:
        """The QB-Norm normaliser of the searched images: a bank of the run's training captions, β chosen on
        its validation split; computed once per split."""
        if (split, cache) not in self._banks:
            searched, image_emb = self.searchable(split, cache)
            check_bank_split(self.config.train_split, searched.name)
            opened, text_cache = checkpoint_caches(self.meta)
            sets = {"image_sets": self.config.image_sets, "text_sets": self.config.text_sets,
                    **token_options(self.config)}
            bank = load_features(opened, self.config.train_split, text_cache, **sets)
            val = load_features(opened, self.config.val_split, text_cache, **sets)
            beta, _, bank_texts = choose_beta(model_embeddings(self.model), bank, val)
            self._banks[(split, cache)] = query_bank(bank_texts, image_emb, beta)
        return self._banks[(split, cache)]

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

