"""A run trained with --text-cache (images from one cache, texts from another) can be evaluated, searched, served
and reproduced from its config file."""

from __future__ import annotations

import importlib
import json
import tomllib
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from vlmcache import open_cache
from vlmcache.align.load import load_model
from vlmcache.app.predictor import Predictor
from vlmcache.cache.store import load_features
from vlmcache.metrics.baselines import ASIF_ROW, CCA_ROW, baseline_metrics
from vlmcache.metrics.retrieval import retrieval_metrics

REPO = Path(__file__).resolve().parents[1]
ablate_module = importlib.import_module("vlmcache.align.ablate")  # `vlmcache.ablate` is the function
train_module = importlib.import_module("vlmcache.align.train")





# --- defect: a run trained with --text-cache can be evaluated, searched and served ---------------------------------


def test_eval_of_a_text_cache_run_uses_the_text_cache(text_cache_run, vit_cache, bert48_cache, other_bert, tmp_path,
                                                      capsys):
    code, out, err = run_cli(["eval", text_cache_run, "--json", tmp_path / "numbers.json"], capsys)
    assert code == 0, err  # the old code compared the image cache's text encoder with the checkpoint's and refused
    rows = json.loads((tmp_path / "numbers.json").read_text())["retrieval"]
    assert [row for row in rows if "QB-Norm" not in row] == ["trained (linear + infonce)", "untrained (same init)",
                                                             CCA_ROW, ASIF_ROW]
    model, meta = load_model(text_cache_run)
    assert meta["text_dim"] == 48 and meta["text_encoder"]["name"] == str(other_bert)
    images, texts = open_cache(vit_cache).split("val"), open_cache(bert48_cache).split("val")
    with torch.no_grad():
        expected = retrieval_metrics(model.embed_images(torch.from_numpy(images.image_features)),
                                     model.embed_texts(torch.from_numpy(texts.text_features)), texts.caption_image)
    assert rows["trained (linear + infonce)"] == pytest.approx(expected)
    fitted = baseline_metrics(load_features(open_cache(vit_cache), "train", open_cache(bert48_cache)),
                              load_features(open_cache(vit_cache), "val", open_cache(bert48_cache)), 256)
    assert rows[CCA_ROW] == pytest.approx(fitted[CCA_ROW]) and rows[ASIF_ROW] == pytest.approx(fitted[ASIF_ROW])


def test_search_and_predictor_of_a_text_cache_run(text_cache_run, vit_cache, bert48_cache, data, capsys):
    val_texts = open_cache(bert48_cache).split("val")
    query = val_texts.captions[0]  # a val caption: its cached features give the expected ranking
    model, _ = load_model(text_cache_run)
    with torch.no_grad():
        expected = (model.embed_texts(torch.from_numpy(val_texts.text_features[:1]))
                    @ model.embed_images(torch.from_numpy(open_cache(vit_cache).split("val").image_features)).T)[0]
    predictor = Predictor(text_cache_run)  # what `serve` holds
    hits = predictor.search(query, top=4)
    assert [hit.score for hit in hits] == pytest.approx([float(expected[hit.row]) for hit in hits], abs=1e-4)
    assert [hit.row for hit in hits] == torch.argsort(expected, descending=True).tolist()
    # New prompts are encoded by the run's text encoder and kept beside the text cache the run read, not the image cache.
    assert list(bert48_cache.glob("prompt-features-*.bin")) and not list(vit_cache.glob("prompt-features-*.bin"))
    image = Path(open_cache(vit_cache).split("val").image_paths[0])
    rows, _ = predictor.rank_labels(image, [val_texts.captions[0], val_texts.captions[10]])
    assert sorted(row.rank for row in rows) == [1, 2]
    code, out, err = run_cli(["search", text_cache_run, query, "--top", "2"], capsys)
    assert code == 0, err
    assert open_cache(vit_cache).split("val").image_ids[hits[0].row] in out
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from vlmcache.app.serve import create_app

    served = TestClient(create_app(text_cache_run)).get("/search", params={"q": query, "top": 4}).json()["hits"]
    assert [hit["row"] for hit in served] == [hit.row for hit in hits]


def test_cli_train_with_text_cache_and_its_config_file_reproduce_the_run(text_cache_run, vit_cache, bert48_cache,
                                                                          tmp_path, capsys):
    code, _, err = run_cli(["train", vit_cache, "--text-cache", bert48_cache, "--projector", "linear", "--epochs", "2",
                            "--batch-size", "4", "--out", tmp_path / "cli"], capsys)
    assert code == 0, err
    saved = tomllib.loads((tmp_path / "cli" / "config.toml").read_text())
    assert saved["text_cache"] == str(bert48_cache.resolve())
    code, _, err = run_cli(["train", "--config", tmp_path / "cli" / "config.toml", "--out", tmp_path / "again"], capsys)
    assert code == 0, err
    metas = [load_model(run)[1] for run in (text_cache_run, tmp_path / "cli", tmp_path / "again")]
    assert metas[2]["text_cache"] == str(bert48_cache.resolve())
    assert metas[0]["best_metrics"] == metas[1]["best_metrics"] == metas[2]["best_metrics"]
    code, _, err = run_cli(["eval", tmp_path / "again", "--no-baselines"], capsys)
    assert code == 0, err


