"""clip-retrieval / DataComp / npy embeddings in and out of a cache, on files the tests write themselves."""

from __future__ import annotations

import io
import json
import re
import zipfile

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


def write_datacomp(folder, shards=(12, 8), seed=1):
    """DataComp shards: NNNNNNNN.npz (b32 and l14 feature sets) beside NNNNNNNN.parquet (uid, text, url)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for number, rows in enumerate(shards):
        np.savez(folder / f"{number:08d}.npz", b32_img=rng.standard_normal((rows, 8)).astype(np.float16),
                 b32_txt=rng.standard_normal((rows, 8)).astype(np.float16),
                 l14_img=rng.standard_normal((rows, 10)).astype(np.float16),
                 l14_txt=rng.standard_normal((rows, 10)).astype(np.float16))
        pq.write_table(pa.table({"uid": [f"{number}-{r:04x}" for r in range(rows)], "text": [f"t{r}" for r in range(rows)],
                                 "url": [f"http://x/{r}.jpg" for r in range(rows)]}), folder / f"{number:08d}.parquet")


def test_datacomp_import_picks_a_feature_set(tmp_path):
    write_datacomp(tmp_path)
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
    assert code == 2 and err.splitlines() == error_lines and len(error_lines) == 1  # no progress bar beside it
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


# --- bad source files: one reader per kind, one line naming the file, exit 2 --------------------------------------


def refused(capsys, argv: list) -> str:
    """Run the CLI and return its one error line, after checking: exit 2, one stderr line, no traceback."""
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "Traceback" not in err, err
    assert len(err.rstrip("\n").split("\n")) == 1, err
    return err


def npy_bytes(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


FLOATS = np.ones((30, 16), np.float16)
HEADER = len(npy_bytes(FLOATS)) - FLOATS.nbytes
NPY_CASES = {  # bytes written over img_emb_0.npy (30 rows x 16 in the metadata) -> what the one line says
    "fewer rows than its header": (npy_bytes(FLOATS)[:HEADER + 20 * 16 * 2],
                                   r"header says 30 x 16 float16 \(960 bytes\) but it holds 640 bytes \(truncated\)"),
    "a cut-off row": (npy_bytes(FLOATS)[:-7], r"holds 953 bytes \(truncated\)"),
    "bytes after the data": (npy_bytes(FLOATS) + b"\0" * 32, r"holds 992 bytes \(longer than that\)"),
    "(rows, 0)": (npy_bytes(np.zeros((30, 0), np.float16)), r"shape \(30, 0\) has no embedding dimensions"),
    "pickled objects": (npy_bytes(np.array([[None] * 16] * 30, dtype=object), allow_pickle=True), "Python objects"),
    "integers": (npy_bytes(np.zeros((30, 16), np.int8)), "dtype int8, expected float16/float32"),
    "complex": (npy_bytes(np.zeros((30, 16), np.complex64)), "dtype complex64"),
    "one dimension": (npy_bytes(np.zeros(30, np.float32)), r"shape \(30,\), expected \(rows, dim\)"),
    "three dimensions": (npy_bytes(np.zeros((30, 16, 2), np.float32)), r"shape \(30, 16, 2\)"),
    "Fortran order": (npy_bytes(np.asfortranarray(np.zeros((30, 16), np.float32))), "Fortran order"),
    "not an npy": (b"PAR1 certainly not numpy", r"not a readable \.npy file"),
    "empty": (b"", r"not a readable \.npy file"),
    "a broken header": (b"\x93NUMPY\x01\x00\x10\x00{'descr': <f4'}   \n", r"not a readable \.npy file"),
}


@pytest.mark.parametrize("case", NPY_CASES, ids=list(NPY_CASES))
def test_npy_reader_refuses_anything_but_a_whole_float_matrix(tmp_path, capsys, case):
    """Class: an .npy shorter than its header imported with exit 0, the missing rows as zeros (or junk)."""
    data, message = NPY_CASES[case]
    write_clip_retrieval(tmp_path / "src")
    (tmp_path / "src" / "img_emb" / "img_emb_0.npy").write_bytes(data)
    line = refused(capsys, ["import", tmp_path / "src", "--out", tmp_path / "cache"])
    assert re.search(rf"img_emb_0\.npy: .*{message}", line), line
    assert not (tmp_path / "cache" / "images").exists()  # refused before any shard was written


def test_npy_reader_is_used_by_every_npy_import(tmp_path, capsys):
    """The npy format, a directory where a file should be, and a file cut while it is read: the same reader."""
    rng = np.random.default_rng(3)
    np.save(tmp_path / "img_emb.npy", rng.standard_normal((6, 4)).astype(np.float32))
    (tmp_path / "text_emb.npy").write_bytes(npy_bytes(rng.standard_normal((6, 3)).astype(np.float32))[:-12])
    (tmp_path / "captions.txt").write_text("\n".join(f"caption {n}" for n in range(6)) + "\n", encoding="utf-8")
    assert "text_emb.npy: its header says 6 x 3 float32" in refused(capsys, ["import", tmp_path, "--format", "npy",
                                                                              "--out", tmp_path / "c1"])
    write_clip_retrieval(tmp_path / "dir")
    (tmp_path / "dir" / "text_emb" / "text_emb_1.npy").unlink()
    (tmp_path / "dir" / "text_emb" / "text_emb_1.npy").mkdir()
    assert "text_emb_1.npy: not a readable .npy file (Is a directory)" in refused(
        capsys, ["import", tmp_path / "dir", "--out", tmp_path / "c2"])

    from vlmcache.data.formats import NpyRows

    write_clip_retrieval(tmp_path / "cut")
    path = tmp_path / "cut" / "img_emb" / "img_emb_0.npy"
    rows = NpyRows(path)
    path.write_bytes(path.read_bytes()[:-64])  # after the check on opening
    with pytest.raises(VlmcacheError, match=r"img_emb_0.npy: shorter than when the import began"):
        rows[np.arange(30)]


def zip_member(folder, name: str, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(folder / name, "w") as archive:
        for member, data in members.items():
            archive.writestr(member, data)


def test_npz_reader_refuses_broken_datacomp_shards(tmp_path, capsys):
    """Class: a DataComp .npz that is not a zip, or is truncated, raised a traceback."""
    def case(name: str, change) -> str:
        write_datacomp(tmp_path / name)
        change(tmp_path / name / "00000001.npz")
        return refused(capsys, ["import", tmp_path / name, "--format", "datacomp", "--features", "b32",
                                "--out", tmp_path / f"{name}-cache"])

    def truncate(path):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    def corrupt_member(path):  # one byte of b32_img's data (stored, not compressed): the member's CRC no longer holds
        data = bytearray(path.read_bytes())
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo("b32_img.npy")
        data[info.header_offset + 30 + len(info.filename) + info.file_size - 3] ^= 0xFF
        path.write_bytes(bytes(data))

    image, text = np.ones((8, 8), np.float16), np.ones((8, 8), np.float16)
    assert "00000001.npz: not a readable .npz file (File is not a zip file)" in case(
        "not-zip", lambda p: p.write_bytes(b"hello"))
    assert "00000001.npz: not a readable .npz file (File is not a zip file)" in case(
        "npy", lambda p: p.write_bytes(npy_bytes(image)))
    assert "00000001.npz: not a readable .npz file" in case("truncated", truncate)
    assert "00000001.npz: not a readable .npz file (Bad CRC-32 for file 'b32_img.npy')" in case("crc", corrupt_member)
    assert "00000001.npz: no array 'b32_img' (it has l14_img, l14_txt)" in case(
        "keys", lambda p: np.savez(p, l14_img=image, l14_txt=text))
    assert "00000001.npz [b32_img]: its header says 8 x 8 float16 (128 bytes) but it holds 64 bytes (truncated)" in case(
        "member", lambda p: zip_member(p.parent, p.name, {"b32_img.npy": npy_bytes(image)[:-64],
                                                          "b32_txt.npy": npy_bytes(text)}))
    huge = np.lib.format.header_data_from_array_1_0(image) | {"shape": (10**12, 8)}
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, huge)
    assert "[b32_img]: its header says 1,000,000,000,000 x 8 float16" in case(  # no terabyte allocation first
        "huge", lambda p: zip_member(p.parent, p.name, {"b32_img.npy": header.getvalue() + image.tobytes(),
                                                        "b32_txt.npy": npy_bytes(text)}))
    assert "[b32_img]: holds Python objects" in case(
        "pickle", lambda p: zip_member(p.parent, p.name, {"b32_img.npy": npy_bytes(np.array([[None]] * 8), True),
                                                          "b32_txt.npy": npy_bytes(text)}))
    assert "00000001.npz [b32_txt]: shape (8, 0) has no embedding dimensions" in case(
        "zero-dim", lambda p: np.savez(p, b32_img=image, b32_txt=np.zeros((8, 0), np.float16)))
    assert "00000001.npz [b32_img]: shape (8,), expected (rows, dim)" in case(
        "one-dim", lambda p: np.savez(p, b32_img=np.ones(8, np.float32), b32_txt=text))
    assert "00000001.npz [b32_txt]: 7 rows but" in case(
        "rows", lambda p: np.savez(p, b32_img=image, b32_txt=text[:7]))
    write_datacomp(tmp_path / "first")
    (tmp_path / "first" / "00000000.npz").write_bytes(b"")
    assert "00000000.npz: not a readable .npz file" in refused(
        capsys, ["import", tmp_path / "first", "--format", "datacomp", "--out", tmp_path / "first-cache"])


def test_parquet_reader_refuses_corrupt_files(tmp_path, capsys):
    """Class: a parquet file with a corrupt data page raised a traceback (pyarrow's OSError)."""
    def case(name: str, change) -> str:
        write_clip_retrieval(tmp_path / name)
        path = tmp_path / name / "metadata" / "metadata_1.parquet"
        pq.write_table(pq.read_table(path), path, compression="none")
        change(path)
        return refused(capsys, ["import", tmp_path / name, "--out", tmp_path / f"{name}-cache"])

    def corrupt_page(path):  # the first page header, right after the magic; the footer (the schema) is intact
        data = bytearray(path.read_bytes())
        data[4:40] = b"\xff" * 36
        path.write_bytes(bytes(data))

    def directory(path):
        path.unlink()
        path.mkdir()

    for name, change in (("page", corrupt_page), ("truncated", lambda p: p.write_bytes(p.read_bytes()[:-20])),
                         ("garbage", lambda p: p.write_bytes(b"\x93NUMPY not parquet")), ("dir", directory)):
        line = case(name, change)
        assert "metadata_1.parquet: not a readable parquet file (" in line, line
    assert "page header" in case("page-again", corrupt_page)


def test_metadata_columns_are_read_as_text_or_refused(tmp_path, capsys):
    """Class: a binary caption column imported as the text "b'a dog'"; other types came through str()."""
    def case(name: str, columns: dict):
        write_clip_retrieval(tmp_path / name)
        table = pa.table({"image_path": [f"p{r}" for r in range(20)], "caption": [f"c{r}" for r in range(20)]} | columns)
        pq.write_table(table, tmp_path / name / "metadata" / "metadata_1.parquet")
        return ["import", tmp_path / name, "--out", tmp_path / f"{name}-cache"]

    binary = {"caption": pa.array([b"a dog"] * 19 + ["caf\u00e9".encode()], pa.binary()),
              "split": pa.array([b"val"] * 20, pa.large_binary()),
              "image_path": pa.array([b"../../etc/passwd"] * 20, pa.binary()),
              "image_id": pa.array(range(100, 120), pa.int64())}
    code, _, err = run_cli(case("binary", binary), capsys)
    assert code == 0, err
    cache = open_cache(tmp_path / "binary-cache")
    imported = dict(zip(cache.index["image_id"], zip(cache.index["caption"], cache.index["image_split"],
                                                     cache.index["image_path"], strict=True), strict=True))
    # Paths in the data are labels only: stored as they are, never opened by import.
    assert imported["100"] == ("a dog", "val", "../../etc/passwd") and imported["119"][0] == "caf\u00e9"
    categorical = pa.array(["a dog"] * 20).dictionary_encode()
    assert run_cli(case("dictionary", {"caption": categorical}), capsys)[0] == 0
    assert open_cache(tmp_path / "dictionary-cache").index["caption"].count("a dog") == 20

    bad_utf8 = pa.array([b"ok"] * 3 + [b"\xff\xfe dog"] + [b"ok"] * 16, pa.binary())
    assert "metadata_1.parquet: column 'caption' row 3: bytes that are not UTF-8 text (at byte 0)" in refused(
        capsys, case("utf8", {"caption": bad_utf8}))
    assert "metadata_1.parquet: column 'caption' holds int64, not text; pass --caption-column" in refused(
        capsys, case("int", {"caption": pa.array(range(20))}))
    assert "column 'caption' holds list<element: string>, not text" in refused(
        capsys, case("list", {"caption": pa.array([["a", "b"]] * 20)}))
    assert "column 'split' holds double, not text; pass --split-column" in refused(
        capsys, case("split", {"split": pa.array([0.5] * 20)}))
    assert "column 'split' row 2: missing (null)" in refused(capsys, case("null", {"split": ["train"] * 2 + [None] * 18}))


# --- export: a folder holds exactly one export; import checks it ------------------------------------------------


@pytest.fixture
def imported_cache(tmp_path):
    write_clip_retrieval(tmp_path / "src", parts=(60, 12))
    import_embeddings(tmp_path / "src", tmp_path / "cache", "clip-retrieval", progress=False)
    return tmp_path / "cache"


def folder_bytes(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_replaces_an_earlier_export_as_a_whole(imported_cache, tmp_path, capsys):
    """Class: export into a folder holding an earlier export left its parts beside the new ones, and a later
    import read both (72 pairs instead of 40)."""
    out = tmp_path / "out"
    assert run_cli(["export", imported_cache, "--out", out, "--rows-per-file", "10"], capsys)[0] == 0
    assert len(list((out / "img_emb").iterdir())) == 8
    assert run_cli(["export", imported_cache, "--out", out, "--rows-per-file", "30", "--splits", "train"], capsys)[0] == 0
    manifest = json.loads((out / "vlmcache-export.json").read_text())
    parts = sorted(str(p.relative_to(out)) for p in out.rglob("*.*") if p.name != "vlmcache-export.json")
    assert parts == sorted(manifest["files"]) == [f"{kind}/{kind}_{n}.{ext}" for kind, ext in
                                                  (("img_emb", "npy"), ("metadata", "parquet"), ("text_emb", "npy"))
                                                  for n in (0, 1)]
    assert manifest["rows"] == 54 and manifest["splits"] == ["train"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging or replaced folder left
    code, out_text, err = run_cli(["import", out, "--out", tmp_path / "again"], capsys)
    assert code == 0 and "54 pairs imported" in out_text, err

    (tmp_path / "empty").mkdir()  # an empty folder is fine too
    assert export_cache(imported_cache, tmp_path / "empty", progress=False).rows == 72


def test_export_never_removes_what_it_did_not_write(imported_cache, tmp_path, capsys, monkeypatch):
    import vlmcache.data.formats as formats

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert "holds files that are not a vlmcache export (notes.txt)" in refused(
        capsys, ["export", imported_cache, "--out", foreign])
    assert folder_bytes(foreign) == {"notes.txt": b"mine"}
    (foreign / "img_emb").mkdir()
    assert "not recognised: remove it yourself" in refused(capsys, ["export", imported_cache, "--out", foreign])

    out = tmp_path / "out"
    export_cache(imported_cache, out, rows_per_file=50, progress=False)
    before = folder_bytes(out)
    (out / "img_emb" / "knn.index").write_bytes(b"an index built on the export")
    assert "img_emb/knn.index: not part of the earlier export" in refused(capsys, ["export", imported_cache, "--out", out])
    (out / "img_emb" / "knn.index").unlink()
    np.save(out / "text_emb" / "text_emb_1.npy", np.zeros((22, 12), np.float16))
    changed = folder_bytes(out)
    assert "text_emb_1.npy: changed since vlmcache exported it" in refused(capsys, ["export", imported_cache, "--out", out])
    assert folder_bytes(out) == changed
    (out / "text_emb" / "text_emb_1.npy").write_bytes(before["text_emb/text_emb_1.npy"])

    manifest = json.loads((out / "vlmcache-export.json").read_text())
    for files in ({"../foreign/notes.txt": "0" * 64}, {"/etc/passwd": "0" * 64}, "not a dict"):
        (out / "vlmcache-export.json").write_text(json.dumps(manifest | {"files": files}))
        assert "vlmcache-export.json: not a vlmcache export manifest" in refused(
            capsys, ["export", imported_cache, "--out", out])
    (out / "vlmcache-export.json").write_text('{"vlmcache_export": 1, "fi')
    assert "vlmcache-export.json: not a readable vlmcache export manifest" in refused(
        capsys, ["export", imported_cache, "--out", out])
    (out / "vlmcache-export.json").write_bytes(before["vlmcache-export.json"])
    assert folder_bytes(out) == before and folder_bytes(foreign) == {"notes.txt": b"mine"} and (foreign / "img_emb").is_dir()

    calls = []

    def fail_on_second(*args):  # a crash half way through writing the new export
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return original(*args)

    original = formats._metadata_table
    monkeypatch.setattr(formats, "_metadata_table", fail_on_second)
    with pytest.raises(RuntimeError):
        export_cache(imported_cache, out, rows_per_file=10, progress=False)
    assert folder_bytes(out) == before  # the earlier export untouched
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_import_checks_an_export_against_its_manifest(imported_cache, tmp_path, capsys):
    out = tmp_path / "out"
    export_cache(imported_cache, out, rows_per_file=30, progress=False)
    original = (out / "img_emb" / "img_emb_1.npy").read_bytes()
    np.save(out / "img_emb" / "img_emb_1.npy", np.zeros((30, 16), np.float16))
    assert "img_emb/img_emb_1.npy: changed since vlmcache exported it" in refused(
        capsys, ["import", out, "--out", tmp_path / "c1"])
    (out / "img_emb" / "img_emb_1.npy").write_bytes(original)
    for kind, ext in (("img_emb", "npy"), ("text_emb", "npy"), ("metadata", "parquet")):  # a leftover part 7
        (out / kind / f"{kind}_7.{ext}").write_bytes((out / kind / f"{kind}_0.{ext}").read_bytes())
    assert "img_emb/img_emb_7.npy: not part of the export" in refused(capsys, ["import", out, "--out", tmp_path / "c2"])
    for kind, ext in (("img_emb", "npy"), ("text_emb", "npy"), ("metadata", "parquet")):
        (out / kind / f"{kind}_7.{ext}").unlink()
        (out / kind / f"{kind}_2.{ext}").rename(tmp_path / f"{kind}_2.{ext}")
    assert "vlmcache-export.json lists img_emb/img_emb_2.npy, which is missing" in refused(
        capsys, ["import", out, "--out", tmp_path / "c3"])
    (out / "vlmcache-export.json").unlink()  # without the manifest: imported as it is (60 of 72 rows)
    assert import_embeddings(out, tmp_path / "c4", "clip-retrieval", progress=False).images == 60
