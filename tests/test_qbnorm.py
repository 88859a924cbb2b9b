"""QB-Norm (querybank normalisation): known answers by hand, and its place in eval and search."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import run_cli

from vlmcache.align.config import TrainConfig
from vlmcache.align.train import train
from vlmcache.app.predictor import Predictor
from vlmcache.app.search import search_images
from vlmcache.encode.extract import extract
from vlmcache.errors import VlmcacheError
from vlmcache.metrics.qbnorm import query_bank
from vlmcache.metrics.retrieval import qbnorm_metrics, retrieval_metrics, retrieval_ranks


def test_normaliser_and_dynamic_activation_by_hand():
    bank = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    gallery = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    normaliser = query_bank(bank, gallery, beta=1.0, chunk_size=1)
    # log Σ_b exp(β s(b, g)): item 0 is at cosine 1 from both bank queries, item 1 at cosine 0.
    torch.testing.assert_close(normaliser.log_norm, torch.tensor([1 + math.log(2), math.log(2)]))
    assert normaliser.active.tolist() == [True, False]  # only item 0 is some bank query's top-1
    scores = torch.tensor([[0.9, 0.8], [0.5, 0.6]])
    rescored = normaliser.rescore(scores)
    # Query 0's top-1 is active: β·s − log Z = (0.9 − 1 − ln 2, 0.8 − ln 2), so item 1 now ranks first.
    torch.testing.assert_close(rescored[0], torch.tensor([0.9 - 1 - math.log(2), 0.8 - math.log(2)]))
    # Query 1's top-1 (item 1) is not in the activation set: its scores are left as they were.
    torch.testing.assert_close(rescored[1], scores[1])


def test_a_hub_image_loses_the_query_it_stole():
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # A is a hub: the bank's captions all sit near it
    texts = torch.tensor([[1.0, 0.0], [0.8, 0.6]])  # caption 0 is A's, caption 1 is B's but nearer A
    owner = torch.tensor([0, 1])
    bank_texts = torch.tensor([[0.96, 0.28]] * 3)
    bank_images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    plain = retrieval_metrics(images, texts, owner)
    assert plain["t2i_r1"] == 50.0  # caption 1 ranks its image second
    # By hand, β = 1: log Z_A = ln 3 + 0.96, log Z_B = ln 3 + 0.28; caption 0: A 0.04 > B −0.28 (rank 1),
    # caption 1: A 0.8 − 0.96 = −0.16 < B 0.6 − 0.28 = 0.32 (rank 1).
    normalised = qbnorm_metrics(images, texts, owner, bank_images, bank_texts, beta=1.0)
    assert normalised["t2i_r1"] == 100.0 and normalised["qbnorm_beta"] == 1.0
    _, text_ranks = retrieval_ranks(images, texts, owner, image_bank=query_bank(bank_texts, images, 1.0))
    assert text_ranks.tolist() == [1, 1]


@pytest.fixture
def tiny_run(flickr_slice, tmp_path, tiny_models):
    extract(flickr_slice, tmp_path / "c", image_model=str(tiny_models["resnet"]), text_model=str(tiny_models["distilbert"]),
            progress=False)
    train(tmp_path / "c", tmp_path / "run", TrainConfig(projector="linear", epochs=2, batch_size=4))
    return tmp_path / "run"


def test_eval_reports_qbnorm_rows_and_refuses_a_bank_of_the_evaluated_split(tiny_run, tmp_path, capsys):
    code, out, err = run_cli(["eval", tiny_run, "--json", tmp_path / "r.json"], capsys)
    assert code == 0, err
    rows = json.loads((tmp_path / "r.json").read_text())["retrieval"]
    assert {"trained (linear + infonce) + QB-Norm", "CCA (closed form) + QB-Norm"} <= set(rows)
    assert rows["trained (linear + infonce) + QB-Norm"]["qbnorm_beta"] in (10.0, 20.0, 30.0, 50.0)
    assert "QB-Norm" in out
    code, _, err = run_cli(["eval", tiny_run, "--split", "train"], capsys)
    assert code == 2 and "QB-Norm bank split 'train' is the evaluated split" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(["eval", tiny_run, "--qbnorm-bank", "val"], capsys)
    assert code == 2 and "bank must hold training queries" in err


def test_search_with_qbnorm(tiny_run):
    predictor = Predictor(tiny_run)
    plain = predictor.search("a dog", top=4)
    normalised = predictor.search("a dog", top=4, qbnorm=True)
    assert sorted(h.image_id for h in plain) == sorted(h.image_id for h in normalised)  # all 4 val images
    bank = predictor.image_bank()
    # Rescored exactly when the plain top-1 image is some training caption's top-1 (dynamic inverted softmax).
    changed = not np.allclose(sorted(h.score for h in plain), sorted(h.score for h in normalised))
    assert changed == bool(bank.active[plain[0].row]) and float(bank.beta) in (10.0, 20.0, 30.0, 50.0)
    with pytest.raises(VlmcacheError, match="is the evaluated split"):
        search_images(tiny_run, "a dog", split="train", qbnorm=True)
