"""Known answers for the training-free baselines: CCA and ASIF by hand."""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from vlmcache.cache.store import Split
from vlmcache.metrics.baselines import asif_embeddings, fit_cca, relative_representation
from vlmcache.metrics.retrieval import retrieval_metrics

REPO = Path(__file__).resolve().parents[1]
ablate_module = importlib.import_module("vlmcache.align.ablate")  # `vlmcache.ablate` is the function
train_module = importlib.import_module("vlmcache.align.train")





# --- known answers: CCA, ASIF, learning-rate schedule, patience -----------------------------------------------------


def test_cca_one_dimensional_case_by_hand():
    # x = [1, 2, 3], y = 2x: centred x = [-1, 0, 1], var x = 2/3, var y = 8/3, cov = 4/3. With the ridge
    # (1e-3 · tr(C)/d added to each variance) the whitened cross-covariance is 1/1.001, the canonical
    # correlation; maps are whitening · correlation, with one sign shared by both sides.
    image_mean, image_map, text_mean, text_map = fit_cca(np.array([[1.0], [2.0], [3.0]]),
                                                          np.array([[2.0], [4.0], [6.0]]), dim=5)
    assert image_mean.tolist() == [2.0] and text_mean.tolist() == [4.0] and image_map.shape == (1, 1)
    assert abs(image_map[0, 0]) == pytest.approx(1 / (math.sqrt(2 / 3 * 1.001) * 1.001), rel=1e-6)
    assert abs(text_map[0, 0]) == pytest.approx(1 / (math.sqrt(8 / 3 * 1.001) * 1.001), rel=1e-6)
    assert np.sign(image_map[0, 0]) == np.sign(text_map[0, 0])


def test_cca_recovers_a_rotation_exactly():
    # texts = images @ R (R orthogonal): every canonical correlation is (up to the ridge) 1 and CCA maps an
    # image and its caption to the same point, so retrieval is perfect.
    generator = np.random.default_rng(0)
    images = generator.normal(size=(40, 5)) * np.array([3.0, 2.0, 1.0, 0.5, 0.2]) + 7.0
    rotation, _ = np.linalg.qr(generator.normal(size=(5, 5)))
    texts = images @ rotation
    image_mean, image_map, text_mean, text_map = fit_cca(images, texts, dim=5, ridge=1e-9)
    image_emb, text_emb = (images - image_mean) @ image_map, (texts - text_mean) @ text_map
    assert np.allclose(image_emb, text_emb, atol=1e-4)
    # Weighted by correlation 1, the embeddings are the whitened data: identity covariance.
    assert np.allclose(image_emb.T @ image_emb / len(images), np.eye(5), atol=1e-4)
    metrics = retrieval_metrics(image_emb, text_emb, np.arange(40))
    assert metrics["i2t_r1"] == 100.0 and metrics["t2i_r1"] == 100.0


def test_asif_relative_representation_by_hand():
    anchors = torch.tensor([[2.0, 0.0], [0.0, 5.0], [-1.0, -1.0]])  # normalised: (1,0), (0,1), -(1,1)/√2
    query = torch.tensor([[3.0, 4.0]])  # normalised (0.6, 0.8): cosines 0.6, 0.8, -0.99
    # top-2 = anchors 1 and 0; squared: 0.64, 0.36; renormalised by √(0.64² + 0.36²).
    norm = math.hypot(0.36, 0.64)
    assert torch.allclose(relative_representation(query, anchors, k=2, power=2),
                          torch.tensor([[0.36 / norm, 0.64 / norm, 0.0]]), atol=1e-6)
    # k=3 keeps the negative cosine, which is clamped to 0 before the power: same result.
    assert torch.allclose(relative_representation(query, anchors, k=3, power=2),
                          torch.tensor([[0.36 / norm, 0.64 / norm, 0.0]]), atol=1e-6)
    assert torch.allclose(relative_representation(query, anchors, k=1, power=4), torch.tensor([[0.0, 1.0, 0.0]]))


def split(images, texts) -> Split:
    images, texts = np.asarray(images, dtype=np.float32), np.asarray(texts, dtype=np.float32)
    return Split("x", images, texts, np.arange(len(images)), [str(i) for i in range(len(images))],
                 [""] * len(images), [""] * len(texts), None)


def test_asif_embeddings_by_hand_across_two_spaces():
    # Anchors centred at 0 in both spaces; texts live in a rotated, scaled copy of the image space.
    rotation = np.array([[0.0, -1.0], [1.0, 0.0]])
    anchor_images = np.array([[2.0, 0.0], [0.0, 2.0], [-2.0, -2.0]])
    train = split(anchor_images, 10 * anchor_images @ rotation)
    evaluated = split([[3.0, 4.0], [-1.0, -2.0]], 10 * np.array([[3.0, 4.0], [-1.0, -2.0]]) @ rotation)
    images, texts = asif_embeddings(train, evaluated, k=2, power=2)
    # Query (3,4) → (0.6, 0.8): cosines 0.6, 0.8, -0.99 → top-2 squared (0.36, 0.64, 0), renormalised.
    norm = math.hypot(0.36, 0.64)
    assert torch.allclose(images[0], torch.tensor([0.36 / norm, 0.64 / norm, 0.0]), atol=1e-6)
    # Query (-1,-2): cosines -1/√5, -2/√5, 3/√10 → only anchor 2 is positive: (0, 0, 1).
    assert torch.allclose(images[1], torch.tensor([0.0, 0.0, 1.0]), atol=1e-6)
    assert torch.allclose(texts, images, atol=1e-6)  # same relative similarities in the other space


