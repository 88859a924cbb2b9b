"""Hugging Face datasets as extract input (save_to_disk folders and Hub-layout parquet), built with the `datasets`
library itself from a slice of the shared Flickr8k."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
from conftest import make_flickr_slice, run_cli

from vlmcache.data.datasets import load_dataset, load_rgb
from vlmcache.encode.extract import extract
from vlmcache.errors import VlmcacheError

datasets = pytest.importorskip("datasets")
datasets.disable_progress_bars()  # they write to stderr, where the CLI's one-line errors are checked


def flickr_rows(folder, train=4, val=2) -> list[dict]:
    """One row per image of a Flickr8k slice: its bytes and name, its 5 captions and its split, in cache row order."""
    source = load_dataset(make_flickr_slice(folder, train, val))
    rows = []
    for index, (name, split) in enumerate(zip(source.image_ids, source.image_splits, strict=True)):
        captions = [source.captions[i] for i in np.flatnonzero(source.caption_image == index)]
        rows.append({"image": {"bytes": (folder / "Images" / name).read_bytes(), "path": name}, "caption": captions,
                     "split": split})
    return rows


def as_dataset(rows: list[dict], drop: tuple[str, ...] = ("split",)):
    """A `datasets.Dataset` of the rows with an Image() feature (what image–caption datasets on the Hub hold)."""
    table = [{key: value for key, value in row.items() if key not in drop} for row in rows]
    return datasets.Dataset.from_list(table).cast_column("image", datasets.Image())


def write_hub_parquet(root, rows: list[dict]) -> None:
    """The Hub's layout: data/train-0000N-of-00002.parquet (two files) and data/validation-00000-of-00001.parquet."""
    (root / "data").mkdir(parents=True)
    train = [row for row in rows if row["split"] == "train"]
    half = len(train) // 2
    as_dataset(train[:half]).to_parquet(str(root / "data" / "train-00000-of-00002.parquet"))
    as_dataset(train[half:]).to_parquet(str(root / "data" / "train-00001-of-00002.parquet"))
    as_dataset([row for row in rows if row["split"] == "val"]).to_parquet(
        str(root / "data" / "validation-00000-of-00001.parquet"))


@pytest.fixture
def rows(tmp_path) -> list[dict]:
    return flickr_rows(tmp_path / "flickr")


def test_save_to_disk_folders_read_in_documented_row_order(tmp_path, rows):
    train, val = ([row for row in rows if row["split"] == name] for name in ("train", "val"))
    # A DatasetDict saved with validation first still gives train rows first (cache row order).
    datasets.DatasetDict({"validation": as_dataset(val), "train": as_dataset(train)}).save_to_disk(str(tmp_path / "dict"))
    dataset = load_dataset(tmp_path / "dict")
    assert dataset.format == "hf"
    assert dataset.image_splits == ["train"] * 4 + ["val"] * 2
    assert dataset.image_ids == [row["image"]["path"] for row in train + val]
    assert dataset.captions == [caption for row in train + val for caption in row["caption"]]
    assert dataset.caption_image.tolist() == [i for i in range(6) for _ in range(5)]
    # Images are the rows' own bytes, named <file>#<row>/<column>: the same pixels as the original files.
    assert dataset.image_paths[4] == f"{(tmp_path / 'dict' / 'validation' / 'data-00000-of-00001.arrow').resolve()}#0/image"
    original = tmp_path / "flickr" / "Images" / val[0]["image"]["path"]
    assert np.array_equal(np.asarray(load_rgb(dataset.image_paths[4])), np.asarray(load_rgb(original)))
    # One saved Dataset: its rows in order, all train (no split saved, no split column).
    as_dataset(rows).save_to_disk(str(tmp_path / "one"))
    assert load_dataset(tmp_path / "one").image_ids == [row["image"]["path"] for row in rows]


