"""Evaluating a checkpoint: retrieval on a split beside its baselines (untrained, CCA, ASIF, QB-Norm rows),
and zero-shot classification on a labelled image-folder cache. The metrics themselves are in
vlmcache.metrics.retrieval.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlmcache.align.config import TrainConfig
from vlmcache.align.inputs import (
    check_input_shapes,
    embed_side,
    model_embeddings,
    model_ranks,
    refuse_text_tokens,
    token_options,
    trained_row,
)
from vlmcache.align.load import check_encoders_match, checkpoint_caches, load_model
from vlmcache.align.model import initial_model
from vlmcache.cache.carve import carve
from vlmcache.cache.store import load_features, open_cache
from vlmcache.encode.prompts import PromptStore, prompt_folder
from vlmcache.errors import VlmcacheError
from vlmcache.files import read_json_file
from vlmcache.metrics import baselines
from vlmcache.metrics.baselines import CCA_ROW, baseline_ranks
from vlmcache.metrics.qbnorm import QBNORM_SUFFIX, check_bank_split
from vlmcache.metrics.retrieval import (
    DEFAULT_TEMPLATES,
    ENSEMBLE_TEMPLATES,
    UNTRAINED_ROW,
    class_embeddings,
    qbnorm_row,
    zero_shot_metrics,
)
from vlmcache.metrics.stats import RESAMPLES, mark_best
from vlmcache.run.ranks import Ranked


def clean_class_name(folder: str) -> str:
    """A folder name as words for a prompt: 'car_side' → 'car side', 'Faces_easy' → 'faces easy'."""
    words = re.sub(r"([a-z])([A-Z])", r"\1 \2", folder).replace("_", " ").replace("-", " ").split()
    return " ".join(word if word.isupper() and len(word) > 1 else word.lower() for word in words)


@dataclass
class EvalReport:
    """Retrieval metrics per model on one split of one cache, with each model's per-query ranks and, per
    row, its 95% intervals and comparison with the best row (`statistics[row]`: keys <metric>_ci_low,
    _ci_high, _p_vs_best, _mark; see vlmcache.metrics.stats.mark_best)."""

    cache: Path
    split: str
    rows: dict[str, dict]
    ranked: dict[str, Ranked] = field(default_factory=dict)
    statistics: dict[str, dict] = field(default_factory=dict)
    selected_on: str = "val"  # where the best epoch (and QB-Norm's β) was chosen: a split or train:N

    @property
    def items(self) -> str | None:
        """The fingerprint of the evaluated items (see vlmcache.run.ranks.items_key)."""
        return next(iter(self.ranked.values())).items if self.ranked else None


def table_statistics(ranked: dict[str, Ranked], resamples: int = RESAMPLES) -> dict[str, dict]:
    """{row: its intervals, Holm-adjusted p-value against the best row and mark, per metric} of models ranked
    on the same split."""
    table = mark_best([row.hits() for row in ranked.values()], resamples)
    return {name: table.row(index) for index, name in enumerate(ranked)}


def evaluate_checkpoint(checkpoint: str | Path, split: str | None = None, cache: str | Path | None = None,
                        with_baselines: bool = True, qbnorm: bool = True, qbnorm_bank: str | None = None) -> EvalReport:
    """Retrieval metrics on a split for the trained projectors, the untrained ones (same seed), and the
    training-free baselines (CCA, ASIF), always fitted on the train split of the run's own caches.

    With `qbnorm`, the trained model and CCA again with QB-Norm (rows named "... + QB-Norm"): the bank is
    the `qbnorm_bank` split's queries (default: the run's train split; never the evaluated split), β
    chosen where the run chose its best epoch (its validation split, or with `select_on` train:N the
    carved training images, which then leave the bank).
    """
    model, meta = load_model(checkpoint)
    opened, text_cache = checkpoint_caches(meta, cache)
    config = TrainConfig.from_dict(meta["config"])
    split = split or opened.default_split()
    bank_split = qbnorm_bank or config.train_split
    if qbnorm:
        check_bank_split(bank_split, split)
    sets = {"image_sets": config.image_sets, "text_sets": config.text_sets, **token_options(config)}
    evaluated = load_features(opened, split, text_cache, **sets)
    check_input_shapes(meta, evaluated, opened.path)
    untrained = initial_model(config, meta["image_dim"], meta["text_dim"], meta.get("image_tokens"),
                              meta.get("text_tokens"))
    if config.standardize:  # the same standardised inputs, so the baseline differs only in the learned weights
        untrained.load_state_dict({k: v for k, v in model.state_dict().items() if k.endswith(("_shift", "_scale"))},
                                  strict=False)
    ranks = {trained_row(config): model_ranks(model, evaluated), UNTRAINED_ROW: model_ranks(untrained, evaluated)}
    extra: dict[str, dict] = {}
    train_cache, train_text_cache = checkpoint_caches(meta) if cache is not None else (opened, text_cache)
    train = (load_features(train_cache, config.train_split, train_text_cache, **sets)
             if (with_baselines or qbnorm) and config.train_split in train_cache.splits else None)
    if with_baselines and train is not None:
        ranks.update(baseline_ranks(train, evaluated, config.dim))
    if qbnorm:
        bank = train if bank_split == config.train_split else load_features(train_cache, bank_split, train_text_cache, **sets)
        selection, carved = config.selection
        if carved and train is not None:  # the bank never holds the queries β is chosen on
            rest, val = carve(train, carved)
            bank = rest if bank_split == config.train_split else bank
        else:
            val = evaluated if split == selection else load_features(train_cache, selection, train_text_cache, **sets)
        embedders = {trained_row(config): model_embeddings(model)}
        if with_baselines and train is not None:
            embedders[CCA_ROW] = lambda s: baselines.cca_embeddings(train, s, config.dim)
        for name, embed in embedders.items():
            beta, ranks[name + QBNORM_SUFFIX] = qbnorm_row(embed, bank, val, evaluated)
            extra[name + QBNORM_SUFFIX] = {"qbnorm_beta": beta}
    ranked = {name: Ranked.of(row, evaluated) for name, row in ranks.items()}
    rows = {name: {**row.metrics(), **extra.get(name, {})} for name, row in ranked.items()}
    return EvalReport(opened.path, split, rows, ranked, table_statistics(ranked), config.select_on or config.val_split)


def read_class_names(path: str | Path | None) -> dict[str, str]:
    """A JSON object mapping class folder names to the words used in prompts ({} without a file)."""
    if path is None:
        return {}
    hint = 'give a JSON object {"folder_name": "words for the prompt"}'
    names = read_json_file(path, "--class-names file", hint, shape={str: str})
    if not all(words.strip() for words in names.values()):
        raise VlmcacheError(f"{path}: not a valid --class-names file (a class's words are empty); {hint}")
    return names


def zero_shot(checkpoint: str | Path, folder_cache: str | Path, ensemble: bool = False,
              split: str | None = None, class_names: dict[str, str] | None = None) -> dict[str, dict]:
    """Zero-shot accuracy on a labelled image-folder cache, trained vs untrained projectors.

    Class folder names are cleaned into words ('car_side' → 'car side'), or taken from `class_names`;
    they become prompts "a photo of a {}." (or an 8-template ensemble with `ensemble=True`).
    """
    model, meta = load_model(checkpoint)
    opened = open_cache(folder_cache)
    if not opened.classes:
        raise VlmcacheError(f"{opened.path}: has no class labels; extract a labelled image folder (root/<class>/*.jpg)")
    check_encoders_match(meta, opened, modalities=("images",))
    config = TrainConfig.from_dict(meta["config"])
    refuse_text_tokens(config, "eval --zero-shot")
    labelled = opened.split(split or opened.splits[0], config.image_sets, image_tokens=config.tokens)
    check_input_shapes(meta, labelled, opened.path, sides=("image",))
    words = [(class_names or {}).get(name) or clean_class_name(name) for name in opened.classes]
    templates = ENSEMBLE_TEMPLATES if ensemble else DEFAULT_TEMPLATES
    prompts = PromptStore(meta["text_encoder"], prompt_folder(meta))
    results = {}
    for name, candidate in (("trained", model),
                            (UNTRAINED_ROW, initial_model(config, meta["image_dim"], meta["text_dim"],
                                                          meta.get("image_tokens")).eval())):
        with torch.no_grad():
            class_emb = class_embeddings(lambda texts, m=candidate: m.embed_texts(torch.from_numpy(prompts.encode(texts))),
                                         words, templates)
            image_emb = embed_side(candidate, labelled, "image")
        results[name] = zero_shot_metrics(image_emb, labelled.image_labels, class_emb, opened.classes)
    return results

