"""JPEG draft decoding (reduced DCT scale): never below the side asked for, recorded in the cache provenance,
and a cache resumes only with the choice it was made with."""

from __future__ import annotations

import dataclasses
import json

import h5py
import numpy as np
import pytest
from conftest import FLICKR, make_flickr_slice, require_shared_data
from PIL import Image

from vlmcache.data.datasets import load_rgb
from vlmcache.encode.encoders import lite_preprocess
from vlmcache.encode.extract import extract
from vlmcache.errors import VlmcacheError


def photo(path, size=(800, 600)) -> None:
    """A photo-sized JPEG (the shared Flickr8k images are 224 px): a Flickr8k image upscaled, quality 90."""
    require_shared_data()
    with Image.open(FLICKR / "Images" / "1000268201_693b08cb0e.jpg") as image:
        image.convert("RGB").resize(size, Image.BICUBIC).save(path, quality=90)


def test_draft_decoding_never_goes_below_the_requested_side(tmp_path):
    photo(tmp_path / "photo.jpg")
    assert load_rgb(tmp_path / "photo.jpg").size == (800, 600)
    assert load_rgb(tmp_path / "photo.jpg", 256).size == (400, 300)  # 1/2 scale: both sides still ≥ 256
    assert load_rgb(tmp_path / "photo.jpg", 140).size == (200, 150)  # 1/4
    assert load_rgb(tmp_path / "photo.jpg", 301).size == (800, 600)  # 1/2 would give 300 < 301
    Image.open(tmp_path / "photo.jpg").save(tmp_path / "photo.png")
    assert load_rgb(tmp_path / "photo.png", 100).size == (800, 600)  # not a JPEG: decoded whole


def test_decode_choice_is_in_the_provenance_and_a_resume_with_the_other_is_refused(tmp_path, tiny_models):
    data = make_flickr_slice(tmp_path / "flickr", 3, 1)
    for name in (data / "Images").iterdir():  # photo-sized copies, so that draft decoding changes something
        name.unlink()
        photo(name)
    models = {"image_model": str(tiny_models["vit"]), "text_model": str(tiny_models["distilbert"]), "progress": False}
    extract(data, tmp_path / "draft", decode="draft", **models)
    extract(data, tmp_path / "auto", **models)  # auto on a CPU: full
    draft, auto = (json.loads((tmp_path / name / "manifest.json").read_text()) for name in ("draft", "auto"))
    assert draft["provenance"]["images"]["encoder"]["preprocess"]["jpeg_draft"] is True
    # A full decode records nothing, as every cache made before draft decoding (which were all full).
    assert "jpeg_draft" not in auto["provenance"]["images"]["encoder"]["preprocess"]
    with h5py.File(tmp_path / "draft" / "images" / "shard-00000.h5") as a, \
            h5py.File(tmp_path / "auto" / "images" / "shard-00000.h5") as b:
        assert not np.array_equal(a["features"][()], b["features"][()])
    with pytest.raises(VlmcacheError, match=r"made differently \(encoder.preprocess.jpeg_draft\).*--decode as before: draft"):
        extract(data, tmp_path / "draft", decode="full", **models)
    with pytest.raises(VlmcacheError, match=r"--decode as before: full"):
        extract(data, tmp_path / "auto", decode="draft", **models)


def test_the_draft_side_keeps_a_margin_over_what_the_resize_needs():
    lite0 = lite_preprocess(224)  # shorter side to 256, centre crop 224
    assert lite0.draft_side() is None
    draft = dataclasses.replace(lite0, jpeg_draft=True)
    assert draft.draft_side() == 384  # 1.5 × 256
    assert "jpeg_draft" not in lite0.provenance() and draft.provenance()["jpeg_draft"] is True
