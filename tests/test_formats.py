"""clip-retrieval / DataComp / npy embeddings in and out of a cache, on files the tests write themselves."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_cli

from vlmcache.cache.store import open_cache
from vlmcache.data.datasets import PairDataset
from vlmcache.data.formats import export_cache, hash_files, import_embeddings
from vlmcache.errors import VlmcacheError


def write_clip_retrieval(folder, parts=(30, 20), image_dim=16, text_dim=12, seed=0, splits=True, caption="caption"):
    """A clip-retrieval embeddings folder; text = image @ W + noise, so a projector has something to learn."""
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((image_dim, text_dim))
    for kind in ("img_emb", "text_emb", "metadata"):
        (folder / kind).mkdir(parents=True, exist_ok=True)
    arrays = []
    for number, rows in enumerate(parts):
        image = rng.standard_normal((rows, image_dim)).astype(np.float16)
        text = (image.astype(np.float32) @ mixing + 0.1 * rng.standard_normal((rows, text_dim))).astype(np.float16)
        np.save(folder / "img_emb" / f"img_emb_{number}.npy", image)
        np.save(folder / "text_emb" / f"text_emb_{number}.npy", text)
        columns = {"image_path": [f"part{number}/img{r}.jpg" for r in range(rows)],
                   caption: [f"caption {number}-{r}" for r in range(rows)]}
        if splits:  # interleaved on purpose: the cache groups them
            columns["split"] = ["val" if r % 4 == 1 else "train" for r in range(rows)]
        pq.write_table(pa.table(columns), folder / "metadata" / f"metadata_{number}.parquet")
        arrays.append((image, text, columns))
    return arrays


def test_clip_retrieval_import_then_raw_export_round_trips(tmp_path):
    source = write_clip_retrieval(tmp_path / "src")
    result = import_embeddings(tmp_path / "src", tmp_path / "cache", "clip-retrieval", shard_size=16, progress=False)
    assert (result.images, result.captions) == (50, 50)
    cache = open_cache(tmp_path / "cache")
    assert cache.splits == ["train", "val"] and cache.manifest["dataset"]["splits"]["val"]["images"] == 8 + 5
    assert cache.image_dim == 16 and cache.text_dim == 12
    # Each cache row holds exactly its source row's vectors, found through the id.
    expected = {cols["image_path"][r]: (image[r], text[r], cols["caption"][r], cols["split"][r])
                for image, text, cols in source for r in range(len(image))}
    index = cache.index
    images, texts = cache.read("images", slice(0, 50)), cache.read("texts", slice(0, 50))
    for row, image_id in enumerate(index["image_id"]):
        image, text, caption, split = expected[image_id]
        assert np.array_equal(images[row], image) and np.array_equal(texts[row], text)
        assert index["caption"][row] == caption and index["image_split"][row] == split

    export_cache(tmp_path / "cache", tmp_path / "out", raw=True, rows_per_file=32, progress=False)
    for kind in ("img_emb/img_emb_0.npy", "img_emb/img_emb_1.npy", "text_emb/text_emb_1.npy",
                 "metadata/metadata_0.parquet", "metadata/metadata_1.parquet"):
        assert (tmp_path / "out" / kind).is_file()
    exported = np.concatenate([np.load(tmp_path / "out" / "img_emb" / f"img_emb_{n}.npy") for n in (0, 1)])
    exported_text = np.concatenate([np.load(tmp_path / "out" / "text_emb" / f"text_emb_{n}.npy") for n in (0, 1)])
    meta = pa.concat_tables([pq.read_table(tmp_path / "out" / "metadata" / f"metadata_{n}.parquet") for n in (0, 1)])
    assert exported.dtype == np.float16 and len(exported) == meta.num_rows == 50
    for row, (path, caption) in enumerate(zip(meta["image_path"].to_pylist(), meta["caption"].to_pylist(), strict=True)):
        image, text, source_caption, _ = expected[path]
        assert np.array_equal(exported[row], image) and np.array_equal(exported_text[row], text)
        assert caption == source_caption

    # Re-importing the export (another folder, rows now grouped by split) gives the same features and captions.
    import_embeddings(tmp_path / "out", tmp_path / "again", "clip-retrieval", progress=False)
    again = open_cache(tmp_path / "again")
    assert np.array_equal(again.read("images", slice(0, 50)), images)
    assert again.index["caption"] == index["caption"]


@pytest.fixture
def tiny_cache(flickr_slice, tiny_models, tmp_path):
    """6 train + 4 val real Flickr8k images with 5 captions each, encoded by the tiny config-built models."""
    from vlmcache.encode.extract import extract

    extract(flickr_slice, tmp_path / "tiny-cache", image_model=str(tiny_models["vit"]),
            text_model=str(tiny_models["distilbert"]), progress=False)
    return tmp_path / "tiny-cache"


def test_export_normalises_like_clip_retrieval_and_keeps_row_order(tiny_cache, tmp_path):
    cache = open_cache(tiny_cache)
    export_cache(tiny_cache, tmp_path / "first", splits=["val"], progress=False)
    image = np.load(tmp_path / "first" / "img_emb" / "img_emb_0.npy")
    text = np.load(tmp_path / "first" / "text_emb" / "text_emb_0.npy")
    meta = pq.read_table(tmp_path / "first" / "metadata" / "metadata_0.parquet").to_pydict()
    val = cache.split("val")
    assert image.dtype == np.float16 and len(image) == len(text) == len(val.image_ids) == 4
    assert np.allclose(np.linalg.norm(image.astype(np.float32), axis=1), 1, atol=2e-3)
    reference = val.image_features / np.linalg.norm(val.image_features, axis=1, keepdims=True)
    assert np.allclose(image, reference, atol=2e-3)
    first_caption = np.unique(val.caption_image, return_index=True)[1]  # each image's first caption
    assert meta["caption"] == [val.captions[c] for c in first_caption] and meta["image_id"] == val.image_ids
    assert set(meta["split"]) == {"val"}
    captions_text = val.text_features[first_caption]
    assert np.allclose(text, captions_text / np.linalg.norm(captions_text, axis=1, keepdims=True), atol=2e-3)

    export_cache(tiny_cache, tmp_path / "all", splits=["val"], captions="all", progress=False)
    every = pq.read_table(tmp_path / "all" / "metadata" / "metadata_0.parquet").to_pydict()
    assert every["caption"] == val.captions and len(every["image_id"]) == 20
    assert every["image_id"] == [val.image_ids[i] for i in val.caption_image]


def test_datacomp_import_picks_a_feature_set(tmp_path):
    rng = np.random.default_rng(1)
    for number, rows in enumerate((12, 8)):
        np.savez(tmp_path / f"{number:08d}.npz", b32_img=rng.standard_normal((rows, 8)).astype(np.float16),
                 b32_txt=rng.standard_normal((rows, 8)).astype(np.float16),
                 l14_img=rng.standard_normal((rows, 10)).astype(np.float16),
                 l14_txt=rng.standard_normal((rows, 10)).astype(np.float16))
        pq.write_table(pa.table({"uid": [f"{number}-{r:04x}" for r in range(rows)], "text": [f"t{r}" for r in range(rows)],
                                 "url": [f"http://x/{r}.jpg" for r in range(rows)]}), tmp_path / f"{number:08d}.parquet")
    with pytest.raises(VlmcacheError, match="--features"):
        import_embeddings(tmp_path, tmp_path / "cache", "datacomp", progress=False)
    import_embeddings(tmp_path, tmp_path / "cache", "datacomp", features="l14", val_fraction=0.25, progress=False)
    cache = open_cache(tmp_path / "cache")
    assert cache.image_dim == 10 and cache.manifest["dataset"]["splits"]["val"]["images"] == 5
    assert cache.provenance["images"]["encoder"]["name"] == "imported datacomp l14 images"
    with np.load(tmp_path / "00000000.npz") as first:
        row = cache.index["image_id"].index("0-0003")
        assert np.array_equal(cache.read("images", slice(row, row + 1))[0], first["l14_img"][3])
    assert cache.index["image_path"][row] == "http://x/3.jpg"


def test_npy_import_with_captions_txt_records_provenance(tmp_path, capsys):
    rng = np.random.default_rng(2)
    np.save(tmp_path / "img_emb.npy", rng.standard_normal((6, 4)).astype(np.float32))
    np.save(tmp_path / "text_emb.npy", rng.standard_normal((6, 3)).astype(np.float32))
    (tmp_path / "captions.txt").write_text("\n".join(f"caption {n}" for n in range(6)) + "\n", encoding="utf-8")
    code, out, err = run_cli(["import", tmp_path, "--format", "npy", "--out", tmp_path / "cache"], capsys)
    assert code == 0, err
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    digest = hash_files([tmp_path / "img_emb.npy", tmp_path / "text_emb.npy", tmp_path / "captions.txt"])
    assert manifest["imported_from"].startswith(f"imported from {tmp_path.resolve()} (npy")
    assert digest in manifest["imported_from"]
    assert manifest["provenance"]["texts"]["encoder"]["source_sha256"] == digest
    cache = open_cache(tmp_path / "cache")
    recomputed = PairDataset("", tmp_path, cache.index["image_path"], cache.index["image_id"], cache.index["image_split"],
                             cache.index["caption"], np.asarray(cache.index["caption_image"]))
    fingerprint = manifest["dataset"]["fingerprint"]
    assert fingerprint == recomputed.fingerprint() == manifest["provenance"]["images"]["dataset_fingerprint"]
    code, out, _ = run_cli(["info", tmp_path / "cache"], capsys)
    assert code == 0 and "imported npy images" in out


def test_import_resumes_and_a_complete_cache_is_kept(tmp_path):
    write_clip_retrieval(tmp_path / "src")
    import_embeddings(tmp_path / "src", tmp_path / "cache", "clip-retrieval", shard_size=16, progress=False)
    shard = tmp_path / "cache" / "texts" / "shard-00001.h5"
    before = {path.name: path.read_bytes() for path in (tmp_path / "cache" / "images").iterdir()}
    with h5py.File(shard, "r") as handle:
        texts = handle["features"][()]
    shard.unlink()  # as if killed before that shard was written
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    manifest["status"] = "incomplete"
    (tmp_path / "cache" / "manifest.json").write_text(json.dumps(manifest))
    result = import_embeddings(tmp_path / "src", tmp_path / "cache", "clip-retrieval", shard_size=16, progress=False)
    assert result.shards_written == 2 and result.shards_reused == 6  # shard 1 of both modalities rewritten
    with h5py.File(shard, "r") as handle:
        assert np.array_equal(handle["features"][()], texts)
    assert open_cache(tmp_path / "cache").manifest["status"] == "complete"
    assert before["shard-00000.h5"] == (tmp_path / "cache" / "images" / "shard-00000.h5").read_bytes()
    with pytest.raises(VlmcacheError, match="made differently"):
        import_embeddings(tmp_path / "src", tmp_path / "cache", "clip-retrieval", shard_size=8, progress=False)


def test_train_eval_and_ablate_run_on_an_imported_cache(tmp_path):
    from vlmcache.align.ablate import ablate
    from vlmcache.align.config import TrainConfig
    from vlmcache.align.train import train
    from vlmcache.eval.evaluate import evaluate_checkpoint

    write_clip_retrieval(tmp_path / "src", parts=(300, 100), image_dim=32, text_dim=24)
    import_embeddings(tmp_path / "src", tmp_path / "cache", "clip-retrieval", progress=False)
    result = train(tmp_path / "cache", tmp_path / "run", TrainConfig(projector="linear", epochs=15, batch_size=64, dim=32))
    report = evaluate_checkpoint(tmp_path / "run")
    trained, untrained = report.rows["trained (linear + infonce)"], report.rows["untrained (same init)"]
    # text = image @ W + noise: a linear projector finds the pairing, the untrained one is near chance (1%).
    assert result.best_metrics["mean_recall"] == trained["mean_recall"] > 60 > 15 > untrained["mean_recall"]
    grid = ablate([tmp_path / "cache"], tmp_path / "ablation", projectors=("linear",), losses=("infonce",), seeds=(0,),
                  epochs=2, jobs=1, with_baselines=False)
    assert grid.rows[0]["projector"] == "linear" and grid.rows[0]["mean_recall"] > 0


def test_bad_embeddings_name_the_file_and_row(tmp_path, capsys):
    write_clip_retrieval(tmp_path / "rows")
    np.save(tmp_path / "rows" / "img_emb" / "img_emb_1.npy", np.zeros((19, 16), np.float16))
    with pytest.raises(VlmcacheError, match=r"img_emb_1.npy: 19 rows but .*metadata_1.parquet has 20"):
        import_embeddings(tmp_path / "rows", tmp_path / "c1", "clip-retrieval", progress=False)

    source = write_clip_retrieval(tmp_path / "nan")
    text = source[1][1].copy()
    text[7, 3] = np.nan
    np.save(tmp_path / "nan" / "text_emb" / "text_emb_1.npy", text)
    code, _, err = run_cli(["import", tmp_path / "nan", "--out", tmp_path / "c2"], capsys)
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(error_lines) == 1 and "Traceback" not in err
    assert "text_emb_1.npy row 7: NaN or inf" in error_lines[0]
    result = import_embeddings(tmp_path / "nan", tmp_path / "c3", "clip-retrieval", on_error="skip", progress=False)
    assert [(s["modality"], s["item"]) for s in result.skipped] == [("texts", "caption 1-7")]
    assert "text_emb_1.npy row 7" in result.skipped[0]["reason"]
    assert len(open_cache(tmp_path / "c3").split("train").captions) == 37 - 1  # the bad pair is left out of training

    write_clip_retrieval(tmp_path / "dtype")
    np.save(tmp_path / "dtype" / "img_emb" / "img_emb_0.npy", np.zeros((30, 16), np.int32))
    with pytest.raises(VlmcacheError, match=r"img_emb_0.npy: dtype int32"):
        import_embeddings(tmp_path / "dtype", tmp_path / "c4", "clip-retrieval", progress=False)

    write_clip_retrieval(tmp_path / "dim")
    np.save(tmp_path / "dim" / "text_emb" / "text_emb_1.npy", np.zeros((20, 13), np.float16))
    with pytest.raises(VlmcacheError, match=r"text_emb_1.npy: dimension 13, but earlier files have 12"):
        import_embeddings(tmp_path / "dim", tmp_path / "c5", "clip-retrieval", progress=False)

    write_clip_retrieval(tmp_path / "column", caption="text")
    with pytest.raises(VlmcacheError, match=r"metadata_0.parquet: no caption column 'caption' \(it has image_path, text"):
        import_embeddings(tmp_path / "column", tmp_path / "c6", "clip-retrieval", progress=False)
    import_embeddings(tmp_path / "column", tmp_path / "c6", "clip-retrieval", caption_column="text", progress=False)

    write_clip_retrieval(tmp_path / "empty")
    pq.write_table(pa.table({"image_path": [f"i{r}" for r in range(20)], "caption": ["ok"] * 5 + [None] + ["ok"] * 14}),
                   tmp_path / "empty" / "metadata" / "metadata_1.parquet")
    with pytest.raises(VlmcacheError, match=r"metadata_1.parquet row 5: empty or missing caption"):
        import_embeddings(tmp_path / "empty", tmp_path / "c7", "clip-retrieval", progress=False)
