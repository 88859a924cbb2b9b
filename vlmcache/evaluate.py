"""Retrieval and zero-shot metrics, the one place train, eval and ablate compute them.

Retrieval with several captions per image (Flickr/COCO protocol, as CLIP_benchmark):
- image→text R@K: an image scores if ANY of its captions is among its top-K texts;
- text→image R@K: a caption scores if ITS image is among its top-K images.
Ranks are exact and ties are broken against the query: an item scoring exactly as high as the best
correct one counts as ranked above it. So a model that scores everything equal gets chance-level
recall, never 100%. Similarities are computed in chunks, so the full images×captions matrix never
exists in memory.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

KS = (1, 5, 10)
DEFAULT_TEMPLATES = ("a photo of a {}.",)
# A short ensemble in the spirit of CLIP's ImageNet prompts, for when one template is too brittle.
ENSEMBLE_TEMPLATES = (
    "a photo of a {}.", "a blurry photo of a {}.", "a photo of the {}.", "a close-up photo of a {}.",
    "a bright photo of a {}.", "a photo of a small {}.", "a photo of a big {}.", "a low resolution photo of a {}.",
)


def _as_tensor(array) -> torch.Tensor:
    return array if isinstance(array, torch.Tensor) else torch.from_numpy(np.asarray(array))


def retrieval_ranks(image_emb, text_emb, caption_image, chunk_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """1-based ranks: (best rank of each image's captions, rank of each caption's image).

    Images with no caption get rank 0 (they cannot be scored and are left out of image→text recall).
    Embeddings are compared by dot product; pass L2-normalised ones for cosine similarity.
    """
    images, texts = _as_tensor(image_emb).float(), _as_tensor(text_emb).float()
    owner = _as_tensor(caption_image).long()
    image_ranks = np.zeros(len(images), dtype=np.int64)
    for start in range(0, len(images), chunk_size):
        rows = torch.arange(start, min(start + chunk_size, len(images)))
        scores = images[rows] @ texts.T  # (chunk, captions)
        correct = owner[None, :] == rows[:, None]
        best_correct = torch.where(correct, scores, torch.tensor(-torch.inf)).max(dim=1).values
        above = ((scores >= best_correct[:, None]) & ~correct).sum(dim=1)
        has_caption = correct.any(dim=1)
        image_ranks[rows.numpy()] = torch.where(has_caption, above + 1, torch.zeros_like(above)).numpy()
    text_ranks = np.zeros(len(texts), dtype=np.int64)
    for start in range(0, len(texts), chunk_size):
        rows = torch.arange(start, min(start + chunk_size, len(texts)))
        scores = texts[rows] @ images.T  # (chunk, images)
        correct_score = scores.gather(1, owner[rows, None])
        # (scores >= correct) counts the correct image itself, which makes the count a 1-based rank.
        text_ranks[rows.numpy()] = (scores >= correct_score).sum(dim=1).numpy()
    return image_ranks, text_ranks


def recall_from_ranks(image_ranks: np.ndarray, text_ranks: np.ndarray, ks=KS) -> dict[str, float]:
    """R@K in percent both ways, their mean ("mean_recall", = rsum/6 for K=1,5,10) and median ranks."""
    scored = image_ranks[image_ranks > 0]
    metrics = {}
    for k in ks:
        metrics[f"i2t_r{k}"] = float(100.0 * (scored <= k).mean())
    for k in ks:
        metrics[f"t2i_r{k}"] = float(100.0 * (text_ranks <= k).mean())
    metrics["mean_recall"] = float(np.mean([metrics[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in ks]))
    metrics["i2t_median_rank"] = float(np.median(scored))
    metrics["t2i_median_rank"] = float(np.median(text_ranks))
    return metrics


def retrieval_metrics(image_emb, text_emb, caption_image, chunk_size: int = 1024) -> dict[str, float]:
    """Image↔text recall of embeddings (compared by cosine similarity) with several captions per image."""
    images = F.normalize(_as_tensor(image_emb).float(), dim=-1)
    texts = F.normalize(_as_tensor(text_emb).float(), dim=-1)
    return recall_from_ranks(*retrieval_ranks(images, texts, caption_image, chunk_size))


def class_embeddings(encode_texts, classnames: list[str], templates=DEFAULT_TEMPLATES) -> torch.Tensor:
    """One unit vector per class: the mean of its normalised template embeddings, renormalised.

    `encode_texts(list[str]) -> (N, dim) tensor` maps prompts into the shared space.
    """
    prompts = [template.format(name) for name in classnames for template in templates]
    embedded = F.normalize(_as_tensor(encode_texts(prompts)).float(), dim=-1)
    per_class = embedded.view(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(per_class, dim=-1)


def zero_shot_metrics(image_emb, labels, class_emb, classnames: list[str]) -> dict:
    """Top-1/top-5 accuracy (percent) and per-class top-1 accuracy of nearest-class-prompt prediction."""
    images = F.normalize(_as_tensor(image_emb).float(), dim=-1)
    labels = _as_tensor(labels).long()
    scores = images @ _as_tensor(class_emb).float().T
    k = min(5, scores.shape[1])
    top = scores.topk(k, dim=1).indices
    hit1 = top[:, 0] == labels
    per_class = {name: float(100.0 * hit1[labels == index].float().mean()) for index, name in enumerate(classnames)
                 if (labels == index).any()}
    return {"top1": float(100.0 * hit1.float().mean()),
            f"top{k}": float(100.0 * (top == labels[:, None]).any(dim=1).float().mean()),
            "per_class": per_class}
