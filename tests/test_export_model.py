"""`vlmcache export-model`: the exported ONNX graphs embed photos and texts as vlmcache does (Predictor) within
1e-4, using onnxruntime, tokenizers, numpy and Pillow only (the example of docs/export.md is run as written);
several feature sets export every encoder; bad input is one line, exit 2."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import SNOW_DOGS, run_cli, tiny

from vlmcache.align.config import TrainConfig
from vlmcache.align.train import train
from vlmcache.app.export_model import export_model
from vlmcache.app.predictor import Predictor
from vlmcache.data.synthetic import write_synthetic_cache
from vlmcache.encode.extract import extract

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

DOCS = Path(__file__).resolve().parents[1] / "docs" / "export.md"
LABELS = ["a dog running on the grass", "a man riding a bicycle", "a plate of food"]


@pytest.fixture(scope="module")
def vit_cache(data, tiny_models, tmp_path_factory) -> Path:
    """Tiny ViT + DistilBERT features (squash-resize preprocessing, CLS and mean pooling), with token states, of
    the session's 6 + 4 Flickr8k slice."""
    cache = tmp_path_factory.mktemp("vit-cache") / "cache"
    extract(data, cache, **tiny(tiny_models, tokens=True))
    return cache


@pytest.fixture(scope="module")
def vit_run(vit_cache, tmp_path_factory) -> Path:
    """An MLP run on the pooled features."""
    run = tmp_path_factory.mktemp("vit-run") / "run"
    train(vit_cache, run, TrainConfig(projector="mlp", epochs=1, batch_size=4))
    return run


def three_photos(flickr: Path) -> list[Path]:
    return sorted((flickr / "Images").iterdir())[:3]


