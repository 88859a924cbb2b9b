"""Retrieval and zero-shot metrics, and the one metric schema (keys and labels of every table).

Retrieval with several captions per image (Flickr/COCO protocol, as CLIP_benchmark):
- image→text R@K: an image scores if ANY of its captions is among its top-K texts;
- text→image R@K: a caption scores if ITS image is among its top-K images.
Ranks are exact and ties are broken against the query: an item scoring exactly as high as the best
correct one counts as ranked above it. Non-finite similarities (NaN or inf embeddings) count as the
worst possible score. So a degenerate model gets chance-level recall or worse, never 100%. Similarities
are computed in chunks, so the full images×captions matrix never exists in memory.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from vlmcache.cache.store import Split
from vlmcache.metrics.qbnorm import BETAS, QueryBank, query_bank

# The metric schema: keys (JSON, metrics.jsonl with a "val_" prefix, ablation.csv) and their column labels.
KS = (1, 5, 10)


RECALL_KEYS = tuple(f"{direction}_r{k}" for direction in ("i2t", "t2i") for k in KS)


RETRIEVAL_KEYS = (*RECALL_KEYS, "mean_recall")


RETRIEVAL_LABELS = ("i→t R@1", "R@5", "R@10", "t→i R@1", "R@5", "R@10", "mean")


MEDIAN_RANK_KEYS = ("i2t_median_rank", "t2i_median_rank")


MEDIAN_RANK_LABELS = ("medR i→t", "medR t→i")


ZERO_SHOT_KEYS = ("top1", "top5", "mean_per_class")


ZERO_SHOT_LABELS = ("top-1 %", "top-5 %", "mean per-class %")


# Row names of the baselines that sit beside every trained number.
UNTRAINED_ROW = "untrained (same init)"


DEFAULT_TEMPLATES = ("a photo of a {}.",)


# A short ensemble in the spirit of CLIP's ImageNet prompts, for when one template is too brittle.
ENSEMBLE_TEMPLATES = (
    "a photo of a {}.", "a blurry photo of a {}.", "a photo of the {}.", "a close-up photo of a {}.",
    "a bright photo of a {}.", "a photo of a small {}.", "a photo of a big {}.", "a low resolution photo of a {}.",
)


SCORE_BUDGET = 1 << 24  # similarity entries per chunk (64 MB of float32): memory stays bounded at any size
TILE = (2048, 8192)  # (images, captions) per score tile: 64 MB of float32, large enough to run at matmul speed

def _as_tensor(array) -> torch.Tensor:
    return array if isinstance(array, torch.Tensor) else torch.from_numpy(np.asarray(array))


def _finite_or_worst(scores: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(scores), scores, torch.tensor(-torch.inf))


def retrieval_ranks(image_emb, text_emb, caption_image, chunk_size: int = 1024, text_bank: QueryBank | None = None,
                    image_bank: QueryBank | None = None) -> tuple[np.ndarray, np.ndarray]:
    """1-based ranks: (best rank of each image's captions, rank of each caption's image).

    Images with no caption get rank 0 (they cannot be scored and are left out of image→text recall).
    Embeddings are compared by dot product; pass L2-normalised ones for cosine similarity. Queries go
    in chunks of at most `chunk_size` rows, fewer when the other side is large (SCORE_BUDGET). With
    `text_bank` (the captions' QB-Norm normaliser from a bank of image queries) image→text scores are
    rescored by QB-Norm, and with `image_bank` text→image scores (see vlmcache.metrics.qbnorm).
    Without QB-Norm (whose rescoring needs whole rows) the ranks come from `tiled_ranks`, in one pass.
    """
    images, texts = _as_tensor(image_emb).float(), _as_tensor(text_emb).float()
    owner = _as_tensor(caption_image).long()
    if text_bank is None and image_bank is None:
        return tiled_ranks(images, texts, owner)
    image_ranks = np.zeros(len(images), dtype=np.int64)
    image_chunk = max(1, min(chunk_size, SCORE_BUDGET // max(1, len(texts))))
    for start in range(0, len(images), image_chunk):
        rows = torch.arange(start, min(start + image_chunk, len(images)))
        scores = images[rows] @ texts.T  # (chunk, captions)
        scores = _finite_or_worst(scores if text_bank is None else text_bank.rescore(scores))
        correct = owner[None, :] == rows[:, None]
        best_correct = torch.where(correct, scores, torch.tensor(-torch.inf)).max(dim=1).values
        above = ((scores >= best_correct[:, None]) & ~correct).sum(dim=1)
        has_caption = correct.any(dim=1)
        image_ranks[rows.numpy()] = torch.where(has_caption, above + 1, torch.zeros_like(above)).numpy()
    text_ranks = np.zeros(len(texts), dtype=np.int64)
    text_chunk = max(1, min(chunk_size, SCORE_BUDGET // max(1, len(images))))
    for start in range(0, len(texts), text_chunk):
        rows = torch.arange(start, min(start + text_chunk, len(texts)))
        scores = texts[rows] @ images.T  # (chunk, images)
        scores = _finite_or_worst(scores if image_bank is None else image_bank.rescore(scores))
        correct_score = scores.gather(1, owner[rows, None])
        # (scores >= correct) counts the correct image itself, which makes the count a 1-based rank.
        text_ranks[rows.numpy()] = (scores >= correct_score).sum(dim=1).numpy()
    return image_ranks, text_ranks


def tiled_ranks(images: torch.Tensor, texts: torch.Tensor, owner: torch.Tensor,
                tile: tuple[int, int] = TILE) -> tuple[np.ndarray, np.ndarray]:
    """`retrieval_ranks` without QB-Norm, computing each image×caption score once, in tiles.

    Both directions come from the same tiles: a caption's rank counts the images scoring at least its
    correct score, an image's rank counts the other images' captions scoring at least its best correct
    one. Those thresholds are taken first from the tiles that hold the correct pairs, computed with the
    same shapes and inputs as in the counting pass, so every comparison is between identically computed
    numbers and ties still count against the query. Memory is a few tiles, whatever the sizes.
    """
    rows, cols = tile
    correct_score = torch.full((len(texts),), -torch.inf)
    best_correct = torch.full((len(images),), -torch.inf)
    # Finite inputs of moderate size cannot give a non-finite score: then the per-tile check (a full pass) is skipped.
    largest = max((float(x.abs().max()) for x in (images, texts) if x.numel()), default=0.0)
    finite = all(bool(torch.isfinite(x).all()) for x in (images, texts)) and largest ** 2 * images.shape[-1] < 1e37

    def scores(i: int, j: int) -> torch.Tensor:
        product = images[i:i + rows] @ texts[j:j + cols].T
        return product if finite else _finite_or_worst(product)

    column_tiles = max(1, -(-len(texts) // cols))
    holding = torch.unique((owner // rows) * column_tiles + torch.arange(len(owner)) // cols)  # tiles with correct pairs
    diagonal = [(int(key) // column_tiles * rows, int(key) % column_tiles * cols) for key in holding]
    for i, j in diagonal:
        tile_scores = scores(i, j)
        captions = torch.arange(j, min(j + cols, len(texts)))
        mine = (owner[captions] >= i) & (owner[captions] < i + rows)
        captions = captions[mine]
        values = tile_scores[owner[captions] - i, captions - j]
        correct_score[captions] = values
        best_correct.scatter_reduce_(0, owner[captions], values, "amax")
    has_caption = torch.bincount(owner, minlength=len(images)) > 0
    # An image's own captions scoring at least its best one are those equal to it: counted below, taken off after.
    own_ties = torch.bincount(owner, weights=(correct_score == best_correct[owner]).double(), minlength=len(images))
    image_above = -own_ties.long()
    text_ranks = torch.zeros(len(texts), dtype=torch.long)
    for i in range(0, len(images), rows):
        for j in range(0, len(texts), cols):
            tile_scores = scores(i, j)
            image_above[i:i + rows] += (tile_scores >= best_correct[i:i + rows, None]).sum(dim=1, dtype=torch.int32)
            # (score >= correct) counts the correct image itself, which makes the count a 1-based rank.
            text_ranks[j:j + cols] += (tile_scores >= correct_score[None, j:j + cols]).sum(dim=0, dtype=torch.int32)
    image_ranks = torch.where(has_caption, image_above + 1, torch.zeros_like(image_above))
    return image_ranks.numpy(), text_ranks.numpy()


def recall_from_ranks(image_ranks: np.ndarray, text_ranks: np.ndarray) -> dict[str, float]:
    """R@K in percent both ways, their mean ("mean_recall", = rsum/6 for K=1,5,10) and median ranks."""
    scored = image_ranks[image_ranks > 0]
    metrics = {f"i2t_r{k}": float(100.0 * (scored <= k).mean()) for k in KS}
    metrics.update({f"t2i_r{k}": float(100.0 * (text_ranks <= k).mean()) for k in KS})
    metrics["mean_recall"] = float(np.mean([metrics[key] for key in RECALL_KEYS]))
    metrics["i2t_median_rank"] = float(np.median(scored))
    metrics["t2i_median_rank"] = float(np.median(text_ranks))
    return metrics


def cosine_ranks(image_emb, text_emb, caption_image, chunk_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """`retrieval_ranks` of embeddings compared by cosine similarity (they are L2-normalised here)."""
    images = F.normalize(_as_tensor(image_emb).float(), dim=-1)
    texts = F.normalize(_as_tensor(text_emb).float(), dim=-1)
    return retrieval_ranks(images, texts, caption_image, chunk_size)


def retrieval_metrics(image_emb, text_emb, caption_image, chunk_size: int = 1024) -> dict[str, float]:
    """Image↔text recall of embeddings (compared by cosine similarity) with several captions per image."""
    return recall_from_ranks(*cosine_ranks(image_emb, text_emb, caption_image, chunk_size))


def qbnorm_ranks(image_emb, text_emb, caption_image, bank_images, bank_texts, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """Retrieval ranks with QB-Norm: image queries normalised by a bank of (training) image queries, text
    queries by a bank of (training) text queries. All embeddings are L2-normalised here."""
    images, texts = F.normalize(_as_tensor(image_emb).float(), dim=-1), F.normalize(_as_tensor(text_emb).float(), dim=-1)
    bank_images = F.normalize(_as_tensor(bank_images).float(), dim=-1)
    bank_texts = F.normalize(_as_tensor(bank_texts).float(), dim=-1)
    return retrieval_ranks(images, texts, caption_image, text_bank=query_bank(bank_images, texts, beta),
                           image_bank=query_bank(bank_texts, images, beta))


def qbnorm_metrics(image_emb, text_emb, caption_image, bank_images, bank_texts, beta: float) -> dict[str, float]:
    """Retrieval recall with QB-Norm (see qbnorm_ranks), with the β used."""
    ranks = qbnorm_ranks(image_emb, text_emb, caption_image, bank_images, bank_texts, beta)
    return {**recall_from_ranks(*ranks), "qbnorm_beta": beta}


def choose_beta(embed: Callable[[Split], tuple], bank: Split, val: Split) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(β with the best QB-Norm mean recall on `val`, bank image embeddings, bank text embeddings) for the
    embedding function `embed(split) -> (image emb, text emb)` and `bank`'s queries."""
    bank_images, bank_texts = embed(bank)
    val_images, val_texts = embed(val)
    beta = max(BETAS, key=lambda b: qbnorm_metrics(val_images, val_texts, val.caption_image, bank_images, bank_texts,
                                                   b)["mean_recall"])
    return beta, bank_images, bank_texts


def qbnorm_row(embed: Callable[[Split], tuple], bank: Split, val: Split,
               evaluated: Split) -> tuple[float, tuple[np.ndarray, np.ndarray]]:
    """(β, QB-Norm ranks on `evaluated`) of `embed`, the bank being `bank`'s queries, β chosen on `val`."""
    beta, bank_images, bank_texts = choose_beta(embed, bank, val)
    return beta, qbnorm_ranks(*embed(evaluated), evaluated.caption_image, bank_images, bank_texts, beta)


def class_embeddings(encode_texts, classnames: list[str], templates=DEFAULT_TEMPLATES) -> torch.Tensor:
    """One unit vector per class: the mean of its normalised template embeddings, renormalised.

    `encode_texts(list[str]) -> (N, dim) tensor` maps prompts into the shared space.
    """
    prompts = [template.format(name) for name in classnames for template in templates]
    embedded = F.normalize(_as_tensor(encode_texts(prompts)).float(), dim=-1)
    per_class = embedded.view(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(per_class, dim=-1)


def zero_shot_metrics(image_emb, labels, class_emb, classnames: list[str]) -> dict:
    """Top-1, top-5 and mean per-class top-1 accuracy (percent) of nearest-class-prompt prediction.

    The true class's rank counts ties against it, as in retrieval. `top5` is None with fewer than
    5 classes, where it would be 100% for any model.
    """
    images = F.normalize(_as_tensor(image_emb).float(), dim=-1)
    labels = _as_tensor(labels).long()
    scores = _finite_or_worst(images @ _as_tensor(class_emb).float().T)
    rank = (scores >= scores.gather(1, labels[:, None])).sum(dim=1)
    hit1 = rank <= 1
    per_class = {name: float(100.0 * hit1[labels == index].float().mean()) for index, name in enumerate(classnames)
                 if (labels == index).any()}
    return {"top1": float(100.0 * hit1.float().mean()),
            "top5": float(100.0 * (rank <= 5).float().mean()) if len(classnames) >= 5 else None,
            "mean_per_class": float(np.mean(list(per_class.values()))), "per_class": per_class}

