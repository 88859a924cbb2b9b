"""Using a trained checkpoint: retrieval on a cached split beside its baselines, zero-shot accuracy on
a labelled-folder cache, ranking prompts for one image, and text search over cached images.

Text that is not in a cache (prompts, queries) is encoded by the frozen text encoder the cache recorded
in its provenance, and kept in `<cache>/prompt-features.safetensors` so each prompt is encoded once.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vlmcache import baselines, encoders
from vlmcache.datasets import ImageDecodeError, load_rgb
from vlmcache.errors import VlmcacheError
from vlmcache.evaluate import DEFAULT_TEMPLATES, ENSEMBLE_TEMPLATES, class_embeddings, zero_shot_metrics
from vlmcache.store import FeatureCache, open_cache
from vlmcache.train import AlignmentModel, TrainConfig, evaluate_model, initial_model, load_features, load_model


def _checkpoint_cache(meta: dict, cache: str | Path | None) -> FeatureCache:
    opened = open_cache(cache or meta["cache"])
    if opened.fingerprint != meta["fingerprint"] and cache is None:
        raise VlmcacheError(f"{opened.path}: changed since the checkpoint was trained (dataset fingerprint differs)")
    check_encoders_match(meta, opened)
    return opened


def check_encoders_match(meta: dict, cache: FeatureCache, modalities=("images", "texts")) -> None:
    """Refuse a cache whose features come from other encoders than the checkpoint was trained on."""
    for modality, key in (("images", "image_encoder"), ("texts", "text_encoder")):
        if modality in modalities and cache.provenance[modality]["encoder"] != meta[key]:
            raise VlmcacheError(f"{cache.path}: its {modality} features come from "
                                f"{encoders.describe(cache.provenance[modality]['encoder'])}, but the checkpoint was "
                                f"trained on {encoders.describe(meta[key])}; use a cache made with the same encoders")


def default_split(cache: FeatureCache) -> str:
    """'test' when the cache has it (the Karpathy protocol), else 'val'."""
    return "test" if "test" in cache.splits else "val"


@dataclass
class EvalReport:
    """Retrieval metrics per model on one split of one cache."""

    cache: Path
    split: str
    rows: dict[str, dict]


def evaluate_checkpoint(checkpoint: str | Path, split: str | None = None, cache: str | Path | None = None,
                        with_baselines: bool = True) -> EvalReport:
    """Retrieval metrics on a split for the trained projectors, the untrained ones (same seed), and the
    training-free baselines (CCA, ASIF) fitted on the cache's train split."""
    model, meta = load_model(checkpoint)
    opened = _checkpoint_cache(meta, cache)
    config = TrainConfig.from_dict(meta["config"])
    split = split or default_split(opened)
    text_cache = open_cache(meta["text_cache"]) if meta.get("text_cache") else None
    evaluated = load_features(opened, split, text_cache)
    _check_dims(meta, evaluated.image_features.shape[1], evaluated.text_features.shape[1], opened)
    rows = {f"trained ({config.projector} + {config.loss})": evaluate_model(model, evaluated),
            "untrained (same init)": evaluate_model(initial_model(config, meta["image_dim"], meta["text_dim"]), evaluated)}
    if with_baselines and config.train_split in opened.splits:
        train_split = load_features(opened, config.train_split, text_cache)
        rows["CCA (closed form)"] = baselines.cca_metrics(train_split, evaluated, config.dim)
        rows["ASIF (no training)"] = baselines.asif_metrics(train_split, evaluated)
    return EvalReport(opened.path, split, rows)


def _check_dims(meta: dict, image_dim: int, text_dim: int, cache: FeatureCache) -> None:
    if (image_dim, text_dim) != (meta["image_dim"], meta["text_dim"]):
        raise VlmcacheError(f"{cache.path}: features are {image_dim}/{text_dim}-d but the checkpoint expects "
                            f"{meta['image_dim']}/{meta['text_dim']}-d")


def encode_prompts(prompts: list[str], text_provenance: dict, store: Path | None = None) -> torch.Tensor:
    """Frozen text features of prompts, from `store` (a safetensors file) when already encoded there."""
    def key(prompt: str) -> str:
        return hashlib.sha256((text_provenance["weights_sha256"] + text_provenance["pooling"] +
                               str(text_provenance["max_length"]) + "\0" + prompt).encode()).hexdigest()

    known = load_file(str(store)) if store is not None and store.exists() else {}
    missing = [prompt for prompt in dict.fromkeys(prompts) if key(prompt) not in known]
    if missing:
        encoder = encoders.text_encoder_from_provenance(text_provenance, "cpu")
        features = encoder.encode(missing).pooled
        known.update({key(prompt): row.clone() for prompt, row in zip(missing, features, strict=True)})
        if store is not None and os.access(store.parent, os.W_OK):
            temporary = store.with_name(f".{store.name}.tmp-{os.getpid()}")
            save_file(known, str(temporary))
            os.replace(temporary, store)
    return torch.stack([known[key(prompt)] for prompt in prompts])


def _prompt_store(meta: dict) -> Path | None:
    cache_dir = Path(meta.get("text_cache") or meta["cache"])
    return cache_dir / "prompt-features.safetensors" if cache_dir.is_dir() else None