def test_hub_parquet_extract_equals_the_flickr_folder_extract_and_resumes(tmp_path, rows, tiny_models):
    write_hub_parquet(tmp_path / "hub", rows)
    models = {"image_model": str(tiny_models["vit"]), "text_model": str(tiny_models["distilbert"]), "progress": False}
    extract(tmp_path / "hub", tmp_path / "from-hub", shard_size=2, **models)
    extract(tmp_path / "flickr", tmp_path / "from-files", shard_size=2, **models)
    hub, files = (json.loads((tmp_path / name / "manifest.json").read_text()) for name in ("from-hub", "from-files"))
    assert hub["dataset"]["format"] == "hf" and hub["dataset"]["splits"] == files["dataset"]["splits"]
    assert hub["dataset"]["fingerprint"] == files["dataset"]["fingerprint"]  # same ids, captions, splits, order
    for modality in ("images", "texts"):
        for shard in sorted((tmp_path / "from-files" / modality).glob("shard-*.h5")):
            with h5py.File(shard) as a, h5py.File(tmp_path / "from-hub" / modality / shard.name) as b:
                assert np.array_equal(a["features"][()], b["features"][()])
    # Resumable per output shard: a lost shard is computed again, identical, and only it.
    shard = tmp_path / "from-hub" / "images" / "shard-00001.h5"
    with h5py.File(shard) as handle:
        kept = handle["features"][()]
    shard.unlink()
    result = extract(tmp_path / "hub", tmp_path / "from-hub", shard_size=2, **models)
    assert (result.shards_written, result.shards_reused) == (1, 3 + 15 - 1)  # 6 images, 30 captions, 2 rows a shard
    with h5py.File(shard) as handle:
        assert np.array_equal(handle["features"][()], kept)


def test_split_column_caption_strings_and_named_columns(tmp_path, rows):
    # Flickr30k's Hub layout: one file (named test) holding every split in a split column.
    table = [{"img": row["image"], "sentence": row["caption"][0], "split": row["split"], "filename": row["image"]["path"]}
             for row in reversed(rows)]
    (tmp_path / "hub" / "data").mkdir(parents=True)
    path = tmp_path / "hub" / "data" / "test-00000-of-00001.parquet"
    datasets.Dataset.from_list(table).cast_column("img", datasets.Image()).to_parquet(str(path))
    with pytest.raises(VlmcacheError, match=r"test-00000-of-00001.parquet: no caption column .*it has the columns "
                                             r"img, sentence, split, filename; pass --caption-column"):
        load_dataset(tmp_path / "hub")
    dataset = load_dataset(tmp_path / "hub", caption_column="sentence")
    assert dataset.image_splits == ["train"] * 4 + ["val"] * 2  # the column, not the file name
    assert dataset.captions == [row["caption"][0] for row in reversed(rows) if row["split"] == "train"] + \
        [row["caption"][0] for row in reversed(rows) if row["split"] == "val"]
    with pytest.raises(VlmcacheError, match=r"no image column 'picture'; it has the columns img, sentence"):
        load_dataset(path, image_column="picture", caption_column="sentence")
    # Without the split column, the split comes from the path; without one there either, train.
    cases = (("validation.parquet", "val"), ("data/test/0000.parquet", "test"), ("other.parquet", "train"))
    for number, (name, split) in enumerate(cases):
        target = tmp_path / f"by-name{number}" / name
        target.parent.mkdir(parents=True)
        datasets.Dataset.from_list(table).remove_columns("split").cast_column("img", datasets.Image()).to_parquet(str(target))
        assert set(load_dataset(tmp_path / f"by-name{number}", caption_column="sentence").image_splits) == {split}, name


def test_missing_columns_and_undecodable_bytes_fail_in_one_line_or_skip(tmp_path, rows, tiny_models, capsys):
    models = ["--image-model", tiny_models["vit"], "--text-model", tiny_models["distilbert"]]
    (tmp_path / "nocaption").mkdir()
    as_dataset(rows, drop=("split", "caption")).to_parquet(str(tmp_path / "nocaption" / "train.parquet"))
    code, _, err = run_cli(["extract", tmp_path / "nocaption", "--out", tmp_path / "c1", *models], capsys)
    assert code == 2 and "train.parquet: no caption column" in err and "it has the columns image" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    (tmp_path / "noimage").mkdir()
    datasets.Dataset.from_list([{"caption": "a dog", "id": 1}]).to_parquet(str(tmp_path / "noimage" / "train.parquet"))
    code, _, err = run_cli(["extract", tmp_path / "noimage", "--out", tmp_path / "c2", *models], capsys)
    assert code == 2 and "no image column" in err and "it has the columns caption, id" in err
    # Bytes that are not an image: the file and row are named; --on-error skip records the row and goes on.
    broken = [dict(row) for row in rows]
    broken[1]["image"] = {"bytes": b"not a jpeg at all", "path": "broken.jpg"}
    (tmp_path / "bad").mkdir()
    as_dataset(broken).to_parquet(str(tmp_path / "bad" / "train.parquet"))
    code, _, err = run_cli(["extract", tmp_path / "bad", "--out", tmp_path / "c3", *models], capsys)
    assert code == 2 and "train.parquet#1/image: not an image file Pillow can read" in err, err
    assert len([line for line in err.splitlines() if "error" in line]) == 1 and "Traceback" not in err  # under its progress bar
    code, _, err = run_cli(["extract", tmp_path / "bad", "--out", tmp_path / "c3", "--on-error", "skip", *models], capsys)
    assert code == 0, err
    skipped = json.loads((tmp_path / "c3" / "manifest.json").read_text())["skipped"]
    assert [(s["modality"], s["item"]) for s in skipped] == [("images", "broken.jpg")]


