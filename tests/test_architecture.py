"""Issue #17: the defects (text-cache runs, zero-shot keys and class names, ablate cell keys, eval on another
cache), run and grid config files, the prompt store, a light `--help`, and known-answer tests of CCA, ASIF,
the learning-rate schedule and patience."""

from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys
import tomllib
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_flickr_slice, run_cli
from PIL import Image
from safetensors.torch import load_file

from vlmcache import extract, open_cache
from vlmcache.align.config import TrainConfig
from vlmcache.align.load import load_model
from vlmcache.align.train import train
from vlmcache.app.predictor import Predictor
from vlmcache.cache.store import Split, load_features
from vlmcache.encode.prompts import PromptStore
from vlmcache.errors import VlmcacheError
from vlmcache.eval.evaluate import clean_class_name, evaluate_checkpoint, zero_shot
from vlmcache.metrics.baselines import ASIF_ROW, CCA_ROW, asif_embeddings, baseline_metrics, fit_cca, relative_representation
from vlmcache.metrics.retrieval import RETRIEVAL_KEYS, ZERO_SHOT_KEYS, retrieval_metrics
from vlmcache.run.schedule import lr_factor

REPO = Path(__file__).resolve().parents[1]
ablate_module = importlib.import_module("vlmcache.align.ablate")  # `vlmcache.ablate` is the function
train_module = importlib.import_module("vlmcache.align.train")


def tiny(tiny_models, text="distilbert", **options) -> dict:
    return {"image_model": str(tiny_models["vit"]), "text_model": str(tiny_models.get(text, text)),
            "progress": False, **options}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_flickr_slice(tmp_path_factory.mktemp("arch-data") / "flickr", 6, 4)


@pytest.fixture(scope="module")
def vit_cache(data, tiny_models, tmp_path_factory) -> Path:
    """Tiny ViT images + tiny DistilBERT captions (32-d each)."""
    out = tmp_path_factory.mktemp("arch-vit") / "cache"
    extract(data, out, **tiny(tiny_models))
    return out


@pytest.fixture(scope="module")
def other_bert(tiny_models, tmp_path_factory) -> Path:
    """A second tiny DistilBERT (other weights, 48-d) sharing the first one's tokenizer."""
    import shutil

    from transformers import DistilBertConfig, DistilBertModel

    folder = tmp_path_factory.mktemp("arch-bert48") / "bert48"
    torch.manual_seed(1)
    DistilBertModel(DistilBertConfig(vocab_size=30522, dim=48, n_layers=1, n_heads=2, hidden_dim=64,
                                     max_position_embeddings=128)).save_pretrained(folder)
    for file in tiny_models["distilbert"].iterdir():
        if "token" in file.name or file.name == "vocab.txt":
            shutil.copy(file, folder / file.name)
    return folder


@pytest.fixture(scope="module")
def bert48_cache(data, tiny_models, other_bert, tmp_path_factory) -> Path:
    """The same slice with the other text encoder's captions (48-d), stored in float32."""
    out = tmp_path_factory.mktemp("arch-bert48-cache") / "cache"
    extract(data, out, **tiny(tiny_models, text=str(other_bert), dtype="float32"))
    return out


