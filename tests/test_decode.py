"""JPEG draft decoding (reduced DCT scale): never below the side asked for, recorded in the cache provenance,
and a cache resumes only with the choice it was made with; the simplejpeg decoder gives Pillow's pixels, and
every file it does not take (greyscale, CMYK, truncated, corrupt, not a JPEG) fares exactly as with Pillow."""

from __future__ import annotations

import dataclasses
import io
import json
import sys
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
from conftest import FLICKR, make_flickr_slice, one_line_error, require_shared_data, run_cli
from PIL import Image

from vlmcache.data.datasets import ImageDecodeError, draft_with_simplejpeg, load_rgb
from vlmcache.encode import encoders
from vlmcache.encode.encoders import lite_preprocess
from vlmcache.encode.extract import extract
from vlmcache.errors import VlmcacheError


def photo(path, size=(800, 600), mode="RGB", **options) -> None:
    """A photo-sized JPEG (the shared Flickr8k images are 224 px): a Flickr8k image upscaled, quality 90."""
    require_shared_data()
    with Image.open(FLICKR / "Images" / "1000268201_693b08cb0e.jpg") as image:
        image.convert("RGB").resize(size, Image.BICUBIC).convert(mode).save(path, quality=90, **options)


def decoded(path, side, decoder):
    """load_rgb's pixels, or its error message."""
    try:
        return np.asarray(load_rgb(path, side, decoder))
    except ImageDecodeError as error:
        return str(error)


def same(first, second) -> bool:
    return first == second if isinstance(first, str) or isinstance(second, str) else np.array_equal(first, second)


def test_draft_decoding_never_goes_below_the_requested_side(tmp_path):
    photo(tmp_path / "photo.jpg")
    assert load_rgb(tmp_path / "photo.jpg").size == (800, 600)
    assert load_rgb(tmp_path / "photo.jpg", 256).size == (400, 300)  # 1/2 scale: both sides still ≥ 256
    assert load_rgb(tmp_path / "photo.jpg", 140).size == (200, 150)  # 1/4
    assert load_rgb(tmp_path / "photo.jpg", 301).size == (800, 600)  # 1/2 would give 300 < 301
    Image.open(tmp_path / "photo.jpg").save(tmp_path / "photo.png")
    assert load_rgb(tmp_path / "photo.png", 100).size == (800, 600)  # not a JPEG: decoded whole


def _photo_flickr(tmp_path, damage: dict | None = None):
    """A 3 + 1 image Flickr slice of photo-sized JPEGs (so that drafting changes something); `damage` maps an
    image's position to what it becomes: "grey", "cmyk" or "truncated"."""
    data = make_flickr_slice(tmp_path / "flickr", 3, 1)
    for index, name in enumerate(sorted((data / "Images").iterdir())):
        name.unlink()
        kind = (damage or {}).get(index)
        photo(name, mode={"grey": "L", "cmyk": "CMYK"}.get(kind, "RGB"))
        if kind == "truncated":
            name.write_bytes(name.read_bytes()[:5000])
    return data


def test_decode_choice_is_in_the_provenance_and_a_resume_with_the_other_is_refused(tmp_path, tiny_models):
    data = _photo_flickr(tmp_path)
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
    with pytest.raises(VlmcacheError, match=r"made differently \((encoder.preprocess.jpeg_decoder, )?"
                                            r"encoder.preprocess.jpeg_draft\).*--decode as before: draft"):
        extract(data, tmp_path / "draft", decode="full", **models)
    with pytest.raises(VlmcacheError, match=r"--decode as before: full"):
        extract(data, tmp_path / "auto", decode="draft", **models)


def test_the_draft_side_keeps_a_margin_over_what_the_resize_needs():
    lite0 = lite_preprocess(224)  # shorter side to 256, centre crop 224
    assert lite0.draft_side() is None
    draft = dataclasses.replace(lite0, jpeg_draft=True)
    assert draft.draft_side() == 384  # 1.5 × 256
    assert "jpeg_draft" not in lite0.provenance() and draft.provenance()["jpeg_draft"] is True
    # The decoder: recorded when simplejpeg drafts; a Pillow draft records none (as draft caches made before), nor
    # does a full decode, whatever decoder it would draft with.
    assert "jpeg_decoder" not in draft.provenance()
    assert dataclasses.replace(draft, jpeg_decoder="simplejpeg").provenance()["jpeg_decoder"] == "simplejpeg"
    assert dataclasses.replace(lite0, jpeg_decoder="simplejpeg").provenance() == lite0.provenance()