def test_stored_paths_are_read_inside_images_dir_only(tmp_path, rows, capsys):
    """A path inside the data reaches the file system only under --images-dir, inside it: absolute paths and
    `..` that leaves it are refused naming file and row (or skipped); a struct with paths only, or a column
    of paths, needs --images-dir."""
    images = tmp_path / "flickr" / "Images"
    secret = tmp_path / "secret.jpg"
    shutil.copy(images / rows[0]["image"]["path"], secret)
    names = [row["image"]["path"] for row in rows]
    hostile = [*names[:3], "../../secret.jpg", str(secret), f"sub/../{names[3]}"]
    (tmp_path / "paths").mkdir()
    table = [{"image": name, "caption": f"photo {number}"} for number, name in enumerate(hostile)]
    datasets.Dataset.from_list(table).to_parquet(str(tmp_path / "paths" / "train.parquet"))
    with pytest.raises(VlmcacheError, match=r"image column 'image' holds paths, not image bytes; pass --images-dir"):
        load_dataset(tmp_path / "paths")
    with pytest.raises(VlmcacheError, match=r"train.parquet row 3: an image path '../../secret.jpg' that leaves "
                                             r"--images-dir"):
        load_dataset(tmp_path / "paths", images_dir=images)
    dataset = load_dataset(tmp_path / "paths", images_dir=images, on_error="skip")
    assert dataset.image_paths == [str((images / name).resolve()) for name in [*names[:3], names[3]]]
    assert [(d["sample"], d["reason"].split(" '")[0]) for d in dataset.dropped] == [(3, "an image path"),
                                                                                    (4, "an absolute image path")]
    assert str(secret.resolve()) not in dataset.image_paths
    # to_parquet of an Image() dataset made from local files keeps their (absolute) paths and no bytes.
    (tmp_path / "local").mkdir()
    datasets.Dataset.from_list([{"image": str(images / name), "caption": "a photo"} for name in names]).cast_column(
        "image", datasets.Image()).to_parquet(str(tmp_path / "local" / "train.parquet"))
    with pytest.raises(VlmcacheError, match="holds paths, not image bytes"):
        load_dataset(tmp_path / "local")
    with pytest.raises(VlmcacheError, match=r"row 0: an absolute image path"):
        load_dataset(tmp_path / "local", images_dir=images)


def test_file_names_in_save_to_disk_json_are_names_not_paths(tmp_path, rows):
    as_dataset(rows).save_to_disk(str(tmp_path / "saved"))
    outside = tmp_path / "outside.arrow"
    shutil.copy(tmp_path / "saved" / "data-00000-of-00001.arrow", outside)
    state = json.loads((tmp_path / "saved" / "state.json").read_text())
    for hostile in ("../outside.arrow", str(outside)):
        state["_data_files"] = [{"filename": hostile}]
        (tmp_path / "saved" / "state.json").write_text(json.dumps(state))
        with pytest.raises(VlmcacheError, match=r"state.json: lists .* not a plain file or folder name"):
            load_dataset(tmp_path / "saved")
    (tmp_path / "dict").mkdir()
    (tmp_path / "dict" / "dataset_dict.json").write_text(json.dumps({"splits": ["../saved"]}))
    with pytest.raises(VlmcacheError, match=r"dataset_dict.json: lists '../saved', which is not a plain"):
        load_dataset(tmp_path / "dict")


def test_the_page_serves_a_dataset_row_image_from_its_own_bytes(tmp_path, rows, tiny_models):
    """`serve` sends an image stored in a parquet row as that row's bytes, with the type its header says."""
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from vlmcache.align.config import TrainConfig
    from vlmcache.align.train import train
    from vlmcache.app.serve import create_app

    write_hub_parquet(tmp_path / "hub", rows)
    extract(tmp_path / "hub", tmp_path / "cache", image_model=str(tiny_models["vit"]),
            text_model=str(tiny_models["distilbert"]), progress=False)
    train(tmp_path / "cache", tmp_path / "run", TrainConfig(projector="linear", epochs=1, batch_size=4))
    client = TestClient(create_app(tmp_path / "run", split="train"))
    reply = client.get("/image/0")
    assert reply.status_code == 200 and reply.headers["content-type"] == "image/jpeg"
    assert reply.content == rows[0]["image"]["bytes"]
