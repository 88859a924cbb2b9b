"""Retrieval and zero-shot metrics on small cases whose answers are worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlmcache.metrics.retrieval import class_embeddings, recall_from_ranks, retrieval_metrics, retrieval_ranks, zero_shot_metrics


def scores_as_embeddings(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Image and text embeddings whose dot products are exactly `scores` (images × texts)."""
    return np.eye(scores.shape[0], dtype=np.float32), scores.T.astype(np.float32)


# 2 images, 4 captions: captions 0,1 describe image 0; captions 2,3 describe image 1.
SCORES = np.array([[0.9, 0.1, 0.8, 0.2],
                   [0.7, 0.3, 0.6, 0.5]])
OWNER = np.array([0, 0, 1, 1])


def test_ranks_by_hand():
    image_ranks, text_ranks = retrieval_ranks(*scores_as_embeddings(SCORES), OWNER)
    # Image 0: its best caption (0.9) beats every other caption -> rank 1.
    # Image 1: its best caption (0.6) is beaten by caption 0 (0.7) -> rank 2.
    assert image_ranks.tolist() == [1, 2]
    # Caption 0: image 0 (0.9) > image 1 (0.7) -> 1.  Caption 1: 0.1 < 0.3 -> 2.
    # Caption 2: image 1 scores 0.6 < 0.8 -> 2.       Caption 3: 0.5 > 0.2 -> 1.
    assert text_ranks.tolist() == [1, 2, 2, 1]


def test_recall_any_caption_counts_for_image_to_text():
    metrics = recall_from_ranks(*retrieval_ranks(*scores_as_embeddings(SCORES), OWNER))
    assert metrics["i2t_r1"] == 50.0 and metrics["i2t_r5"] == 100.0 and metrics["i2t_r10"] == 100.0
    assert metrics["t2i_r1"] == 50.0 and metrics["t2i_r5"] == 100.0
    assert metrics["mean_recall"] == pytest.approx((50 + 100 + 100 + 50 + 100 + 100) / 6)
    assert metrics["i2t_median_rank"] == 1.5 and metrics["t2i_median_rank"] == 1.5


def test_directions_are_not_swapped():
    # Image 0 finds its caption first, but caption 1 (image 1's) prefers image 0: i2t R@1 = 100, t2i R@1 = 50.
    scores = np.array([[0.9, 0.8],
                       [0.1, 0.7]])
    metrics = recall_from_ranks(*retrieval_ranks(*scores_as_embeddings(scores), np.array([0, 1])))
    assert metrics["i2t_r1"] == 100.0 and metrics["t2i_r1"] == 50.0


def test_ties_count_against_the_query():
    scores = np.ones((2, 4))
    image_ranks, text_ranks = retrieval_ranks(*scores_as_embeddings(scores), OWNER)
    assert image_ranks.tolist() == [3, 3]  # both wrong captions tie with the best right one
    assert text_ranks.tolist() == [2, 2, 2, 2]


def test_image_without_captions_is_left_out_of_image_to_text():
    scores = np.array([[0.9, 0.1], [0.5, 0.5], [0.2, 0.8]])
    image_ranks, _ = retrieval_ranks(*scores_as_embeddings(scores), np.array([0, 2]))
    assert image_ranks.tolist() == [1, 0, 1]
    assert recall_from_ranks(image_ranks, np.array([1, 1]))["i2t_r1"] == 100.0


def test_chunked_equals_unchunked():
    generator = np.random.default_rng(0)
    images, texts = generator.normal(size=(37, 8)), generator.normal(size=(185, 8))
    owner = np.repeat(np.arange(37), 5)
    whole = retrieval_ranks(images, texts, owner, chunk_size=10_000)
    for chunk in (1, 7, 64):
        chunked = retrieval_ranks(images, texts, owner, chunk_size=chunk)
        assert np.array_equal(whole[0], chunked[0]) and np.array_equal(whole[1], chunked[1])


def test_perfect_embeddings_give_full_recall():
    images = np.eye(4, dtype=np.float32)
    owner = np.repeat(np.arange(4), 5)
    metrics = retrieval_metrics(images * 3, images[owner], owner)  # cosine: scale does not matter
    assert metrics["mean_recall"] == 100.0 and metrics["i2t_median_rank"] == 1.0


def test_zero_shot_accuracy_by_hand():
    classes = ["cat", "dog", "car"]
    class_emb = torch.eye(3)
    images = torch.tensor([[1.0, 0.2, 0.0],    # cat, predicted cat
                           [0.9, 0.8, 0.0],    # dog, predicted cat (wrong), dog second
                           [0.0, 0.1, 1.0],    # car, predicted car
                           [0.1, 1.0, 0.0]])   # dog, predicted dog
    labels = torch.tensor([0, 1, 2, 1])
    metrics = zero_shot_metrics(images, labels, class_emb, classes)
    # stable keys; top-5 is undefined with 3 classes; per class: cat 1/1, dog 1/2, car 1/1
    assert metrics["top1"] == 75.0 and metrics["top5"] is None
    assert metrics["mean_per_class"] == pytest.approx((100 + 50 + 100) / 3)
    assert metrics["per_class"] == {"cat": 100.0, "dog": 50.0, "car": 100.0}


def test_template_ensemble_is_mean_of_normalised_then_renormalised():
    vectors = {"a photo of a cat.": [2.0, 0.0], "a drawing of a cat.": [0.0, 1.0],
               "a photo of a dog.": [0.0, 5.0], "a drawing of a dog.": [0.0, 1.0]}
    encode = lambda prompts: torch.tensor([vectors[p] for p in prompts])  # noqa: E731
    embedded = class_embeddings(encode, ["cat", "dog"], ("a photo of a {}.", "a drawing of a {}."))
    # cat: mean of (1,0) and (0,1) = (0.5,0.5) -> (0.7071, 0.7071); dog: (0,1).
    assert torch.allclose(embedded, torch.tensor([[0.5 ** 0.5, 0.5 ** 0.5], [0.0, 1.0]]), atol=1e-6)