def _text_embedder(model: AlignmentModel, meta: dict):
    def embed(prompts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            return model.embed_texts(encode_prompts(prompts, meta["text_encoder"], _prompt_store(meta)))

    return embed


def zero_shot(checkpoint: str | Path, folder_cache: str | Path, ensemble: bool = False,
              split: str | None = None) -> dict[str, dict]:
    """Zero-shot accuracy on a labelled image-folder cache, trained vs untrained projectors.

    Class names become prompts "a photo of a {}." (or an 8-template ensemble with `ensemble=True`).
    """
    model, meta = load_model(checkpoint)
    opened = open_cache(folder_cache)
    if not opened.classes:
        raise VlmcacheError(f"{opened.path}: has no class labels; extract a labelled image folder (root/<class>/*.jpg)")
    check_encoders_match(meta, opened, modalities=("images",))
    labelled = opened.split(split or opened.splits[0])
    classnames = [name.replace("_", " ") for name in opened.classes]
    templates = ENSEMBLE_TEMPLATES if ensemble else DEFAULT_TEMPLATES
    config = TrainConfig.from_dict(meta["config"])
    results = {}
    for name, candidate in (("trained", model),
                            ("untrained (same init)", initial_model(config, meta["image_dim"], meta["text_dim"]).eval())):
        class_emb = class_embeddings(_text_embedder(candidate, meta), classnames, templates)
        with torch.no_grad():
            image_emb = candidate.embed_images(torch.from_numpy(labelled.image_features))
        results[name] = zero_shot_metrics(image_emb, labelled.image_labels, class_emb, opened.classes)
    return results


@dataclass
class RankedPrompt:
    """One row of the classify table."""

    rank: int
    prompt: str
    cosine: float
    probability: float


@dataclass
class SearchHit:
    """One row of a text→image search."""

    rank: int
    score: float
    image_id: str
    path: str
    row: int  # the image's row in the searched split


class Predictor:
    """A trained checkpoint ready for queries, loaded once: projectors, the frozen image encoder (loaded
    on first use) and the prompt store. Used by `classify`, `search` and the web page."""

    def __init__(self, checkpoint: str | Path):
        self.model, self.meta = load_model(checkpoint)
        self._image_encoder = None
        self._search_split: tuple | None = None

    @property
    def image_encoder(self) -> encoders.ImageEncoder:
        if self._image_encoder is None:
            self._image_encoder = encoders.image_encoder_from_provenance(self.meta["image_encoder"], "cpu")
        return self._image_encoder

    def rank_labels(self, image: str | Path, labels: list[str], template: str = "{}") -> tuple[list[RankedPrompt], float]:
        """Rank prompts for one image file. Returns the rows and the (learned) softmax scale used."""
        labels = [label.strip() for label in labels if label.strip()]
        if len(labels) < 2:
            raise VlmcacheError("--labels: give at least two labels, comma-separated (or --labels-file, one per line)")
        try:
            pixels = torch.from_numpy(self.image_encoder.preprocess(load_rgb(image)))[None]
        except ImageDecodeError as error:
            raise VlmcacheError(f"{image}: {error}") from None
        prompts = [template.format(label) for label in labels]
        with torch.no_grad():
            image_emb = self.model.embed_images(self.image_encoder.encode(pixels).pooled)
            text_emb = _text_embedder(self.model, self.meta)(prompts)
        cosine = (image_emb @ text_emb.T)[0]
        scale = self.model.loss.scale()
        probability = torch.softmax(scale * cosine, dim=0)
        order = torch.argsort(cosine, descending=True, stable=True)
        rows = [RankedPrompt(rank + 1, prompts[index], float(cosine[index]), float(probability[index]))
                for rank, index in enumerate(order.tolist())]
        return rows, scale

    def searchable(self, split: str | None = None, cache: str | Path | None = None):
        """(split data, unit image embeddings) of the cached split searched; computed once."""
        if self._search_split is None or self._search_split[0] != (split, cache):
            opened = _checkpoint_cache(self.meta, cache)
            chosen = opened.split(split or default_split(opened))
            with torch.no_grad():
                embedded = self.model.embed_images(torch.from_numpy(chosen.image_features))
            self._search_split = ((split, cache), chosen, embedded)
        return self._search_split[1], self._search_split[2]

    def search(self, query: str, top: int = 5, split: str | None = None,
               cache: str | Path | None = None) -> list[SearchHit]:
        """The `top` cached images of a split closest to a text query in the trained shared space."""
        if not query.strip():
            raise VlmcacheError("the search query is empty; type what the image should show")
        chosen, image_emb = self.searchable(split, cache)
        with torch.no_grad():
            query_emb = _text_embedder(self.model, self.meta)([query])
        scores = (query_emb @ image_emb.T)[0]
        best = torch.topk(scores, min(top, len(scores)))
        return [SearchHit(rank + 1, float(score), chosen.image_ids[index], chosen.image_paths[index], index)
                for rank, (score, index) in enumerate(zip(best.values.tolist(), best.indices.tolist(), strict=True))]


def classify_image(checkpoint: str | Path, image: str | Path, labels: list[str],
                   template: str = "{}") -> tuple[list[RankedPrompt], float]:
    """Rank prompts for one image file with a checkpoint (runs the frozen image encoder on it).

    Returns the ranked rows and the softmax scale used (the checkpoint's learned logit scale).
    """
    return Predictor(checkpoint).rank_labels(image, labels, template)


def search_images(checkpoint: str | Path, query: str, top: int = 5, split: str | None = None,
                  cache: str | Path | None = None) -> list[SearchHit]:
    """The `top` cached images of a split closest to a text query (see Predictor.search)."""
    return Predictor(checkpoint).search(query, top, split, cache)
