"""`extract --tokens` on a cache extracted without tokens: only the token states are computed, the pooled
features and every other dataset stay bit for bit, other sets are not touched, and an interrupted pass
resumes to the same cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import run_cli

from vlmcache.cache import writer
from vlmcache.cache.layout import MODALITIES
from vlmcache.cache.store import load_features, open_cache, verify_cache
from vlmcache.encode.extract import extract
from vlmcache.errors import VlmcacheError


def options(tiny_models, *images: str) -> dict:
    return {"image_model": str(tiny_models[images[0] if images else "vit"]), "text_model": str(tiny_models["distilbert"]),
            "extra_image_models": tuple(str(tiny_models[name]) for name in images[1:]), "shard_size": 6,
            "progress": False}


def shards(folder: Path) -> dict[str, dict]:
    """Every dataset and attribute of every shard of a set folder, by shard name."""
    found = {}
    for path in sorted(folder.glob("shard-*.h5")):
        with h5py.File(path, "r") as shard:
            found[path.name] = {**{name: shard[name][()] for name in shard}, **{f"@{k}": v for k, v in shard.attrs.items()}}
    return found


def files(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    """(inode, mtime, bytes) of each shard: a set that is not worked on keeps all three."""
    return {path.name: (path.stat().st_ino, path.stat().st_mtime_ns, path.read_bytes()) for path in folder.glob("shard-*.h5")}


def test_tokens_are_added_to_a_pooled_cache_and_equal_a_token_extraction(flickr_slice, tmp_path, tiny_models):
    cache = tmp_path / "c"
    extract(flickr_slice, cache, **options(tiny_models))  # backend auto: ONNX Runtime's pooled features
    pooled = {modality: shards(cache / modality) for modality in MODALITIES}
    recorded = open_cache(cache).provenance
    assert not recorded["images"]["tokens"] and recorded["images"]["compute_path"].startswith("onnxruntime")

    result = extract(flickr_slice, cache, tokens=True, **options(tiny_models))
    assert (result.shards_written, result.shards_tokens_added, result.shards_reused) == (0, 2 + 9, 0)
    fresh_path = tmp_path / "fresh"
    extract(flickr_slice, fresh_path, tokens=True, **options(tiny_models))
    opened, fresh = open_cache(cache), open_cache(fresh_path)
    for modality in MODALITIES:
        after, scratch = shards(cache / modality), shards(fresh_path / modality)
        assert list(after) == list(pooled[modality]) == list(scratch)
        for name, before in pooled[modality].items():
            assert set(after[name]) == set(before) | {"tokens", "token_mask"}
            for key, value in before.items():  # the ONNX-pooled features and every other dataset, bit for bit
                if key != "@provenance":
                    np.testing.assert_array_equal(after[name][key], value)
            np.testing.assert_allclose(after[name]["tokens"].astype(np.float32),
                                       scratch[name]["tokens"].astype(np.float32), atol=1e-3)
            np.testing.assert_array_equal(after[name]["token_mask"], scratch[name]["token_mask"])
        # The pooled features keep their compute path; the token pass's own is recorded beside it.
        provenance = opened.provenance[modality]
        assert provenance == {**recorded[modality], "tokens": True,
                              "token_compute_path": fresh.provenance[modality]["compute_path"]}
        assert provenance["token_compute_path"] != provenance["compute_path"]
    assert verify_cache(cache) == []
    split = load_features(opened, "train", image_tokens=True, text_tokens=True)
    reference = load_features(fresh, "train", image_tokens=True, text_tokens=True)
    assert split.image_tokens.shape == reference.image_tokens.shape == (6, 17, 32)  # 16 patches + CLS
    np.testing.assert_array_equal(split.text_token_mask, reference.text_token_mask)
    np.testing.assert_array_equal(split.image_features, opened.split("train").image_features)

    again = extract(flickr_slice, cache, tokens=True, **options(tiny_models))
    assert (again.shards_written, again.shards_tokens_added, again.shards_reused) == (0, 0, 11)
    with pytest.raises(VlmcacheError, match=r"made differently \(tokens\)"):  # as for any token cache
        extract(flickr_slice, cache, **options(tiny_models))


def test_only_the_requested_sets_are_rewritten(flickr_slice, tmp_path, tiny_models):
    cache = tmp_path / "c"
    extract(flickr_slice, cache, backend="torch", **options(tiny_models, "resnet", "vit"))
    vit = files(cache / "images@vit")
    result = extract(flickr_slice, cache, tokens=True, **options(tiny_models, "resnet"))
    assert result.shards_tokens_added == 2 + 9
    assert files(cache / "images@vit") == vit  # another encoder's set: not opened for writing
    opened = open_cache(cache)
    assert opened.provenance["images"]["tokens"] and not opened.feature_set("images", "vit").provenance["tokens"]
    # Same torch path for both passes: nothing besides `tokens` changes in the provenance.
    assert "token_compute_path" not in opened.provenance["images"]

    defaults = {modality: files(cache / modality) for modality in MODALITIES}
    result = extract(flickr_slice, cache, tokens=True, **options(tiny_models, "resnet", "vit"))
    assert (result.shards_tokens_added, result.shards_reused) == (2, 11)
    assert {modality: files(cache / modality) for modality in MODALITIES} == defaults
    opened = open_cache(cache)
    assert opened.feature_set("images", "vit").provenance["tokens"] and verify_cache(cache) == []
    states, masks = opened.read_tokens("images", slice(0, 10), np.ones(10, bool), "vit")
    assert states.shape == (10, 17, 32) and masks.all()
    assert json.loads((cache / "manifest.json").read_text())["feature_sets"]["images"]["vit"]["status"] == "complete"


class Killed(Exception):
    pass


def test_an_interrupted_token_pass_resumes_to_the_same_cache(flickr_slice, tmp_path, tiny_models, monkeypatch):
    extract(flickr_slice, tmp_path / "straight", **options(tiny_models))  # ONNX-pooled: resumes on the torch path
    shutil.copytree(tmp_path / "straight", tmp_path / "killed")
    extract(flickr_slice, tmp_path / "straight", tokens=True, **options(tiny_models))

    real = writer.write_shard  # write_or_extend_shard writes through it

    def write_then_die(*args, **kwargs):
        real(*args, **kwargs)
        raise Killed  # right after the first shard was renamed into place

    monkeypatch.setattr(writer, "write_shard", write_then_die)
    with pytest.raises(Killed):
        extract(flickr_slice, tmp_path / "killed", tokens=True, **options(tiny_models))
    monkeypatch.undo()
    with pytest.raises(VlmcacheError, match="incomplete"):  # readers see a cache being worked on, not mixed shards
        open_cache(tmp_path / "killed")
    with h5py.File(tmp_path / "killed" / "images" / "shard-00000.h5", "r") as shard:
        assert "tokens" in shard
    with h5py.File(tmp_path / "killed" / "images" / "shard-00001.h5", "r") as shard:
        assert "tokens" not in shard

    resumed = extract(flickr_slice, tmp_path / "killed", tokens=True, **options(tiny_models))
    assert (resumed.shards_written, resumed.shards_tokens_added, resumed.shards_reused) == (0, 1 + 9, 1)
    for modality in MODALITIES:  # byte-identical shards: same datasets, same attributes, same SHA-256
        assert {name: data for name, (_, _, data) in files(tmp_path / "killed" / modality).items()} == \
               {name: data for name, (_, _, data) in files(tmp_path / "straight" / modality).items()}
    manifests = [json.loads((tmp_path / name / "manifest.json").read_text()) for name in ("killed", "straight")]
    for manifest in manifests:
        del manifest["finished"], manifest["created"], manifest["dataset"]["root"]
    assert manifests[0] == manifests[1] and "token_compute_path" in manifests[0]["provenance"]["images"]
    assert verify_cache(tmp_path / "killed") == []


def test_an_image_unreadable_since_is_refused_not_given_blank_tokens(flickr_slice, tmp_path, tiny_models):
    extract(flickr_slice, tmp_path / "c", **options(tiny_models))
    image = sorted((flickr_slice / "Images").iterdir())[0]
    image.unlink()
    image.write_bytes(b"not a jpeg")
    with pytest.raises(VlmcacheError, match="was readable when the shard was made but is not now"):
        extract(flickr_slice, tmp_path / "c", tokens=True, on_error="skip", **options(tiny_models))


def test_cli_adds_tokens_in_one_line(flickr_slice, tmp_path, tiny_models, capsys):
    args = ["extract", flickr_slice, "--out", tmp_path / "c", "--image-model", tiny_models["resnet"],
            "--text-model", tiny_models["distilbert"], "--shard-size", "6"]
    assert run_cli(args, capsys)[0] == 0
    code, out, err = run_cli([*args, "--tokens"], capsys)
    assert code == 0 and "Traceback" not in out + err, err
    assert "token states added to 11 existing shards" in out
    code, out, err = run_cli(["info", tmp_path / "c"], capsys)
    assert code == 0 and "tokens=True" in out and "(tokens: " in out
    assert run_cli(["verify", tmp_path / "c"], capsys)[0] == 0
    code, _, err = run_cli(args, capsys)  # without --tokens now: refused in one line, as for any token cache
    assert code == 2 and "Traceback" not in err and "made differently (tokens)" in err
