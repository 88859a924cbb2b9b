"""Zero-shot classification: class names cleaned or mapped into prompts, accuracy against a float64 recomputation."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, tiny
from PIL import Image
from safetensors.torch import load_file

from vlmcache import extract, open_cache
from vlmcache.align.load import load_model
from vlmcache.encode.prompts import PromptStore
from vlmcache.eval.evaluate import clean_class_name, zero_shot
from vlmcache.metrics.retrieval import ZERO_SHOT_KEYS

REPO = Path(__file__).resolve().parents[1]
ablate_module = importlib.import_module("vlmcache.align.ablate")  # `vlmcache.ablate` is the function
train_module = importlib.import_module("vlmcache.align.train")





# --- defect: zero-shot keys, mean per-class accuracy, class names ------------------------------------------------


def test_clean_class_name():
    assert clean_class_name("car_side") == "car side"
    assert clean_class_name("Faces_easy") == "faces easy"
    assert clean_class_name("airplane") == "airplane"
    assert clean_class_name("teddyBear") == "teddy bear"
    assert clean_class_name("ice-cream__cone") == "ice cream cone"


def labelled_folder(root: Path, counts: dict[str, int]) -> Path:
    for index, (name, count) in enumerate(counts.items()):
        (root / name).mkdir(parents=True)
        for image in range(count):
            Image.new("RGB", (32, 32), (40 * index % 256, 25 * image % 256, 200)).save(root / name / f"{image}.png")
    return root


@pytest.fixture(scope="module")
def three_classes(tiny_models, tmp_path_factory) -> Path:
    """car_side ×3, Faces_easy ×2, airplane ×1 (imbalanced, so top-1 and mean per-class differ)."""
    root = tmp_path_factory.mktemp("arch-three")
    labelled_folder(root / "data", {"car_side": 3, "Faces_easy": 2, "airplane": 1})
    extract(root / "data", root / "cache", **tiny(tiny_models))
    return root / "cache"


@pytest.fixture(scope="module")
def six_classes(tiny_models, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("arch-six")
    labelled_folder(root / "data", {name: 1 for name in ("a_1", "b_2", "c_3", "d_4", "e_5", "f_6")})
    extract(root / "data", root / "cache", **tiny(tiny_models))
    return root / "cache"


def recorded_prompts(monkeypatch) -> list[str]:
    seen: list[str] = []
    original = PromptStore.encode

    def encode(self, prompts, *args, **kwargs):
        seen.extend(prompts)
        return original(self, prompts, *args, **kwargs)

    monkeypatch.setattr(PromptStore, "encode", encode)
    return seen


def test_zero_shot_prompts_use_cleaned_or_mapped_class_names(vit_run, three_classes, monkeypatch):
    seen = recorded_prompts(monkeypatch)
    results = zero_shot(vit_run, three_classes)
    assert set(seen) == {"a photo of a car side.", "a photo of a faces easy.", "a photo of a airplane."}
    assert set(results) == {"trained", "untrained (same init)"}
    for metrics in results.values():  # stable keys whatever the class count; top-5 is undefined with 3 classes
        assert set(metrics) == {*ZERO_SHOT_KEYS, "per_class"} and metrics["top5"] is None
        per_class = metrics["per_class"]
        assert set(per_class) == {"car_side", "Faces_easy", "airplane"}
        # top-1 weights classes by their images (3, 2, 1); mean per-class weights them equally.
        assert metrics["top1"] == pytest.approx((3 * per_class["car_side"] + 2 * per_class["Faces_easy"]
                                                 + per_class["airplane"]) / 6)
        assert metrics["mean_per_class"] == pytest.approx(sum(per_class.values()) / 3)
    seen.clear()
    zero_shot(vit_run, three_classes, class_names={"car_side": "side view of a car"})
    assert set(seen) == {"a photo of a side view of a car.", "a photo of a faces easy.", "a photo of a airplane."}


def zero_shot_by_hand(run: Path, folder_cache: Path, words: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(rank of the true class, label) per image, recomputed in float64 from the linear checkpoint's weights."""
    weights = {name: value.double().numpy() for name, value in load_file(str(run / "best.safetensors")).items()}
    prompts = PromptStore(load_model(run)[1]["text_encoder"], None).encode([f"a photo of a {w}." for w in words])

    def unit(rows: np.ndarray) -> np.ndarray:
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)

    classes = unit(prompts.astype(np.float64) @ weights["model.text.weight"].T + weights["model.text.bias"])
    labelled = open_cache(folder_cache).split("test")
    images = unit(labelled.image_features.astype(np.float64) @ weights["model.image.weight"].T
                  + weights["model.image.bias"])
    scores = images @ classes.T
    labels = labelled.image_labels
    ranks = 1 + (scores > scores[np.arange(len(labels)), labels][:, None]).sum(axis=1)
    return ranks, labels


def test_zero_shot_accuracy_matches_a_float64_recomputation(vit_run, three_classes, six_classes):
    for cache, top5 in ((three_classes, False), (six_classes, True)):
        classes = open_cache(cache).classes
        metrics = zero_shot(vit_run, cache)["trained"]
        ranks, labels = zero_shot_by_hand(vit_run, cache, [clean_class_name(name) for name in classes])
        assert metrics["top1"] == pytest.approx(100 * np.mean(ranks == 1))
        assert metrics["top5"] == (pytest.approx(100 * np.mean(ranks <= 5)) if top5 else None)
        per_class = {name: 100 * np.mean(ranks[labels == index] == 1) for index, name in enumerate(classes)}
        assert metrics["per_class"] == pytest.approx(per_class)
        assert metrics["mean_per_class"] == pytest.approx(np.mean(list(per_class.values())))


def test_cli_zero_shot_with_a_class_names_file(vit_run, three_classes, tmp_path, capsys, monkeypatch):
    seen = recorded_prompts(monkeypatch)
    (tmp_path / "names.json").write_text(json.dumps({"Faces_easy": "human face"}))
    code, out, err = run_cli(["eval", vit_run, "--no-baselines", "--zero-shot", three_classes, "--class-names",
                              tmp_path / "names.json", "--json", tmp_path / "out.json"], capsys)
    assert code == 0, err
    assert "a photo of a human face." in seen and "a photo of a car side." in seen
    assert "mean per-class %" in out
    saved = json.loads((tmp_path / "out.json").read_text())["zero_shot"]["trained"]
    assert {"top1", "top5", "mean_per_class"} <= set(saved) and saved["top5"] is None
    (tmp_path / "bad.json").write_text("[1, 2]")
    code, _, err = run_cli(["eval", vit_run, "--zero-shot", three_classes, "--class-names", tmp_path / "bad.json"], capsys)
    assert code == 2 and "--class-names" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


