"""eval / classify / search / zero-shot on trained checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import CIFAR, SNOW_DOGS, SNOW_DOGS_LABELS, require_shared_data, run_cli

from vlmcache import extract, open_cache
from vlmcache.align.config import TrainConfig
from vlmcache.align.load import load_model
from vlmcache.align.train import train
from vlmcache.app.predictor import classify_image
from vlmcache.app.search import search_images
from vlmcache.encode import encoders
from vlmcache.errors import VlmcacheError
from vlmcache.eval.evaluate import evaluate_checkpoint, zero_shot


@pytest.fixture
def tiny_run(flickr_slice, tmp_path, tiny_models):
    extract(flickr_slice, tmp_path / "cache", image_model=str(tiny_models["vit"]),
            text_model=str(tiny_models["distilbert"]), progress=False)
    train(tmp_path / "cache", tmp_path / "run", TrainConfig(projector="linear", epochs=2, batch_size=4))
    return tmp_path / "run"


def test_eval_shows_trained_untrained_and_baselines(tiny_run, tmp_path, capsys):
    report = evaluate_checkpoint(tiny_run)
    rows = report.rows
    assert report.split == "val"  # no test split in this cache
    assert list(rows) == ["trained (linear + infonce)", "untrained (same init)", "CCA (closed form)", "ASIF (no training)",
                          "trained (linear + infonce) + QB-Norm", "CCA (closed form) + QB-Norm"]
    model, meta = load_model(tiny_run)
    val = open_cache(meta["cache"]).split("val")
    with torch.no_grad():  # recall recomputed by brute force: sort every row, look for a correct item in the top K
        scores = (model.embed_images(torch.from_numpy(val.image_features))
                  @ model.embed_texts(torch.from_numpy(val.text_features)).T).double().numpy()
    owner = val.caption_image
    by_image = [owner[np.argsort(-scores[i], kind="stable")] for i in range(len(scores))]
    by_caption = [np.argsort(-scores[:, j], kind="stable") for j in range(len(owner))]
    for k in (1, 5, 10):
        assert rows["trained (linear + infonce)"][f"i2t_r{k}"] == pytest.approx(
            100 * np.mean([i in ranked[:k] for i, ranked in enumerate(by_image)]))
        assert rows["trained (linear + infonce)"][f"t2i_r{k}"] == pytest.approx(
            100 * np.mean([owner[j] in ranked[:k] for j, ranked in enumerate(by_caption)]))
    code, out, err = run_cli(["eval", tiny_run, "--json", tmp_path / "numbers.json"], capsys)
    assert code == 0, err
    assert "untrained (same init)" in out and "ASIF" in out
    saved = json.loads((tmp_path / "numbers.json").read_text())
    assert saved["retrieval"]["untrained (same init)"] == pytest.approx(rows["untrained (same init)"])
    code, _, err = run_cli(["eval", tiny_run, "--split", "test"], capsys)
    assert code == 2 and "has no split 'test'" in err


def test_classify_ranks_prompts_with_probabilities(tiny_run, flickr_slice, monkeypatch, capsys):
    image = next((flickr_slice / "Images").iterdir())
    rows, scale = classify_image(tiny_run, image, ["a dog", "a cat", "a car"])
    assert [row.rank for row in rows] == [1, 2, 3]
    assert rows[0].cosine >= rows[1].cosine >= rows[2].cosine
    assert sum(row.probability for row in rows) == pytest.approx(1.0, abs=1e-5)
    assert scale == pytest.approx(load_model(tiny_run)[0].loss.scale())
    # The prompts are now cached: classifying again must not need the text encoder.
    monkeypatch.setattr(encoders, "text_encoder_from_provenance", lambda *a, **k: pytest.fail("re-encoded prompts"))
    again, _ = classify_image(tiny_run, image, ["a cat", "a dog", "a car"])
    assert {r.prompt: r.cosine for r in again} == pytest.approx({r.prompt: r.cosine for r in rows}, abs=1e-6)
    code, out, _ = run_cli(["classify", image, "--labels", "a dog,a cat,a car", "--checkpoint", tiny_run], capsys)
    assert code == 0 and "probability" in out and "learned logit scale" in " ".join(out.split())


def test_classify_bad_input(tiny_run, tmp_path, capsys):
    (tmp_path / "notes.jpg").write_text("not an image")
    with pytest.raises(VlmcacheError, match="notes.jpg: not an image file"):
        classify_image(tiny_run, tmp_path / "notes.jpg", ["a", "b"])
    with pytest.raises(VlmcacheError, match="at least two labels"):
        classify_image(tiny_run, tmp_path / "notes.jpg", ["a", " "])
    code, _, err = run_cli(["classify", tmp_path / "gone.jpg", "--labels", "a,b", "--checkpoint", tiny_run], capsys)
    assert code == 2 and "gone.jpg: file not found" in err


def test_search_returns_cached_images_with_paths(tiny_run, capsys):
    hits = search_images(tiny_run, "a dog running", top=3)
    assert [h.rank for h in hits] == [1, 2, 3] and hits[0].score >= hits[1].score >= hits[2].score
    assert all(h.path.endswith(h.image_id) for h in hits)
    with pytest.raises(VlmcacheError, match="query is empty"):
        search_images(tiny_run, "  ")
    code, out, _ = run_cli(["search", tiny_run, "a dog", "--top", "2"], capsys)
    assert code == 0 and "top 2 images" in out


def test_zero_shot_on_a_labelled_folder_and_encoder_mismatch(tiny_run, tmp_path, tiny_models):
    require_shared_data()
    extract(CIFAR, tmp_path / "cifar", image_model=str(tiny_models["vit"]), text_model=str(tiny_models["distilbert"]),
            limit=60, progress=False)  # the first 60 rows: 50 airplanes, 10 automobiles
    results = zero_shot(tiny_run, tmp_path / "cifar", ensemble=True)
    assert set(results) == {"trained", "untrained (same init)"}
    assert len(open_cache(tmp_path / "cifar").classes) == 10  # all ten folders are candidate classes
    for metrics in results.values():  # 50 airplanes and 10 automobiles: per-class accuracy in steps of 2 % and 10 %
        per_class = metrics["per_class"]
        assert set(per_class) == {"airplane", "automobile"} and metrics["top5"] >= metrics["top1"]
        for name, step in (("airplane", 2), ("automobile", 10)):
            assert per_class[name] / step == pytest.approx(round(per_class[name] / step), abs=1e-4)
        assert metrics["top1"] == pytest.approx((50 * per_class["airplane"] + 10 * per_class["automobile"]) / 60)
        assert metrics["mean_per_class"] == pytest.approx((per_class["airplane"] + per_class["automobile"]) / 2)
    extract(CIFAR, tmp_path / "cifar-resnet", image_model=str(tiny_models["resnet"]),
            text_model=str(tiny_models["distilbert"]), limit=20, progress=False)
    with pytest.raises(VlmcacheError, match="checkpoint was trained on"):
        zero_shot(tiny_run, tmp_path / "cifar-resnet")
    with pytest.raises(VlmcacheError, match="has no class labels"):
        zero_shot(tiny_run, load_model(tiny_run)[1]["cache"])


def test_trained_checkpoint_ranks_the_true_description_of_a_real_photo_first(real_run):
    require_shared_data()
    rows, _ = classify_image(real_run, SNOW_DOGS, SNOW_DOGS_LABELS)
    assert rows[0].prompt == "dogs running in the snow"
    assert rows[0].probability > 0.5