# --- the simplejpeg decoder ------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [{}, {"progressive": True}], ids=["baseline", "progressive"])
def test_simplejpeg_drafts_at_pillows_scale_with_pillows_pixels(tmp_path, options):
    pytest.importorskip("simplejpeg")
    photo(tmp_path / "photo.jpg", **options)
    for side, size in ((256, (400, 300)), (140, (200, 150)), (301, (800, 600)), (60, (100, 75))):
        fast = draft_with_simplejpeg(tmp_path / "photo.jpg", side)  # None would mean: left to Pillow
        assert fast is not None and fast.mode == "RGB" and fast.size == size
        assert np.array_equal(np.asarray(fast), np.asarray(load_rgb(tmp_path / "photo.jpg", side, "pillow")))
        assert np.array_equal(np.asarray(load_rgb(tmp_path / "photo.jpg", side, "simplejpeg")), np.asarray(fast))
    full = np.asarray(load_rgb(tmp_path / "photo.jpg"))  # a full decode never takes this path
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "photo.jpg", None, "simplejpeg")), full)
    # An image stored inside a data file (a tar member, a dataset row) reaches it as bytes.
    stored = draft_with_simplejpeg(io.BytesIO((tmp_path / "photo.jpg").read_bytes()), 256)
    assert np.array_equal(np.asarray(stored), np.asarray(load_rgb(tmp_path / "photo.jpg", 256)))


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_simplejpeg_applies_the_exif_orientation_as_pillow_does(tmp_path, orientation):
    pytest.importorskip("simplejpeg")
    exif = Image.Exif()
    exif[0x0112] = orientation
    photo(tmp_path / "turned.jpg", exif=exif)
    fast = draft_with_simplejpeg(tmp_path / "turned.jpg", 256)
    assert fast is not None and fast.size == ((300, 400) if orientation in (6, 8) else (400, 300))
    assert np.array_equal(np.asarray(fast), np.asarray(load_rgb(tmp_path / "turned.jpg", 256, "pillow")))


def test_greyscale_cmyk_truncated_corrupt_and_other_files_fare_as_with_pillow(tmp_path):
    pytest.importorskip("simplejpeg")
    photo(tmp_path / "grey.jpg", mode="L")
    photo(tmp_path / "cmyk.jpg", mode="CMYK")
    photo(tmp_path / "whole.jpg")
    data = (tmp_path / "whole.jpg").read_bytes()
    middle = len(data) // 2
    (tmp_path / "truncated.jpg").write_bytes(data[:middle])
    (tmp_path / "header-only.jpg").write_bytes(data[:600])
    # A stray marker in the entropy-coded data: libjpeg warns (so simplejpeg refuses) and Pillow decodes it anyway.
    (tmp_path / "warned.jpg").write_bytes(data[:middle] + b"\xff\xd0" + data[middle:])
    (tmp_path / "broken.jpg").write_bytes(data[:middle] + b"\xff" + data[middle + 1:])  # an unknown marker: fatal
    (tmp_path / "text.jpg").write_text("this is text, not a JPEG")
    Image.open(tmp_path / "whole.jpg").save(tmp_path / "photo.png")
    for name in ("grey.jpg", "cmyk.jpg", "truncated.jpg", "header-only.jpg", "warned.jpg", "broken.jpg", "text.jpg",
                 "photo.png"):
        assert draft_with_simplejpeg(tmp_path / name, 256) is None, name  # left to Pillow
        pillow, fast = decoded(tmp_path / name, 256, "pillow"), decoded(tmp_path / name, 256, "simplejpeg")
        assert same(pillow, fast), (name, pillow if isinstance(pillow, str) else pillow.shape)
    assert decoded(tmp_path / "grey.jpg", 256, "simplejpeg").shape == (300, 400, 3)  # drafted by Pillow, as before
    assert decoded(tmp_path / "cmyk.jpg", 256, "simplejpeg").shape == (300, 400, 3)
    assert decoded(tmp_path / "warned.jpg", 256, "simplejpeg").shape == (300, 400, 3)
    assert decoded(tmp_path / "photo.png", 256, "simplejpeg").shape == (600, 800, 3)  # not a JPEG: whole
    assert decoded(tmp_path / "truncated.jpg", 256, "simplejpeg").startswith("corrupt or truncated image (image file is")
    assert decoded(tmp_path / "broken.jpg", 256, "simplejpeg").startswith("corrupt or truncated image")
    assert decoded(tmp_path / "text.jpg", 256, "simplejpeg") == "not an image file Pillow can read"
    # Damage libjpeg cannot see (bytes that still decode): simplejpeg takes it, with Pillow's pixels all the same.
    (tmp_path / "silent.jpg").write_bytes(data[:middle] + b"\x13" * 64 + data[middle + 64:])
    assert draft_with_simplejpeg(tmp_path / "silent.jpg", 256) is not None
    assert same(decoded(tmp_path / "silent.jpg", 256, "pillow"), decoded(tmp_path / "silent.jpg", 256, "simplejpeg"))