def predictor_embeddings(run: Path, photos: list[Path], labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(image, text) unit embeddings as vlmcache computes them for classify, search and serve."""
    predictor = Predictor(run)
    images = [predictor.model.embed_images(predictor.image_features(photo)).detach().numpy() for photo in photos]
    return np.concatenate(images), predictor.embed_prompts(labels).detach().numpy()


def exported_embeddings(folder: Path, photos: list[Path], labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(image, text) embeddings of the exported graphs for every input image.json and text.json list, made with
    onnxruntime, tokenizers, numpy and Pillow only, as docs/export.md describes."""
    import onnxruntime
    from tokenizers import Tokenizer

    image_spec, text_spec = (json.loads((folder / f"{side}.json").read_text()) for side in ("image", "text"))
    feeds = {entry["name"]: np.stack([pixels(photo, entry) for photo in photos]) for entry in image_spec["inputs"]}
    images = onnxruntime.InferenceSession(str(folder / "image.onnx")).run(None, feeds)[0]
    feeds = {}
    for entry in text_spec["inputs"]:
        encoded = Tokenizer.from_file(str(folder / entry["tokenizer"])).encode_batch(labels)
        feeds[entry["ids"]] = np.array([item.ids for item in encoded], dtype=np.int64)
        feeds[entry["mask"]] = np.array([item.attention_mask for item in encoded], dtype=np.int64)
    return images, onnxruntime.InferenceSession(str(folder / "text.onnx")).run(None, feeds)[0]


def pixels(photo: Path, entry: dict) -> np.ndarray:
    """A photo as one image input's uint8 pixels: resize (shorter side, or squash) and centre crop."""
    from PIL import Image, ImageOps

    picture, size, short = ImageOps.exif_transpose(Image.open(photo)).convert("RGB"), entry["size"], entry["shorter_side"]
    width, height = (max(size, round(x * (short / min(picture.size)))) for x in picture.size) if short else (size, size)
    left, top = (width - size) // 2, (height - size) // 2
    picture = picture.resize((width, height), getattr(Image, entry["resample"].upper()))
    return np.asarray(picture.crop((left, top, left + size, top + size)))


def assert_same_embeddings(run: Path, folder: Path, photos: list[Path]) -> None:
    expected_image, expected_text = predictor_embeddings(run, photos, LABELS)
    image, text = exported_embeddings(folder, photos, LABELS)
    assert image.shape == expected_image.shape and np.abs(image - expected_image).max() < 1e-4
    assert text.shape == expected_text.shape and np.abs(text - expected_text).max() < 1e-4


def docs_example() -> str:
    """The Python block of docs/export.md."""
    return re.search(r"```python\n(.*?)```", DOCS.read_text(encoding="utf-8"), re.S).group(1)


def test_exported_tiny_vit_distilbert_embed_as_vlmcache_does(vit_run, data, tmp_path, capsys):
    code, out, err = run_cli(["export-model", vit_run, "--format", "onnx", "--out", tmp_path / "exported"], capsys)
    assert code == 0, err
    assert "exported" in out and "256-d unit embeddings" in out
    assert sorted(path.name for path in (tmp_path / "exported").iterdir()) == [
        "image.json", "image.onnx", "text.json", "text.onnx", "tokenizer.json"]
    spec = json.loads((tmp_path / "exported" / "image.json").read_text())
    assert spec["inputs"][0]["shorter_side"] is None and spec["inputs"][0]["size"] == 32  # ViT squashes to 32×32
    assert_same_embeddings(vit_run, tmp_path / "exported", three_photos(data))
    # Exporting again into the same folder replaces the earlier export.
    export_model(vit_run, tmp_path / "exported")


def test_the_docs_example_classifies_with_onnxruntime_tokenizers_numpy_and_pillow_only(vit_run, data, tmp_path,
                                                                                      capsys):
    export_model(vit_run, tmp_path / "exported")
    source = docs_example()
    tree = ast.parse(source)
    modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert modules == {"json", "numpy", "onnxruntime", "PIL", "tokenizers"}
    code_lines = [line for line in source.splitlines() if line.strip() and not line.startswith(("import", "from"))]
    assert len(code_lines) <= 10
    photo = three_photos(data)[0]
    first = next(line for line in source.splitlines() if line.startswith("folder, photo, labels ="))
    namespace: dict = {}
    exec(source.replace(first, f"folder, photo, labels = {str(tmp_path / 'exported')!r}, {str(photo)!r}, {LABELS!r}"),
         namespace)
    expected_image, expected_text = predictor_embeddings(vit_run, [photo], LABELS)
    assert np.abs(namespace["image_emb"] - expected_image).max() < 1e-4
    assert np.abs(namespace["text_emb"] - expected_text).max() < 1e-4
    printed = capsys.readouterr().out.splitlines()
    best = LABELS[int(np.argmax(expected_image @ expected_text.T))]
    assert len(printed) == len(LABELS) and printed[0].endswith(best)


def test_a_run_on_several_feature_sets_exports_every_encoder(data, tiny_models, tmp_path):
    extract(data, tmp_path / "cache", image_model=str(tiny_models["resnet"]), text_model=str(tiny_models["distilbert"]),
            extra_image_models=(str(tiny_models["vit"]),), progress=False)
    train(tmp_path / "cache", tmp_path / "run", TrainConfig(projector="linear", epochs=1, batch_size=4,
                                                            image_features="resnet+vit", standardize=True))
    result = export_model(tmp_path / "run", tmp_path / "exported")
    assert result.image_encoders == [str(tiny_models["resnet"]), str(tiny_models["vit"])]
    spec = json.loads((tmp_path / "exported" / "image.json").read_text())
    assert [(entry["name"], entry["size"], entry["shorter_side"]) for entry in spec["inputs"]] == [
        ("pixels_0", 32, 37), ("pixels_1", 32, None)]  # ResNet: shorter side to 32/0.875, crop; ViT: squash
    assert_same_embeddings(tmp_path / "run", tmp_path / "exported", three_photos(data))


def test_a_token_projector_exports_the_image_encoders_token_states(vit_cache, data, tmp_path):
    train(vit_cache, tmp_path / "run", TrainConfig(projector="cross-attention", queries=2, epochs=1, batch_size=4))
    export_model(tmp_path / "run", tmp_path / "exported")
    assert_same_embeddings(tmp_path / "run", tmp_path / "exported", three_photos(data))


def test_efficientnet_lite0_and_minilm_export(real_run, tmp_path):
    """The offline default encoders (the suite's real-feature run): centre-crop preprocessing, a convnet."""
    export_model(real_run, tmp_path / "exported")
    spec = json.loads((tmp_path / "exported" / "image.json").read_text())["inputs"][0]
    assert (spec["encoder"], spec["size"], spec["shorter_side"]) == ("efficientnet-lite0", 224, 256)
    assert_same_embeddings(real_run, tmp_path / "exported", [SNOW_DOGS])


def test_bad_input_is_one_line_and_exit_2(vit_run, tmp_path, capsys):
    synthetic = write_synthetic_cache(tmp_path / "synthetic", 16, val_images=4, dim=8)
    train(synthetic, tmp_path / "synthetic-run", TrainConfig(projector="linear", epochs=1, batch_size=4))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    crowded = tmp_path / "crowded"
    crowded.mkdir()
    (crowded / "notes.txt").write_text("mine")
    cases = [([tmp_path / "synthetic-run", "--out", tmp_path / "a"], "which records no encoder vlmcache can run"),
             ([vit_run, "--out", blocker], "is a file"),
             ([vit_run, "--out", blocker / "sub"], "cannot create it"),
             ([vit_run, "--out", crowded], "holds other files (notes.txt)"),
             ([vit_run, "--out", tmp_path / "b", "--format", "torchscript"], "--format torchscript: use one of onnx"),
             ([tmp_path / "nothing", "--out", tmp_path / "c"], "no checkpoint here")]
    for args, message in cases:
        code, _, err = run_cli(["export-model", *args], capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert sorted(path.name for path in crowded.iterdir()) == ["notes.txt"]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
