"""Tiled one-pass retrieval ranks equal the row-by-row ranks (ties against the query, non-finite, odd orders)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlmcache.metrics.retrieval import recall_from_ranks, retrieval_ranks, tiled_ranks


class Identity:
    """A QB-Norm bank that changes nothing: retrieval_ranks then takes its row-by-row path."""

    def rescore(self, scores):
        return scores


@pytest.mark.parametrize("case", ["random", "sorted owners", "constant model", "non-finite", "duplicates"])
def test_tiled_ranks_equal_row_by_row_ranks(case):
    generator = torch.Generator().manual_seed(1)
    images = F.normalize(torch.randn(300, 8, generator=generator), dim=-1)
    texts = F.normalize(torch.randn(1100, 8, generator=generator), dim=-1)
    owner = torch.randint(0, 280, (1100,), generator=generator)  # images 280.. have no caption
    if case == "sorted owners":
        owner = owner.sort().values
    if case == "constant model":
        images[:], texts[:] = images[0], images[0]
    if case == "non-finite":
        images[7], texts[3] = float("nan"), float("inf")
    if case == "duplicates":
        images[5], texts[10], texts[12] = images[6], texts[11], images[owner[12]]
    expected = retrieval_ranks(images, texts, owner, text_bank=Identity(), image_bank=Identity())
    got = tiled_ranks(images, texts, owner, tile=(64, 100))
    assert np.array_equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert np.array_equal(got[0], retrieval_ranks(images, texts, owner)[0])  # the default path is the tiled one
    if case == "constant model":  # every score ties: ranks are the worst possible, recall is not 100
        assert recall_from_ranks(*got)["mean_recall"] < 5


def test_known_ranks_by_hand():
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])  # captions 0, 1 of image 0; caption 2 of image 1
    image_ranks, text_ranks = tiled_ranks(images, texts, torch.tensor([0, 0, 1]), tile=(1, 2))
    # image 0: best own score 1.0 (caption 1); nothing else reaches it -> rank 1.
    # image 1: own caption 2 scores 0.8; caption 0 (not its own) scores 1.0 -> rank 2.
    assert image_ranks.tolist() == [1, 2]
    # caption 0 (image 0 scores 0, image 1 scores 1) -> rank 2; caption 1 -> 1; caption 2 (0.6 vs 0.8) -> 1.
    assert text_ranks.tolist() == [2, 1, 1]