def test_without_simplejpeg_draft_decoding_is_pillows(tmp_path, monkeypatch):
    photo(tmp_path / "photo.jpg")
    monkeypatch.setitem(sys.modules, "simplejpeg", None)  # `import simplejpeg` raises ImportError
    assert draft_with_simplejpeg(tmp_path / "photo.jpg", 256) is None
    assert load_rgb(tmp_path / "photo.jpg", 256, "simplejpeg").size == (400, 300)
    monkeypatch.setattr(encoders, "simplejpeg_available", lambda: False)
    encoder = SimpleNamespace(device=torch.device("cuda"), preprocess=lite_preprocess(224))  # auto on a GPU: draft
    chosen = encoders.set_decode(encoder, "auto").preprocess
    assert chosen.jpeg_draft and chosen.jpeg_decoder == "pillow" and "jpeg_decoder" not in chosen.provenance()


def test_the_decoder_is_in_the_provenance_and_a_resume_with_the_other_is_refused(tmp_path, tiny_models, monkeypatch):
    simplejpeg = pytest.importorskip("simplejpeg")
    data = _photo_flickr(tmp_path)
    models = {"image_model": str(tiny_models["vit"]), "text_model": str(tiny_models["distilbert"]), "progress": False}
    extract(data, tmp_path / "fast", decode="draft", **models)
    manifest = json.loads((tmp_path / "fast" / "manifest.json").read_text())
    recorded = manifest["provenance"]["images"]["encoder"]["preprocess"]
    assert recorded["jpeg_draft"] is True and recorded["jpeg_decoder"] == "simplejpeg"
    assert manifest["libraries"]["simplejpeg"] == simplejpeg.__version__
    monkeypatch.setattr(encoders, "simplejpeg_available", lambda: False)  # as where simplejpeg is not installed
    extract(data, tmp_path / "pillow", decode="draft", **models)
    manifest = json.loads((tmp_path / "pillow" / "manifest.json").read_text())
    recorded = manifest["provenance"]["images"]["encoder"]["preprocess"]
    assert recorded["jpeg_draft"] is True and "jpeg_decoder" not in recorded  # as every draft cache made before
    assert "simplejpeg" not in manifest["libraries"]
    with h5py.File(tmp_path / "fast" / "images" / "shard-00000.h5") as a, \
            h5py.File(tmp_path / "pillow" / "images" / "shard-00000.h5") as b:
        assert np.array_equal(a["features"][()], b["features"][()])  # the same pixels, so the same features
    with pytest.raises(VlmcacheError, match=r"made differently \(encoder.preprocess.jpeg_decoder\).*drafted by "
                                            r"simplejpeg, not installed here: pip install 'vlmcache\[fast\]'"):
        extract(data, tmp_path / "fast", decode="draft", **models)
    monkeypatch.undo()
    with pytest.raises(VlmcacheError, match=r"made differently \(encoder.preprocess.jpeg_decoder\).*drafted by "
                                            r"Pillow, this run's by simplejpeg"):
        extract(data, tmp_path / "pillow", decode="draft", **models)
    extract(data, tmp_path / "fast", decode="draft", **models)  # the same decoder: a complete cache, left as it is


@pytest.mark.parametrize("decode", ["draft", "full"])
def test_greyscale_and_cmyk_photos_decode_and_a_truncated_one_fails_in_one_line_or_is_skipped(
        tmp_path, tiny_models, capsys, decode):
    data = _photo_flickr(tmp_path, {0: "grey", 1: "cmyk", 2: "truncated"})
    names = sorted(path.name for path in (data / "Images").iterdir())
    models = ["--image-model", tiny_models["vit"], "--text-model", tiny_models["distilbert"]]
    code, _, err = run_cli(["extract", data, "--out", tmp_path / "c", "--decode", decode, *models], capsys)
    one_line_error(code, err, f"{names[2]}: corrupt or truncated image", "--on-error skip")
    result = extract(data, tmp_path / "c", decode=decode, on_error="skip", image_model=str(tiny_models["vit"]),
                     text_model=str(tiny_models["distilbert"]), progress=False)
    assert [item["item"] for item in result.skipped] == [names[2]]
    assert result.skipped[0]["reason"].startswith("corrupt or truncated image (image file is truncated")
