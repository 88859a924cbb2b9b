"""extract --layers: the pooled features of further layers, each its own feature set with provenance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import run_cli
from test_speed_parity import assert_parity, real_pixels

from vlmcache.cache.store import open_cache
from vlmcache.data.datasets import load_rgb
from vlmcache.encode import encoders
from vlmcache.encode.encoders import image_encoder_from_provenance, load_image_encoders, load_text_encoders
from vlmcache.encode.extract import extract
from vlmcache.errors import VlmcacheError


def layered(flickr_slice, out, tiny_models, **options):
    return extract(flickr_slice, out, image_model=str(tiny_models["resnet"]), text_model=str(tiny_models["distilbert"]),
                   extra_image_models=(str(tiny_models["vit"]),), shard_size=4, progress=False, **options)


def test_layers_become_feature_sets_with_provenance(flickr_slice, tmp_path, tiny_models):
    layered(flickr_slice, tmp_path / "c", tiny_models, image_layers=("-2", "l0"), text_layers=("l1",), backend="eager")
    cache = open_cache(tmp_path / "c")
    # Tiny ResNet: embeddings + 2 stages = l0..l2; tiny ViT and DistilBERT: embeddings + 2 layers = l0..l2.
    assert list(cache.feature_sets("images")) == ["resnet", "resnet:l1", "resnet:l0", "vit", "vit:l1", "vit:l0"]
    assert list(cache.feature_sets("texts")) == ["distilbert", "distilbert:l1"]
    assert (tmp_path / "c" / "images@vit:l1").is_dir()
    sets = cache.feature_sets("images")
    assert "layer" not in sets["vit"].provenance["encoder"]  # the final output's provenance is what it always was
    assert sets["vit:l1"].provenance["encoder"]["layer"] == "l1" and sets["resnet:l0"].dim == 8
    assert [sets[name].dim for name in ("resnet", "resnet:l1", "vit", "vit:l1")] == [16, 8, 32, 32]
    # vit:l1 holds the CLS token of hidden_states[1], computed here by hand from the model.
    from transformers import ViTModel

    vit = ViTModel.from_pretrained(tiny_models["vit"]).eval()
    encoder = encoders.load_image_encoder(str(tiny_models["vit"]), device="cpu", backend="eager")
    first = torch.from_numpy(encoder.preprocess(load_rgb(cache.index["image_path"][0])))[None]
    with torch.no_grad():
        expected = vit(pixel_values=first, output_hidden_states=True).hidden_states[1][:, 0]
    stored = cache.read("images", slice(0, 1), feature_set="vit:l1").astype(np.float32)
    np.testing.assert_allclose(stored, expected.numpy(), atol=2e-3)  # stored as float16
    # Text layer l1: the masked mean of hidden_states[1].
    assert not np.allclose(cache.read("texts", slice(0, 5), feature_set="distilbert:l1"),
                           cache.read("texts", slice(0, 5), feature_set="distilbert"))


def test_adding_a_layer_computes_only_that_layer_and_a_rerun_nothing(flickr_slice, tmp_path, tiny_models, capsys):
    first = layered(flickr_slice, tmp_path / "c", tiny_models)
    assert first.shards_written == 3 + 3 + 13  # 10 images (twice) and 50 captions in shards of 4
    added = layered(flickr_slice, tmp_path / "c", tiny_models, text_layers=("-2",))
    assert added.shards_written == 13 and added.shards_reused == 19  # only distilbert:l1
    again = layered(flickr_slice, tmp_path / "c", tiny_models, text_layers=("l1",))  # the same layer by name
    assert again.shards_written == 0
    assert list(open_cache(tmp_path / "c").feature_sets("texts")) == ["distilbert", "distilbert:l1"]
    code, out, _ = run_cli(["info", tmp_path / "c"], capsys)
    assert code == 0 and "distilbert:l1 (32-d, texts@distilbert:l1/)" in out.replace("\n", " ")


@pytest.mark.parametrize(("args", "message"), [
    (["--layers", "l7"], "--layers l7: image model {resnet} has no such layer; give -1 (the final output) to -3, "
                         "or one of l0, l1, l2"),
    (["--text-layers=-9"], "--layers -9: text model {distilbert} has no such layer"),
    (["--image-layers", "-2,l1"], "--layers -2,l1: both are layer l1 of image model {resnet}; give each layer once"),
    (["--image-layers", "-2", "--image-pooling", "pooler"], "--image-pooling pooler: only the final output of {resnet} "
                                                            "has a pooler"),
])
def test_unknown_or_repeated_layers_are_refused_listing_the_valid_ones(flickr_slice, tmp_path, tiny_models, capsys,
                                                                       args, message):
    code, _, err = run_cli(["extract", flickr_slice, "--out", tmp_path / "c", "--image-model", tiny_models["resnet"],
                            "--text-model", tiny_models["distilbert"], *args], capsys)
    expected = message.format(resnet=tiny_models["resnet"], distilbert=tiny_models["distilbert"])
    assert code == 2 and expected in " ".join(err.split()) and len(err.strip().splitlines()) == 1


def test_layers_on_the_onnx_fast_path_and_the_fallback_when_a_layer_does_not_export(tiny_models, monkeypatch):
    pixels = torch.randn(3, 3, 32, 32)
    eager = load_image_encoders(str(tiny_models["resnet"]), ("-2",), device="cpu", backend="eager")
    fast = load_image_encoders(str(tiny_models["resnet"]), ("-2",), device="cpu", backend="onnxruntime")
    assert [e.layer for e in fast] == [None, "l1"] and all(e.compute_path.startswith("onnxruntime-") for e in fast)
    for one, reference in zip(fast, eager, strict=True):
        assert_parity(one.encode(pixels).pooled, reference.encode(pixels).pooled)
    real_attach = encoders.attach_onnxruntime

    def refuse_layers(encoder, *args):
        if encoder.layer is not None:
            raise RuntimeError("Exporting the operator 'aten::made_up' to ONNX opset version 17 is not supported")
        real_attach(encoder, *args)

    monkeypatch.setattr(encoders, "attach_onnxruntime", refuse_layers)
    final, layer = load_image_encoders(str(tiny_models["resnet"]), ("l1",), device="cpu", backend="onnxruntime")
    assert final.onnx is not None and layer.onnx is None
    assert layer.compute_path.startswith("eager+bn-fold")
    assert "(layer l1: no onnxruntime export (Exporting the operator" in layer.compute_path
    assert_parity(layer.encode(pixels).pooled, eager[1].encode(pixels).pooled)
    texts = load_text_encoders(str(tiny_models["distilbert"]), ("l1",), device="cpu", backend="onnxruntime")
    assert texts[0].onnx is not None and texts[1].onnx is None and "PyTorch instead" in texts[1].compute_path


def test_efficientnet_lite_blocks_on_both_paths_and_reloaded_from_provenance():
    eager = load_image_encoders("efficientnet-lite0", ("block5", "-2"), device="cpu", backend="eager")
    assert [(e.layer, e.dim) for e in eager] == [(None, 1280), ("block5", 40), ("block16", 320)]
    assert eager[0].layer_names()[-2:] == ["block16", "head"] and len(eager[0].layer_names()) == 17
    pixels = real_pixels(eager[0].preprocess, 4)
    fast = load_image_encoders("efficientnet-lite0", ("block5",), device="cpu", backend="onnxruntime")
    assert_parity(fast[1].encode(pixels).pooled, eager[1].encode(pixels).pooled)
    # Reloading from a set's provenance (classify, serve, captioning) gives the layer, not the final output.
    provenance = fast[1].provenance()
    assert provenance["layer"] == "block5" and provenance["dim"] == 40
    reloaded = image_encoder_from_provenance(provenance, "cpu")
    assert reloaded.layer == "block5"
    assert_parity(reloaded.encode(pixels).pooled, eager[1].encode(pixels).pooled)
    with pytest.raises(VlmcacheError, match=r"one of block1, block2, .*, block16, head$"):
        load_image_encoders("efficientnet-lite0", ("block17",), device="cpu")


def test_a_layer_set_trains_and_classifies_like_any_set(flickr_slice, tmp_path, tiny_models, capsys):
    from vlmcache.align.config import TrainConfig
    from vlmcache.align.train import train
    from vlmcache.app.predictor import Predictor

    layered(flickr_slice, tmp_path / "c", tiny_models, image_layers=("-2",), text_layers=("-2",))
    train(tmp_path / "c", tmp_path / "run", TrainConfig(projector="linear", epochs=1, batch_size=4,
                                                         image_features="vit:l1", text_features="distilbert:l1"))
    predictor = Predictor(tmp_path / "run")
    # An uploaded image and a typed prompt run through the recorded layers: the features are the cached ones
    # (the cache's saved ONNX text encoder is of the final output, so the prompt must not use it).
    cache = open_cache(tmp_path / "c")
    image, caption = cache.index["image_path"][0], cache.index["caption"][0]
    np.testing.assert_allclose(predictor.image_features(image).numpy(),
                               cache.read("images", slice(0, 1), feature_set="vit:l1"), atol=2e-3)
    assert (tmp_path / "c" / "text-encoder.json").exists()
    np.testing.assert_allclose(predictor.prompts.encode([caption]),
                               cache.read("texts", slice(0, 1), feature_set="distilbert:l1"), atol=2e-3)
    code, out, err = run_cli(["compat", tmp_path / "c", "--k", "2"], capsys)
    assert code == 0, err
    assert "vit:l1" in out and "distilbert:l1" in out
