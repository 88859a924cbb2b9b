"""Several feature sets in one cache: extract, resume per set, read, combine, verify, train and use."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import SNOW_DOGS, make_flickr_slice, run_cli

from vlmcache.align.config import TrainConfig
from vlmcache.align.load import load_model
from vlmcache.align.train import train
from vlmcache.app.predictor import Predictor
from vlmcache.cache.store import load_features, open_cache, verify_cache
from vlmcache.encode.extract import extract
from vlmcache.errors import VlmcacheError
from vlmcache.eval.evaluate import evaluate_checkpoint


def two_set_cache(flickr_slice, out, tiny_models):
    """resnet as the default image set, then vit added by a second run (which must compute only vit)."""
    first = extract(flickr_slice, out, image_model=str(tiny_models["resnet"]), text_model=str(tiny_models["distilbert"]),
                    shard_size=4, progress=False)
    # One encoder per side keeps today's manifest layout (no feature_sets key), so older readers read it.
    assert "feature_sets" not in json.loads((out / "manifest.json").read_text())
    second = extract(flickr_slice, out, image_model=str(tiny_models["resnet"]), text_model=str(tiny_models["distilbert"]),
                     extra_image_models=(str(tiny_models["vit"]),), shard_size=4, progress=False)
    return first, second


def test_extra_set_is_added_alone_and_read_beside_the_default(flickr_slice, tmp_path, tiny_models, capsys):
    first, second = two_set_cache(flickr_slice, tmp_path / "c", tiny_models)
    assert first.shards_written == 3 + 13  # 10 images and 50 captions in shards of 4
    assert second.shards_written == 3 and second.shards_reused == 16  # only the new image set was computed
    assert sorted(p.name for p in (tmp_path / "c").iterdir() if p.is_dir()) == ["images", "images@vit", "texts"]
    cache = open_cache(tmp_path / "c")
    assert list(cache.feature_sets("images")) == ["resnet", "vit"] and list(cache.feature_sets("texts")) == ["distilbert"]
    # The default set reads as before; a combination is the concatenation of the sets, in the order asked.
    plain, vit = cache.split("train"), cache.split("train", ("vit",))
    both = cache.split("train", ("vit", "resnet"))
    assert plain.image_features.shape[1] == cache.image_dim == 16 and vit.image_features.shape[1] == 32
    np.testing.assert_array_equal(both.image_features, np.concatenate([vit.image_features, plain.image_features], 1))
    assert both.caption_image.tolist() == plain.caption_image.tolist()
    assert set(json.loads((tmp_path / "c" / "manifest.json").read_text())["feature_sets"]["images"]) == {"vit"}
    code, out, _ = run_cli(["info", tmp_path / "c"], capsys)
    assert code == 0 and "resnet (16-d, images/), vit (32-d, images@vit/)" in out.replace("\n", " ")
    # Unknown names: one line listing what the cache holds.
    with pytest.raises(VlmcacheError, match=r"--image-features lite9: .* has no such image feature set; it has resnet, vit"):
        cache.split("train", ("lite9",))


def test_verify_and_open_check_every_set(flickr_slice, tmp_path, tiny_models, capsys):
    two_set_cache(flickr_slice, tmp_path / "c", tiny_models)
    assert verify_cache(tmp_path / "c") == []
    shard = tmp_path / "c" / "images@vit" / "shard-00001.h5"
    data = bytearray(shard.read_bytes())
    data[-200] ^= 0xFF
    shard.write_bytes(bytes(data))
    problems = verify_cache(tmp_path / "c")
    assert [p for p, _ in problems] == [str(shard)] and "SHA-256" in problems[0][1]
    code, _, err = run_cli(["verify", tmp_path / "c"], capsys)
    assert code == 2 and "1 bad file(s)" in err and "shard-00001.h5" in err
    # A set's shard copied over another is caught on open, naming the shard.
    folder = tmp_path / "c" / "images@vit"
    (folder / "shard-00000.h5").write_bytes((folder / "shard-00002.h5").read_bytes())
    with pytest.raises(VlmcacheError, match=r"images@vit/shard-00000.h5: holds rows 8\+2"):
        open_cache(tmp_path / "c")


def test_sets_of_other_data_or_row_counts_are_refused(flickr_slice, tmp_path, tiny_models):
    two_set_cache(flickr_slice, tmp_path / "c", tiny_models)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    entry = manifest["feature_sets"]["images"]["vit"]
    entry["shards"] = entry["shards"][:-1]  # a set with fewer rows than the dataset
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(VlmcacheError, match=r"images@vit: its shards hold 8 rows but the dataset has 10"):
        open_cache(tmp_path / "c")
    entry["provenance"]["dataset_fingerprint"] = "0" * 64
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(VlmcacheError, match="made from a different dataset"):
        open_cache(tmp_path / "c")
    # Text features from a cache of other data cannot be combined with these images.
    manifest["feature_sets"]["images"]["vit"]["status"] = "incomplete"  # hidden from readers, as while extracting
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(manifest))
    other = extract(make_flickr_slice(tmp_path / "other", 5, 4), tmp_path / "o", image_model=str(tiny_models["vit"]),
                    text_model=str(tiny_models["distilbert"]), progress=False)
    with pytest.raises(VlmcacheError, match="built from different datasets"):
        load_features(open_cache(tmp_path / "c"), "train", open_cache(other.path))


def test_train_on_a_combination_records_it_and_every_use_follows(flickr_slice, tmp_path, tiny_models, capsys):
    two_set_cache(flickr_slice, tmp_path / "c", tiny_models)
    config = TrainConfig(projector="linear", epochs=2, batch_size=4, image_features="resnet+vit", standardize=True)
    train(tmp_path / "c", tmp_path / "run", config)
    model, meta = load_model(tmp_path / "run")
    assert meta["image_dim"] == 48 and [e["dim"] for e in meta["image_encoders"]] == [16, 32]
    # Per-set standardisation: each set centred, and scaled to unit RMS, on the training split.
    train_split = open_cache(tmp_path / "c").split("train", ("resnet", "vit"))
    standardised = (torch.from_numpy(train_split.image_features) - model.image_shift) * model.image_scale
    assert standardised.mean(0).abs().max() < 1e-4
    assert abs(float(standardised[:, :16].pow(2).mean()) - 1) < 1e-3 and abs(float(standardised[:, 16:].pow(2).mean()) - 1) < 1e-3
    report = evaluate_checkpoint(tmp_path / "run", qbnorm=False)
    assert report.rows["trained (linear + infonce)"]["mean_recall"] >= 0
    # Classify runs both image encoders on the uploaded file and concatenates them as in training.
    predictor = Predictor(tmp_path / "run")
    assert predictor.image_features(SNOW_DOGS).shape == (1, 48)
    hits = predictor.search("a dog", top=2)
    assert len(hits) == 2
    code, _, err = run_cli(["train", tmp_path / "c", "--out", tmp_path / "bad", "--image-features", "resnet+nope"], capsys)
    assert code == 2 and "it has resnet, vit" in err and "Traceback" not in err
    code, _, err = run_cli(["train", tmp_path / "c", "--out", tmp_path / "bad", "--image-features", "vit+vit"], capsys)
    assert code == 2 and "distinct set names" in err


def test_ablate_has_a_features_axis(flickr_slice, tmp_path, tiny_models):
    from vlmcache.align.ablate import ablate

    two_set_cache(flickr_slice, tmp_path / "c", tiny_models)
    result = ablate([tmp_path / "c"], tmp_path / "abl", projectors=("linear",), losses=("infonce",), seeds=(0,),
                    image_features=("resnet", "resnet+vit"), epochs=1, jobs=1, base_config={"batch_size": 4},
                    progress=False)
    trained = [row for row in result.rows if row["projector"] == "linear"]
    assert sorted(row["image_features"] for row in trained) == ["resnet", "resnet+vit"]
    assert len({row["encoders"] for row in trained}) == 2 and any(" & " in row["encoders"] for row in trained)
    with pytest.raises(VlmcacheError, match="it has resnet, vit"):
        ablate([tmp_path / "c"], tmp_path / "abl2", image_features=("nope",), progress=False)
