"""The run's search index: one-off search without PyTorch, same answers as the predictor, never stale."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_flickr_slice

from vlmcache.align.config import TrainConfig
from vlmcache.align.train import train
from vlmcache.app.predictor import Predictor
from vlmcache.app.search import build_index, search_images
from vlmcache.app.search_index import FOLDER, search_with_index
from vlmcache.encode.extract import extract

QUERY = "a dog runs on the grass"


@pytest.fixture(scope="module")
def run(tiny_models, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("search-index")
    data = make_flickr_slice(root / "flickr", 6, 4)
    extract(data, root / "cache", image_model=str(tiny_models["vit"]), text_model=str(tiny_models["distilbert"]),
            progress=False)
    assert (root / "cache" / "text-encoder.onnx").is_file()  # the saved ONNX text encoder the fast path uses
    train(root / "cache", root / "run", TrainConfig(projector="mlp", epochs=2, batch_size=4, standardize=True))
    return root / "run"


def same_hits(first, second) -> None:
    assert [hit.image_id for hit in first] == [hit.image_id for hit in second]
    assert [hit.row for hit in first] == [hit.row for hit in second]
    assert np.allclose([hit.score for hit in first], [hit.score for hit in second], atol=1e-5)


def test_the_index_answers_like_the_predictor(run):
    assert search_with_index(run, QUERY, 4) is None  # nothing written yet: the PyTorch path must answer
    assert build_index(run) is not None
    indexed = search_with_index(run, QUERY, 4)
    same_hits(indexed, Predictor(run).search(QUERY, 4))
    same_hits(search_images(run, QUERY, 3, split="train"), Predictor(run).search(QUERY, 3, split="train"))
    assert search_with_index(run, QUERY, 3, split="train") is not None  # the first search of a split keeps its index


def test_a_one_off_search_with_an_index_never_imports_torch(run):
    build_index(run)
    code = ("import sys; from vlmcache.app.search import search_images; "
            f"hits = search_images({str(run)!r}, 'a brand new query about a red car', 2); "
            "assert len(hits) == 2 and 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_a_changed_checkpoint_never_reads_the_old_index(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    build_index(copy)
    before = search_images(copy, QUERY, 4)
    # Retrain into the same folder with another seed: new weights, so the old index must not answer.
    train(Predictor(run).meta["cache"], copy, TrainConfig(projector="mlp", epochs=2, batch_size=4, seed=7,
                                                         standardize=True), overwrite=True)
    after = search_images(copy, QUERY, 4)
    same_hits(after, Predictor(copy).search(QUERY, 4))
    assert [hit.score for hit in after] != [hit.score for hit in before]
    assert len(list((copy / FOLDER).glob("*.safetensors"))) == 2


def test_qbnorm_takes_the_pytorch_path(run):
    build_index(run, split="val")
    normalised = search_images(run, QUERY, 4, split="val", qbnorm=True)
    same_hits(normalised, Predictor(run).search(QUERY, 4, split="val", qbnorm=True))
    assert [hit.score for hit in normalised] != [hit.score for hit in search_images(run, QUERY, 4, split="val")]


def test_training_from_python_leaves_a_searchable_index(run, tmp_path):
    """`vlmcache.train` (the library call, not only the CLI) writes the run's search index."""
    import vlmcache

    cache = Predictor(run).meta["cache"]
    result = vlmcache.train(cache, tmp_path / "run", TrainConfig(projector="linear", epochs=1, batch_size=4))
    assert list((result.out / FOLDER).glob("*.safetensors"))
    assert search_with_index(result.out, QUERY, 2) is not None