@pytest.fixture(scope="module")
def vit_run(vit_cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("arch-vit-run") / "run"
    train(vit_cache, out, TrainConfig(projector="linear", epochs=2, batch_size=4))
    return out


@pytest.fixture(scope="module")
def text_cache_run(vit_cache, bert48_cache, tmp_path_factory) -> Path:
    """Images from the 32-d DistilBERT cache, texts from the 48-d one (`train --text-cache`)."""
    out = tmp_path_factory.mktemp("arch-text-cache-run") / "run"
    train(vit_cache, out, TrainConfig(projector="linear", epochs=2, batch_size=4), text_cache=bert48_cache)
    return out


# --- defect: a run trained with --text-cache can be evaluated, searched and served ---------------------------------


def test_eval_of_a_text_cache_run_uses_the_text_cache(text_cache_run, vit_cache, bert48_cache, other_bert, tmp_path,
                                                      capsys):
    code, out, err = run_cli(["eval", text_cache_run, "--json", tmp_path / "numbers.json"], capsys)
    assert code == 0, err  # the old code compared the image cache's text encoder with the checkpoint's and refused
    rows = json.loads((tmp_path / "numbers.json").read_text())["retrieval"]
    assert [row for row in rows if "QB-Norm" not in row] == ["trained (linear + infonce)", "untrained (same init)",
                                                             CCA_ROW, ASIF_ROW]
    model, meta = load_model(text_cache_run)
    assert meta["text_dim"] == 48 and meta["text_encoder"]["name"] == str(other_bert)
    images, texts = open_cache(vit_cache).split("val"), open_cache(bert48_cache).split("val")
    with torch.no_grad():
        expected = retrieval_metrics(model.embed_images(torch.from_numpy(images.image_features)),
                                     model.embed_texts(torch.from_numpy(texts.text_features)), texts.caption_image)
    assert rows["trained (linear + infonce)"] == pytest.approx(expected)
    fitted = baseline_metrics(load_features(open_cache(vit_cache), "train", open_cache(bert48_cache)),
                              load_features(open_cache(vit_cache), "val", open_cache(bert48_cache)), 256)
    assert rows[CCA_ROW] == pytest.approx(fitted[CCA_ROW]) and rows[ASIF_ROW] == pytest.approx(fitted[ASIF_ROW])


def test_search_and_predictor_of_a_text_cache_run(text_cache_run, vit_cache, bert48_cache, data, capsys):
    val_texts = open_cache(bert48_cache).split("val")
    query = val_texts.captions[0]  # a val caption: its cached features give the expected ranking
    model, _ = load_model(text_cache_run)
    with torch.no_grad():
        expected = (model.embed_texts(torch.from_numpy(val_texts.text_features[:1]))
                    @ model.embed_images(torch.from_numpy(open_cache(vit_cache).split("val").image_features)).T)[0]
    predictor = Predictor(text_cache_run)  # what `serve` holds
    hits = predictor.search(query, top=4)
    assert [hit.score for hit in hits] == pytest.approx([float(expected[hit.row]) for hit in hits], abs=1e-4)
    assert [hit.row for hit in hits] == torch.argsort(expected, descending=True).tolist()
    # New prompts are encoded by the run's text encoder and kept beside the text cache the run read, not the image cache.
    assert list(bert48_cache.glob("prompt-features-*.bin")) and not list(vit_cache.glob("prompt-features-*.bin"))
    image = Path(open_cache(vit_cache).split("val").image_paths[0])
    rows, _ = predictor.rank_labels(image, [val_texts.captions[0], val_texts.captions[10]])
    assert sorted(row.rank for row in rows) == [1, 2]
    code, out, err = run_cli(["search", text_cache_run, query, "--top", "2"], capsys)
    assert code == 0, err
    assert open_cache(vit_cache).split("val").image_ids[hits[0].row] in out
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from vlmcache.app.serve import create_app

    served = TestClient(create_app(text_cache_run)).get("/search", params={"q": query, "top": 4}).json()["hits"]
    assert [hit["row"] for hit in served] == [hit.row for hit in hits]


def test_cli_train_with_text_cache_and_its_config_file_reproduce_the_run(text_cache_run, vit_cache, bert48_cache,
                                                                          tmp_path, capsys):
    code, _, err = run_cli(["train", vit_cache, "--text-cache", bert48_cache, "--projector", "linear", "--epochs", "2",
                            "--batch-size", "4", "--out", tmp_path / "cli"], capsys)
    assert code == 0, err
    saved = tomllib.loads((tmp_path / "cli" / "config.toml").read_text())
    assert saved["text_cache"] == str(bert48_cache.resolve())
    code, _, err = run_cli(["train", "--config", tmp_path / "cli" / "config.toml", "--out", tmp_path / "again"], capsys)
    assert code == 0, err
    metas = [load_model(run)[1] for run in (text_cache_run, tmp_path / "cli", tmp_path / "again")]
    assert metas[2]["text_cache"] == str(bert48_cache.resolve())
    assert metas[0]["best_metrics"] == metas[1]["best_metrics"] == metas[2]["best_metrics"]
    code, _, err = run_cli(["eval", tmp_path / "again", "--no-baselines"], capsys)
    assert code == 0, err


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


# --- defect: ablate cells are keyed by the vlmcache version ------------------------------------------------------


def test_ablate_cell_key_includes_the_version(vit_cache, tmp_path, monkeypatch):
    cell = ablate_module.Cell(str(vit_cache), asdict(TrainConfig(projector="linear", epochs=1, batch_size=4)))
    key = cell.key()
    assert ablate_module.Cell(str(vit_cache), dict(cell.config)).key() == key  # same inputs, same key
    grid = {"projectors": ("linear",), "losses": ("infonce",), "seeds": (0,), "epochs": 1, "jobs": 1,
            "with_baselines": False, "base_config": {"batch_size": 4}, "progress": False}
    first = ablate_module.ablate([vit_cache], tmp_path / "ab", **grid)
    assert (first.cells_trained, first.cells_reused) == (1, 0)
    assert ablate_module.ablate([vit_cache], tmp_path / "ab", **grid).cells_reused == 1
    monkeypatch.setattr(ablate_module, "__version__", "999.0.0")
    assert cell.key() != key
    after_upgrade = ablate_module.ablate([vit_cache], tmp_path / "ab", **grid)
    assert (after_upgrade.cells_trained, after_upgrade.cells_reused) == (1, 0)


# --- defect: eval --cache OTHER keeps CCA and ASIF, fitted on the run's training cache ------------------------------


def test_eval_on_another_cache_fits_baselines_on_the_runs_training_cache(vit_run, vit_cache, tiny_models, tmp_path,
                                                                         capsys):
    # Another dataset with only a val split: there is nothing in it to fit the baselines on (the old code
    # dropped the CCA and ASIF rows here, and fitted them on OTHER's own train split when it had one).
    other = make_flickr_slice(tmp_path / "other-data", 3, 3)
    extract(other, tmp_path / "other", **tiny(tiny_models, splits=["val"]))
    assert open_cache(tmp_path / "other").splits == ["val"]
    report = evaluate_checkpoint(vit_run, cache=tmp_path / "other")
    assert report.split == "val" and [row for row in report.rows if "QB-Norm" not in row] == [
        "trained (linear + infonce)", "untrained (same init)", CCA_ROW, ASIF_ROW]
    expected = baseline_metrics(open_cache(vit_cache).split("train"), open_cache(tmp_path / "other").split("val"), 256)
    assert report.rows[CCA_ROW] == pytest.approx(expected[CCA_ROW])
    assert report.rows[ASIF_ROW] == pytest.approx(expected[ASIF_ROW])
    code, out, err = run_cli(["eval", vit_run, "--cache", tmp_path / "other"], capsys)
    assert code == 0 and CCA_ROW in out and "ASIF" in out, err


# --- run and grid config files ------------------------------------------------------------------------------------


def test_train_config_file_cli_override_and_reproduction(vit_cache, tmp_path, capsys):
    (tmp_path / "run.toml").write_text('projector = "linear"\nloss = "sigmoid"\nepochs = 2\nbatch-size = 4\n'
                                       'lr = 0.01\nseed = 3\nwarmup = 0\n')
    code, _, err = run_cli(["train", vit_cache, "--config", tmp_path / "run.toml", "--out", tmp_path / "a"], capsys)
    assert code == 0, err
    config = load_model(tmp_path / "a")[1]["config"]
    assert (config["projector"], config["loss"], config["epochs"], config["batch_size"], config["lr"], config["seed"],
            config["warmup"]) == ("linear", "sigmoid", 2, 4, 0.01, 3, 0)
    assert config["dim"] == 256  # not in the file: the default
    code, _, err = run_cli(["train", vit_cache, "--config", tmp_path / "run.toml", "--epochs", "3", "--seed", "0",
                            "--out", tmp_path / "b"], capsys)
    assert code == 0, err
    config = load_model(tmp_path / "b")[1]["config"]
    assert (config["epochs"], config["seed"], config["loss"], config["lr"]) == (3, 0, "sigmoid", 0.01)
    # The run's resolved config reproduces it from one file.
    saved = tomllib.loads((tmp_path / "a" / "config.toml").read_text())
    assert saved["cache"] == str(vit_cache.resolve()) and saved["loss"] == "sigmoid" and saved["lr"] == 0.01
    code, _, err = run_cli(["train", "--config", tmp_path / "a" / "config.toml", "--out", tmp_path / "c"], capsys)
    assert code == 0, err
    first, again = (load_model(tmp_path / name)[1] for name in ("a", "c"))
    assert again["best_metrics"] == first["best_metrics"] and again["config"] == first["config"]
    weights = load_file(str(tmp_path / "a" / "best.safetensors")), load_file(str(tmp_path / "c" / "best.safetensors"))
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    (tmp_path / "typo.toml").write_text("epocs = 3\n")
    code, _, err = run_cli(["train", vit_cache, "--config", tmp_path / "typo.toml", "--out", tmp_path / "d"], capsys)
    assert code == 2 and "unknown key 'epocs'" in err


def test_ablate_config_file_and_override(vit_cache, tmp_path, capsys):
    (tmp_path / "grid.toml").write_text(f'caches = ["{vit_cache}"]\nprojectors = ["linear"]\nlosses = ["infonce"]\n'
                                        'seeds = [0, 1]\nepochs = 1\nbatch_size = 4\njobs = 1\nbaselines = false\n'
                                        'lr = 0.005\n')
    code, out, err = run_cli(["ablate", "--config", tmp_path / "grid.toml", "--out", tmp_path / "ab"], capsys)
    assert code == 0, err
    cells = json.loads((tmp_path / "ab" / "ablation.json").read_text())["cells"]
    assert sorted(cell["config"]["seed"] for cell in cells) == [0, 1]
    assert {(cell["config"]["lr"], cell["config"]["batch_size"], cell["config"]["epochs"]) for cell in cells} == {(0.005, 4, 1)}
    direct = ablate_module.ablate([vit_cache], tmp_path / "direct", projectors=("linear",), losses=("infonce",),
                                  seeds=(0, 1), epochs=1, jobs=1, with_baselines=False,
                                  base_config={"lr": 0.005, "batch_size": 4}, progress=False)
    saved = json.loads((tmp_path / "ab" / "ablation.json").read_text())["rows"]
    assert [row[key] for row in saved for key in RETRIEVAL_KEYS] == [row[key] for row in direct.rows for key in RETRIEVAL_KEYS]
    code, _, err = run_cli(["ablate", "--config", tmp_path / "grid.toml", "--seeds", "1", "--out", tmp_path / "ab1"], capsys)
    assert code == 0, err
    cells = json.loads((tmp_path / "ab1" / "ablation.json").read_text())["cells"]
    assert [cell["config"]["seed"] for cell in cells] == [1]


# --- known answers: CCA, ASIF, learning-rate schedule, patience -----------------------------------------------------


def test_cca_one_dimensional_case_by_hand():
    # x = [1, 2, 3], y = 2x: centred x = [-1, 0, 1], var x = 2/3, var y = 8/3, cov = 4/3. With the ridge
    # (1e-3 · tr(C)/d added to each variance) the whitened cross-covariance is 1/1.001, the canonical
    # correlation; maps are whitening · correlation, with one sign shared by both sides.
    image_mean, image_map, text_mean, text_map = fit_cca(np.array([[1.0], [2.0], [3.0]]),
                                                          np.array([[2.0], [4.0], [6.0]]), dim=5)
    assert image_mean.tolist() == [2.0] and text_mean.tolist() == [4.0] and image_map.shape == (1, 1)
    assert abs(image_map[0, 0]) == pytest.approx(1 / (math.sqrt(2 / 3 * 1.001) * 1.001), rel=1e-6)
    assert abs(text_map[0, 0]) == pytest.approx(1 / (math.sqrt(8 / 3 * 1.001) * 1.001), rel=1e-6)
    assert np.sign(image_map[0, 0]) == np.sign(text_map[0, 0])


def test_cca_recovers_a_rotation_exactly():
    # texts = images @ R (R orthogonal): every canonical correlation is (up to the ridge) 1 and CCA maps an
    # image and its caption to the same point, so retrieval is perfect.
    generator = np.random.default_rng(0)
    images = generator.normal(size=(40, 5)) * np.array([3.0, 2.0, 1.0, 0.5, 0.2]) + 7.0
    rotation, _ = np.linalg.qr(generator.normal(size=(5, 5)))
    texts = images @ rotation
    image_mean, image_map, text_mean, text_map = fit_cca(images, texts, dim=5, ridge=1e-9)
    image_emb, text_emb = (images - image_mean) @ image_map, (texts - text_mean) @ text_map
    assert np.allclose(image_emb, text_emb, atol=1e-4)
    # Weighted by correlation 1, the embeddings are the whitened data: identity covariance.
    assert np.allclose(image_emb.T @ image_emb / len(images), np.eye(5), atol=1e-4)
    metrics = retrieval_metrics(image_emb, text_emb, np.arange(40))
    assert metrics["i2t_r1"] == 100.0 and metrics["t2i_r1"] == 100.0


def test_asif_relative_representation_by_hand():
    anchors = torch.tensor([[2.0, 0.0], [0.0, 5.0], [-1.0, -1.0]])  # normalised: (1,0), (0,1), -(1,1)/√2
    query = torch.tensor([[3.0, 4.0]])  # normalised (0.6, 0.8): cosines 0.6, 0.8, -0.99
    # top-2 = anchors 1 and 0; squared: 0.64, 0.36; renormalised by √(0.64² + 0.36²).
    norm = math.hypot(0.36, 0.64)
    assert torch.allclose(relative_representation(query, anchors, k=2, power=2),
                          torch.tensor([[0.36 / norm, 0.64 / norm, 0.0]]), atol=1e-6)
    # k=3 keeps the negative cosine, which is clamped to 0 before the power: same result.
    assert torch.allclose(relative_representation(query, anchors, k=3, power=2),
                          torch.tensor([[0.36 / norm, 0.64 / norm, 0.0]]), atol=1e-6)
    assert torch.allclose(relative_representation(query, anchors, k=1, power=4), torch.tensor([[0.0, 1.0, 0.0]]))


def split(images, texts) -> Split:
    images, texts = np.asarray(images, dtype=np.float32), np.asarray(texts, dtype=np.float32)
    return Split("x", images, texts, np.arange(len(images)), [str(i) for i in range(len(images))],
                 [""] * len(images), [""] * len(texts), None)


def test_asif_embeddings_by_hand_across_two_spaces():
    # Anchors centred at 0 in both spaces; texts live in a rotated, scaled copy of the image space.
    rotation = np.array([[0.0, -1.0], [1.0, 0.0]])
    anchor_images = np.array([[2.0, 0.0], [0.0, 2.0], [-2.0, -2.0]])
    train = split(anchor_images, 10 * anchor_images @ rotation)
    evaluated = split([[3.0, 4.0], [-1.0, -2.0]], 10 * np.array([[3.0, 4.0], [-1.0, -2.0]]) @ rotation)
    images, texts = asif_embeddings(train, evaluated, k=2, power=2)
    # Query (3,4) → (0.6, 0.8): cosines 0.6, 0.8, -0.99 → top-2 squared (0.36, 0.64, 0), renormalised.
    norm = math.hypot(0.36, 0.64)
    assert torch.allclose(images[0], torch.tensor([0.36 / norm, 0.64 / norm, 0.0]), atol=1e-6)
    # Query (-1,-2): cosines -1/√5, -2/√5, 3/√10 → only anchor 2 is positive: (0, 0, 1).
    assert torch.allclose(images[1], torch.tensor([0.0, 0.0, 1.0]), atol=1e-6)
    assert torch.allclose(texts, images, atol=1e-6)  # same relative similarities in the other space


def test_learning_rate_schedule_values():
    cosine = TrainConfig(warmup=4, schedule="cosine")
    assert [lr_factor(cosine, step, 24) for step in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_factor(cosine, 4 + 10, 24) == pytest.approx(0.5)  # halfway through the 20 cosine steps
    assert lr_factor(cosine, 24, 24) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(cosine, 23, 24) == pytest.approx(0.5 * (1 + math.cos(math.pi * 19 / 20)))
    onecycle = TrainConfig(schedule="onecycle")  # peak at 30% of 20 steps = step 6
    assert [lr_factor(onecycle, step, 20) for step in (0, 3, 6)] == [0.0, 0.5, 1.0]
    assert lr_factor(onecycle, 6 + 7, 20) == pytest.approx(0.5) and lr_factor(onecycle, 20, 20) == pytest.approx(0.0)
    assert {lr_factor(TrainConfig(schedule="constant"), step, 10) for step in range(10)} == {1.0}


def test_training_follows_the_schedule(vit_cache, tmp_path):
    # 6 images, batch 4: 2 steps per epoch, 4 in all. With no warm-up, after epoch 1 (2 steps) the cosine is
    # at its midpoint and after epoch 2 at its end.
    result = train(vit_cache, tmp_path / "run", TrainConfig(projector="linear", epochs=2, batch_size=4, warmup=0,
                                                            lr=0.02))
    assert [record["lr"] for record in result.history] == pytest.approx([0.01, 0.0], abs=1e-12)


@pytest.mark.parametrize(("recalls", "patience", "epochs_run", "best_epoch"), [
    ([10.0] * 10, 3, 4, 1),                      # never improves after epoch 1: stops after patience + 1 epochs
    ([10.0, 20.0, 20.0, 15.0] + [99.0] * 6, 2, 4, 2),  # a tie is not an improvement
    ([10.0, 20.0, 15.0, 30.0, 5.0, 5.0, 5.0] + [99.0] * 3, 2, 6, 4),  # an improvement resets the count
])
def test_patience_stops_after_exactly_n_epochs_without_improvement(vit_cache, tmp_path, monkeypatch, recalls, patience,
                                                                   epochs_run, best_epoch):
    scripted = iter(recalls)

    def evaluate_model(model, split, device="cpu"):
        value = next(scripted)
        return {**{key: value for key in RETRIEVAL_KEYS}, "i2t_median_rank": 1.0, "t2i_median_rank": 1.0}

    monkeypatch.setattr(train_module, "evaluate_model", evaluate_model)
    result = train(vit_cache, tmp_path / "run", TrainConfig(projector="linear", epochs=10, batch_size=4,
                                                            patience=patience))
    assert len(result.history) == epochs_run and result.best_epoch == best_epoch
    assert result.best_metrics["mean_recall"] == recalls[best_epoch - 1]
    assert load_model(tmp_path / "run")[1]["best_epoch"] == best_epoch


# --- the prompt store ----------------------------------------------------------------------------------------------


@pytest.fixture
def counted_encoder(monkeypatch) -> list[list[str]]:
    """Each call of the frozen text encoder (whichever kind the store loads), with the prompts it was given."""
    calls: list[list[str]] = []
    loaded = PromptStore.encoder

    class Counting:
        def __init__(self, encoder):
            self.encoder = encoder

        def encode(self, texts, *args, **kwargs):
            calls.append(list(texts))
            return self.encoder.encode(texts, *args, **kwargs)

    monkeypatch.setattr(PromptStore, "encoder", property(lambda store: Counting(loaded.fget(store))))
    return calls


def test_prompt_store_encodes_once_and_appends(vit_cache, tmp_path, counted_encoder):
    provenance = open_cache(vit_cache).provenance["texts"]["encoder"]
    store = PromptStore(provenance, tmp_path)
    record = PromptStore(provenance, None).record.itemsize  # key, features and check
    first = store.encode(["a dog", "a cat", "a dog"])
    assert counted_encoder == [["a dog", "a cat"]] and first.shape == (3, 32) and np.array_equal(first[0], first[2])
    assert store.path.stat().st_size == 2 * record
    before, inode = store.path.read_bytes(), store.path.stat().st_ino
    again = store.encode(["a cat", "a dog"])
    assert len(counted_encoder) == 1 and np.array_equal(again, first[[1, 0]])  # no encoder call for known prompts
    store.encode(["a car", "a dog"])
    assert counted_encoder[-1] == ["a car"]
    # Appended: the first two records are untouched bytes of the same file, plus exactly one record.
    assert store.path.stat().st_size == 3 * record and store.path.stat().st_ino == inode
    assert store.path.read_bytes()[:2 * record] == before
    # Another process reads them back without the encoder.
    reloaded = PromptStore(provenance, tmp_path)
    assert np.array_equal(reloaded.encode(["a dog", "a cat", "a car"]), store.encode(["a dog", "a cat", "a car"]))
    assert len(counted_encoder) == 2


def test_prompt_store_ignores_a_truncated_tail_and_keeps_appending(vit_cache, tmp_path, counted_encoder):
    provenance = open_cache(vit_cache).provenance["texts"]["encoder"]
    record = PromptStore(provenance, None).record.itemsize  # key, features and check
    store = PromptStore(provenance, tmp_path)
    features = store.encode(["a dog", "a cat"])
    with open(store.path, "ab") as handle:  # a record cut short by a kill: its key and half its features
        handle.write(store.path.read_bytes()[:32 + 2 * provenance["dim"]])
    reloaded = PromptStore(provenance, tmp_path)
    assert len(reloaded.known) == 2
    assert np.array_equal(reloaded.encode(["a dog", "a cat"]), features) and len(counted_encoder) == 1
    reloaded.encode(["a bird"])  # appended after the cut: must be read back, not misaligned by the tail
    third = PromptStore(provenance, tmp_path)
    assert len(third.known) == 3 and store.path.stat().st_size == 3 * record
    third.encode(["a bird", "a dog"])
    assert len(counted_encoder) == 2


def test_prompt_store_stops_growing_at_max_rows(vit_cache, tmp_path, counted_encoder):
    provenance = open_cache(vit_cache).provenance["texts"]["encoder"]
    record = PromptStore(provenance, None).record.itemsize  # key, features and check
    store = PromptStore(provenance, tmp_path, max_rows=3)
    prompts = ["one", "two", "three", "four", "five"]
    features = store.encode(prompts)
    assert features.shape == (5, 32) and store.path.stat().st_size == 3 * record and len(store.known) == 3
    unbounded = PromptStore(provenance, None)  # no file: the same features for all five
    assert np.allclose(unbounded.encode(prompts), features, atol=1e-6)
    store.encode(["six"])
    assert store.path.stat().st_size == 3 * record
    assert len(PromptStore(provenance, tmp_path, max_rows=3).known) == 3


# --- a light command line --------------------------------------------------------------------------------------------


def test_cli_import_and_help_do_not_import_torch_or_h5py():
    probe = subprocess.run([sys.executable, "-c", "import sys, vlmcache.app.cli; "
                            "print('torch' in sys.modules, 'h5py' in sys.modules)"],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == ["False", "False"]
    helped = subprocess.run([sys.executable, "-X", "importtime", "-m", "vlmcache", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "extract" in helped.stdout
    imported = {line.split("|")[-1].strip().split(".")[0] for line in helped.stderr.splitlines() if "|" in line}
    assert "typer" in imported and not imported & {"torch", "h5py", "transformers"}


def test_bad_config_file_is_one_line(tmp_path, capsys):
    (tmp_path / "bad.toml").write_text("epochs = [")
    code, _, err = run_cli(["train", "x", "--config", tmp_path / "bad.toml"], capsys)
    assert code == 2 and "--config" in err and "Traceback" not in err
    with pytest.raises(VlmcacheError, match="file not found"):
        importlib.import_module("vlmcache.align.config").read_config_file(tmp_path / "missing.toml")
