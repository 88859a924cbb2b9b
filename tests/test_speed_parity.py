"""The fast extraction paths give the features of the plain eager path.

Tolerance: max |difference| ≤ 1e-4 and cosine ≥ 0.9999 per row, in fp32, on real shared-data images.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import FLICKR, require_shared_data

from vlmcache.data.datasets import load_rgb
from vlmcache.encode.encoders import fold_batchnorm, lite_preprocess, load_image_encoder, load_text_encoder


def real_pixels(preprocess, count: int = 8) -> torch.Tensor:
    require_shared_data()
    names = (FLICKR / "Flickr_8k.devImages.txt").read_text().split()[:count]
    return torch.stack([torch.from_numpy(preprocess(load_rgb(FLICKR / "Images" / name))) for name in names])


def assert_parity(fast: torch.Tensor, eager: torch.Tensor) -> None:
    assert (fast - eager).abs().max() <= 1e-4
    assert F.cosine_similarity(fast, eager).min() >= 0.9999


def test_efficientnet_fast_paths_match_eager_on_real_images():
    eager = load_image_encoder("efficientnet-lite0", device="cpu", backend="eager")
    pixels = real_pixels(eager.preprocess)
    reference = eager.encode(pixels).pooled
    fast = load_image_encoder("efficientnet-lite0", device="cpu", backend="torch")
    assert eager.compute_path == "eager" and fast.compute_path == "eager+bn-fold(49)+channels_last"
    assert_parity(fast.encode(pixels).pooled, reference)
    onnx = load_image_encoder("efficientnet-lite0", device="cpu", backend="onnxruntime")
    assert onnx.compute_path.startswith("onnxruntime-") and "bn-fold(49)" in onnx.compute_path
    assert_parity(onnx.encode(pixels).pooled, reference)
    assert load_image_encoder("efficientnet-lite0", device="cpu").compute_path == onnx.compute_path  # auto


@pytest.mark.parametrize(("name", "size"), [("efficientnet-lite1", 240), ("efficientnet-lite2", 260)])
def test_larger_lite_models_use_their_input_size_and_match_eager(name, size):
    eager = load_image_encoder(name, device="cpu", backend="eager")
    # The Lite builder's evaluation crop: size/(size + 32) of the shorter side, then size × size.
    assert eager.preprocess.size == size and eager.preprocess.crop_pct == size / (size + 32) == lite_preprocess(size).crop_pct
    assert lite_preprocess(224).crop_pct == 0.875  # Lite0's 224/256, as before
    pixels = real_pixels(eager.preprocess, count=2)
    assert pixels.shape == (2, 3, size, size)
    reference = eager.encode(pixels).pooled
    onnx = load_image_encoder(name, device="cpu", backend="onnxruntime")
    assert "bn-fold(" in onnx.compute_path and reference.shape == (2, 1280)
    assert_parity(onnx.encode(pixels).pooled, reference)


def test_resnet_and_vit_fast_paths_match_eager(tiny_models):
    for model in ("resnet", "vit"):
        eager = load_image_encoder(str(tiny_models[model]), device="cpu", backend="eager")
        pixels = real_pixels(eager.preprocess)
        for backend in ("torch", "onnxruntime"):
            fast = load_image_encoder(str(tiny_models[model]), device="cpu", backend=backend)
            assert_parity(fast.encode(pixels).pooled, eager.encode(pixels).pooled)
        assert_parity(fast.encode(pixels, tokens=True).tokens.flatten(1), eager.encode(pixels, tokens=True).tokens.flatten(1))


def test_folding_removes_every_batchnorm():
    model = load_image_encoder("efficientnet-lite0", device="cpu", backend="eager").model
    assert fold_batchnorm(model) == 49
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_length_sorted_caption_batches_match_one_by_one_encoding():
    require_shared_data()
    encoder = load_text_encoder("minilm", device="cpu", backend="eager")
    captions = [line.split("\t", 1)[1] for line in (FLICKR / "Flickr8k.token.txt").read_text().splitlines()[:24]]
    order = np.argsort(encoder.token_lengths(captions), kind="stable")
    batched = torch.zeros(len(captions), encoder.dim)
    for start in range(0, len(captions), 8):
        rows = order[start:start + 8]
        batched[rows] = encoder.encode([captions[i] for i in rows]).pooled
    single = torch.cat([encoder.encode([caption]).pooled for caption in captions])
    assert_parity(batched, single)


def test_text_onnxruntime_matches_eager_on_real_captions(tiny_models):
    require_shared_data()
    captions = [line.split("\t", 1)[1] for line in (FLICKR / "Flickr8k.token.txt").read_text().splitlines()[:40]]
    for model in ("minilm", str(tiny_models["distilbert"])):
        eager = load_text_encoder(model, device="cpu", backend="eager")
        onnx = load_text_encoder(model, device="cpu", backend="onnxruntime")
        assert eager.compute_path == "eager" and onnx.compute_path.startswith("onnxruntime-")
        assert_parity(onnx.encode(captions).pooled, eager.encode(captions).pooled)
    assert load_text_encoder("minilm", device="cpu").compute_path.startswith("onnxruntime-")  # auto on a CPU
