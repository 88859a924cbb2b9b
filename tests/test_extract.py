"""`vlmcache extract` end to end: encoders, store, resume after kill -9, locking, and bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import make_flickr_slice, run_cli
from PIL import Image

from vlmcache import extract, open_cache
from vlmcache.cache.store import check_same_dataset, check_same_encoders
from vlmcache.errors import VlmcacheError
from vlmcache.files import FolderLock

REPO = Path(__file__).resolve().parents[1]


def shard_arrays(cache_dir: Path, modality: str, field: str = "features") -> np.ndarray:
    files = sorted((cache_dir / modality).glob("shard-*.h5"))
    parts = []
    for file in files:
        with h5py.File(file, "r") as shard:
            parts.append(shard[field][()])
    return np.concatenate(parts)


def tiny(tiny_models, image="vit", text="distilbert") -> dict:
    return {"image_model": str(tiny_models[image]), "text_model": str(tiny_models[text]), "progress": False}


def test_default_offline_encoders_on_real_flickr(flickr_slice, tmp_path, capsys):
    code, out, err = run_cli(["extract", flickr_slice, "--out", tmp_path / "cache", "--shard-size", "8"], capsys)
    assert code == 0, err
    assert "10 images, 50 captions" in out.replace("\n", " ")
    cache = open_cache(tmp_path / "cache")
    assert (cache.image_dim, cache.text_dim) == (1280, 384)
    train = cache.split("train")
    assert train.image_features.shape == (6, 1280) and train.text_features.shape == (30, 384)
    assert train.caption_image.tolist() == [i for i in range(6) for _ in range(5)]
    val = cache.split("val")
    assert val.image_features.shape == (4, 1280)
    # The first dev image of Flickr_8k.devImages.txt and its caption #0, as in Flickr8k.token.txt.
    assert val.image_ids[0] == "2090545563_a4e66ec76b.jpg" and val.captions[0] == (
        "the boy laying face down on a skateboard is being pushed along the ground by another boy .")
    # Real features: a caption is closer (after centring) to captions of its own image than to others'.
    texts = val.text_features - val.text_features.mean(0)
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    similarity = texts @ texts.T
    same = val.caption_image[:, None] == val.caption_image[None, :]
    np.fill_diagonal(same, False)
    assert similarity[same].mean() > similarity[~same].mean() + 0.2
    # Lazy access: shard by shard, rows in order, the same values as the split loader.
    starts = [(start, shard["features"].shape[0]) for start, shard in cache.iter_shards("images")]
    assert starts == [(0, 8), (8, 2)]
    # Images stored once (fp16 by default), provenance on every shard equal to the manifest's.
    assert shard_arrays(tmp_path / "cache", "images").dtype == np.float16
    with h5py.File(tmp_path / "cache" / "images" / "shard-00000.h5", "r") as shard:
        assert json.loads(shard.attrs["provenance"]) == cache.provenance["images"]
    prov = cache.provenance["images"]["encoder"]
    assert prov["name"] == "efficientnet-lite0" and prov["pooling"] == "avgpool" and len(prov["weights_sha256"]) == 64
    assert prov["preprocess"]["size"] == 224 and cache.manifest["libraries"]["torch"]
    code, out, _ = run_cli(["info", tmp_path / "cache"], capsys)
    assert code == 0 and "efficientnet-lite0" in out and cache.fingerprint[:20] in out and "onnxruntime-" in out


def test_tiny_vit_distilbert_and_resnet_with_tokens(flickr_slice, tmp_path, tiny_models):
    result = extract(flickr_slice, tmp_path / "vit", tokens=True, max_length=16, dtype="float32", **tiny(tiny_models))
    assert result.images == 10 and result.truncated_captions > 0  # Flickr captions exceed 16 tokens
    cache = open_cache(tmp_path / "vit")
    assert cache.provenance["images"]["encoder"]["pooling"] == "cls"
    assert cache.provenance["images"]["encoder"]["preprocess"]["resize_mode"] == "squash"
    tokens = cache.read("images", slice(0, 10), "tokens")
    assert tokens.shape == (10, 17, 32)  # (32/8)^2 patches + CLS
    text_tokens, mask = cache.read("texts", slice(0, 50), "tokens"), cache.read("texts", slice(0, 50), "token_mask")
    assert text_tokens.shape == (50, 16, 32) and mask.shape == (50, 16) and mask[:, 0].all() and not mask.all()
    assert cache.manifest["truncated_captions"] == result.truncated_captions

    extract(flickr_slice, tmp_path / "resnet", **tiny(tiny_models, image="resnet"))
    cache = open_cache(tmp_path / "resnet")
    assert cache.image_dim == 16 and cache.provenance["images"]["encoder"]["pooling"] == "avgpool"
    assert cache.provenance["images"]["encoder"]["preprocess"]["resize_mode"] == "shorter_crop"
    with pytest.raises(VlmcacheError, match="has no 'tokens'"):
        cache.read("images", slice(0, 2), "tokens")


def test_same_inputs_give_identical_caches(flickr_slice, tmp_path, tiny_models):
    for name in ("a", "b"):
        extract(flickr_slice, tmp_path / name, shard_size=3, **tiny(tiny_models))
    for modality in ("images", "texts"):
        assert np.array_equal(shard_arrays(tmp_path / "a", modality), shard_arrays(tmp_path / "b", modality))


def test_kill_9_then_rerun_resumes_to_identical_arrays(tmp_path):
    data = make_flickr_slice(tmp_path / "flickr", 12, 12)
    options = ["--shard-size", "4", "--batch-size", "4", "--text-batch-size", "4", "--workers", "0"]
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "vlmcache", "extract", str(data), "--out", str(killed), *options],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((killed / "images").glob("shard-*.h5")) and time.time() < deadline:
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = len(list((killed / "images").glob("shard-*.h5"))) + len(list((killed / "texts").glob("shard-*.h5")))
    assert 1 <= written < 6 + 30, "the kill must land mid-extraction"
    assert (killed / ".lock").exists()  # left behind by the dead process; the re-run takes it over
    with pytest.raises(VlmcacheError, match="incomplete"):
        open_cache(killed)

    resumed = extract(data, killed, shard_size=4, batch_size=4, text_batch_size=4, workers=0, progress=False)
    assert resumed.shards_reused == written and resumed.shards_written == 36 - written
    extract(data, tmp_path / "straight", shard_size=4, batch_size=4, text_batch_size=4, workers=0, progress=False)
    for modality in ("images", "texts"):
        assert np.array_equal(shard_arrays(killed, modality), shard_arrays(tmp_path / "straight", modality))
    assert not list(killed.glob("*/.shard-*")) and not (killed / ".lock").exists()


def test_complete_cache_is_reused_and_overwrite_redoes_it(flickr_slice, tmp_path, tiny_models):
    extract(flickr_slice, tmp_path / "c", **tiny(tiny_models))
    again = extract(flickr_slice, tmp_path / "c", **tiny(tiny_models))
    assert again.shards_written == 0 and again.shards_reused == 2
    redone = extract(flickr_slice, tmp_path / "c", overwrite=True, **tiny(tiny_models))
    assert redone.shards_written == 2


def test_a_complete_cache_is_kept_whatever_the_backend_but_a_partial_one_resumes_on_its_own(
        flickr_slice, tmp_path, tiny_models):
    extract(flickr_slice, tmp_path / "c", backend="torch", **tiny(tiny_models, image="resnet"))
    again = extract(flickr_slice, tmp_path / "c", backend="onnxruntime", **tiny(tiny_models, image="resnet"))
    assert again.shards_written == 0
    assert open_cache(tmp_path / "c").provenance["images"]["compute_path"].startswith("eager+bn-fold")
    (tmp_path / "c" / "texts" / "shard-00000.h5").unlink()  # as if interrupted
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    (tmp_path / "c" / "manifest.json").write_text(json.dumps({**manifest, "status": "incomplete"}))
    with pytest.raises(VlmcacheError, match=r"compute_path.*--backend as before: eager\+bn-fold"):
        extract(flickr_slice, tmp_path / "c", backend="onnxruntime", **tiny(tiny_models, image="resnet"))
    resumed = extract(flickr_slice, tmp_path / "c", backend="torch", **tiny(tiny_models, image="resnet"))
    assert resumed.shards_written == 1


def test_resume_with_other_settings_is_refused(flickr_slice, tmp_path, tiny_models):
    extract(flickr_slice, tmp_path / "c", **tiny(tiny_models))
    refusal = r"image feature set 'vit' made differently \(encoder.pooling\).*--overwrite"
    with pytest.raises(VlmcacheError, match=refusal):
        extract(flickr_slice, tmp_path / "c", image_pooling="mean", **tiny(tiny_models))
    assert not (tmp_path / "c" / ".lock").exists()  # a refused run releases the lock
    extract(flickr_slice, tmp_path / "c", overwrite=True, image_pooling="mean", **tiny(tiny_models))
    # Another encoder is not another setting: it is added as a feature set of its own (test_feature_sets.py).


def test_lock_stops_a_second_writer(flickr_slice, tmp_path, tiny_models):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / ".lock").write_text(str(os.getpid()))  # a live process holds it
    with pytest.raises(VlmcacheError, match=r"another vlmcache extract \(pid \d+\) is writing here"):
        extract(flickr_slice, tmp_path / "c", **tiny(tiny_models))
    (tmp_path / "c" / ".lock").unlink()
    with FolderLock(tmp_path / "c", "extract"), pytest.raises(VlmcacheError, match="another vlmcache extract"):
        FolderLock(tmp_path / "c", "extract").__enter__()


def test_mixed_shards_and_mismatched_caches_are_refused(flickr_slice, tmp_path, tiny_models):
    extract(flickr_slice, tmp_path / "vit", **tiny(tiny_models))
    extract(flickr_slice, tmp_path / "resnet", **tiny(tiny_models, image="resnet"))
    with pytest.raises(VlmcacheError, match="images encoders differ in dim, name, pooling, preprocess.crop_pct"):
        check_same_encoders(open_cache(tmp_path / "vit"), open_cache(tmp_path / "resnet"))
    check_same_dataset(open_cache(tmp_path / "vit"), open_cache(tmp_path / "resnet"))
    other = make_flickr_slice(tmp_path / "other", 5, 4)
    extract(other, tmp_path / "other-cache", **tiny(tiny_models))
    with pytest.raises(VlmcacheError, match="built from different datasets"):
        check_same_dataset(open_cache(tmp_path / "vit"), open_cache(tmp_path / "other-cache"))
    # A shard from another cache copied in is caught by its provenance.
    (tmp_path / "vit" / "images" / "shard-00000.h5").write_bytes(
        (tmp_path / "resnet" / "images" / "shard-00000.h5").read_bytes())
    with pytest.raises(VlmcacheError, match="shard-00000.h5: made by a different encoder"):
        open_cache(tmp_path / "vit")


def _pairs_dataset(folder: Path, captions: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(captions):
        if name.endswith(".png") and not (folder / name).exists():
            Image.new("RGB", (40, 30), (index * 40 % 255, 90, 160)).save(folder / name)
    lines = ["image,caption"] + [f"{name},{caption}" for name, caption in captions.items()]
    (folder / "pairs.csv").write_text("\n".join(lines) + "\n")
    return folder / "pairs.csv"


def test_bad_image_fails_naming_file_or_is_skipped_and_recorded(tmp_path, tiny_models, capsys):
    pairs = _pairs_dataset(tmp_path / "d", {"good.png": "a blue box", "gone.png": "missing", "bad.png": "corrupt"})
    (tmp_path / "d" / "gone.png").unlink()
    (tmp_path / "d" / "bad.png").write_bytes(b"\x89PNG garbage")
    code, _, err = run_cli(["extract", pairs, "--out", tmp_path / "c", "--image-model", tiny_models["vit"],
                            "--text-model", tiny_models["distilbert"]], capsys)
    assert code == 2 and "gone.png: file not found" in err and "--on-error skip" in err and "Traceback" not in err
    result = extract(pairs, tmp_path / "c", on_error="skip", **tiny(tiny_models))
    reasons = {item["item"]: item["reason"] for item in result.skipped}
    assert reasons == {"gone.png": "file not found", "bad.png": "not an image file Pillow can read"}
    cache = open_cache(tmp_path / "c")
    assert {item["item"] for item in cache.manifest["skipped"]} == {"gone.png", "bad.png"}
    train = cache.split("train")
    assert train.image_ids == ["good.png"] and train.captions == ["a blue box"] and train.caption_image.tolist() == [0]


def test_empty_caption(tmp_path, tiny_models):
    pairs = _pairs_dataset(tmp_path / "d", {"a.png": "a red box", "b.png": " "})
    with pytest.raises(VlmcacheError, match=r"caption row 1 \(image b.png\): empty caption"):
        extract(pairs, tmp_path / "c", **tiny(tiny_models))
    extract(pairs, tmp_path / "c", on_error="skip", **tiny(tiny_models))
    train = open_cache(tmp_path / "c").split("train")
    assert train.captions == ["a red box"] and train.image_ids == ["a.png", "b.png"]


def test_unknown_model_and_folder_without_weights(flickr_slice, tmp_path, tiny_models, capsys):
    code, _, err = run_cli(["extract", flickr_slice, "--out", tmp_path / "c", "--image-model", "no-such/model-xyz"], capsys)
    assert code == 2 and "image model 'no-such/model-xyz'" in err and "Traceback" not in err
    empty = tmp_path / "no-weights"
    empty.mkdir()
    (empty / "config.json").write_text((tiny_models["vit"] / "config.json").read_text())
    with pytest.raises(VlmcacheError, match="no usable weights"):
        extract(flickr_slice, tmp_path / "c", image_model=str(empty), text_model=str(tiny_models["distilbert"]))
    with pytest.raises(VlmcacheError, match="is a text model"):
        extract(flickr_slice, tmp_path / "c", image_model=str(tiny_models["distilbert"]))


def test_output_path_that_is_a_file(flickr_slice, tmp_path, capsys):
    (tmp_path / "taken").write_text("x")
    code, _, err = run_cli(["extract", flickr_slice, "--out", tmp_path / "taken"], capsys)
    assert code == 2 and "is a file" in err


def test_reading_a_missing_cache_or_split(tmp_path, flickr_slice, tiny_models):
    with pytest.raises(VlmcacheError, match="no such cache folder"):
        open_cache(tmp_path / "nothing")
    extract(flickr_slice, tmp_path / "c", splits=["train"], **tiny(tiny_models))
    with pytest.raises(VlmcacheError, match="has no split 'val'; it has train"):
        open_cache(tmp_path / "c").split("val")
