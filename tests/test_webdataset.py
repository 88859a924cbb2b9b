"""webdataset tar shards as extract input, on tars the tests write with tarfile from real Flickr8k images."""

from __future__ import annotations

import io
import json
import logging
import tarfile

import h5py
import numpy as np
import pytest
from conftest import FLICKR, require_shared_data, run_cli

from vlmcache.cache.store import open_cache
from vlmcache.data.datasets import load_dataset
from vlmcache.data.tars import expand_braces
from vlmcache.encode.extract import extract
from vlmcache.errors import VlmcacheError


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder, images, per_shard=3, json_caption=True):
    """img2dataset layout: KEY.jpg + KEY.txt + KEY.json (caption, split) per sample; returns the rows as written."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for shard in range(0, len(images), per_shard):
        with tarfile.open(folder / f"{shard // per_shard:05d}.tar", "w") as tar:
            for number, image in enumerate(images[shard:shard + per_shard], start=shard):
                key = f"{number:09d}"
                split = "val" if number % 3 == 2 else "train"
                caption = f"photo {image.name}"
                add(tar, f"{key}.jpg", image.read_bytes())
                add(tar, f"{key}.txt", caption.encode())
                add(tar, f"{key}.json", json.dumps({"caption": f"json {caption}" if json_caption else None,
                                                    "split": split, "key": key}).encode())
                rows.append((key, image, caption, split))
    return rows


@pytest.fixture
def flickr_images():
    require_shared_data()
    return [FLICKR / "Images" / name for name in (FLICKR / "Flickr_8k.devImages.txt").read_text().split()[:6]]


def test_brace_patterns_expand_like_bash():
    assert expand_braces("d/{00000..00002}.tar") == ["d/00000.tar", "d/00001.tar", "d/00002.tar"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_folder_glob_and_brace_read_the_same_samples(tmp_path, flickr_images):
    rows = write_shards(tmp_path / "shards", flickr_images)
    folder = load_dataset(tmp_path / "shards")
    assert folder.format == "webdataset"
    for source in (f"{tmp_path}/shards/*.tar", f"{tmp_path}/shards/{{00000..00001}}.tar"):
        other = load_dataset(source)
        assert (other.image_ids, other.captions, other.image_paths) == (folder.image_ids, folder.captions, folder.image_paths)
    # .txt captions by default, splits from the JSON, train rows first (cache row order).
    expected = sorted(rows, key=lambda row: row[3] != "train")
    assert folder.image_ids == [row[0] for row in expected] and folder.captions == [row[2] for row in expected]
    assert folder.image_splits == ["train"] * 4 + ["val"] * 2
    assert load_dataset(tmp_path / "shards", caption_key="caption").captions[0] == f"json {expected[0][2]}"
    # --val-fraction replaces the JSON split, with a fixed seed: the same rows every time.
    first = load_dataset(tmp_path / "shards", val_fraction=0.5)
    assert first.image_splits.count("val") == 3
    assert first.image_ids == load_dataset(tmp_path / "shards", val_fraction=0.5).image_ids


def test_webdataset_extract_equals_folder_extract_and_resumes(tmp_path, flickr_images, tiny_models):
    rows = write_shards(tmp_path / "shards", flickr_images)
    models = {"image_model": str(tiny_models["vit"]), "text_model": str(tiny_models["distilbert"]), "progress": False}
    before = sorted(path.name for path in (tmp_path / "shards").iterdir())
    extract(f"{tmp_path}/shards/{{00000..00001}}.tar", tmp_path / "wds", shard_size=2, **models)
    assert sorted(path.name for path in (tmp_path / "shards").iterdir()) == before  # nothing unpacked beside the tars
    # The same images and captions as a pairs CSV of the image files.
    lines = ["image,caption,split"] + [f"{image},{caption},{split}" for _, image, caption, split in rows]
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    extract(tmp_path / "pairs.csv", tmp_path / "files", shard_size=2, **models)
    for modality in ("images", "texts"):
        for shard in sorted((tmp_path / "files" / modality).glob("shard-*.h5")):
            with h5py.File(shard) as a, h5py.File(tmp_path / "wds" / modality / shard.name) as b:
                assert np.array_equal(a["features"][()], b["features"][()])
    manifest = json.loads((tmp_path / "wds" / "manifest.json").read_text())
    assert manifest["dataset"]["format"] == "webdataset" and manifest["dataset"]["splits"]["val"]["images"] == 2
    # Resumable per output shard, as any extract.
    shard = tmp_path / "wds" / "images" / "shard-00001.h5"
    with h5py.File(shard) as handle:
        kept = handle["features"][()]
    shard.unlink()
    result = extract(f"{tmp_path}/shards/{{00000..00001}}.tar", tmp_path / "wds", shard_size=2, **models)
    assert (result.shards_written, result.shards_reused) == (1, 5)
    with h5py.File(shard) as handle:
        assert np.array_equal(handle["features"][()], kept)


def test_a_member_that_is_not_an_image_names_tar_and_member(tmp_path, flickr_images, tiny_models, capsys):
    write_shards(tmp_path / "shards", flickr_images[:2])
    with tarfile.open(tmp_path / "shards" / "00000.tar", "a") as tar:
        add(tar, "000000099.jpg", b"this is not a jpeg")
        add(tar, "000000099.txt", b"a caption")
    models = ["--image-model", tiny_models["vit"], "--text-model", tiny_models["distilbert"]]
    code, _, err = run_cli(["extract", tmp_path / "shards", "--out", tmp_path / "cache", *models], capsys)
    assert code == 2 and "00000.tar#000000099.jpg: not an image file Pillow can read" in err and "Traceback" not in err
    code, _, err = run_cli(["extract", tmp_path / "shards", "--out", tmp_path / "cache", "--on-error", "skip", *models], capsys)
    assert code == 0, err
    skipped = json.loads((tmp_path / "cache" / "manifest.json").read_text())["skipped"]
    assert [(s["modality"], s["item"]) for s in skipped] == [("images", "000000099")]


def test_sample_without_caption_or_image_fails_or_is_logged_and_skipped(tmp_path, flickr_images, caplog):
    write_shards(tmp_path / "shards", flickr_images[:2], json_caption=False)
    with tarfile.open(tmp_path / "shards" / "00000.tar", "a") as tar:
        add(tar, "000000007.jpg", flickr_images[0].read_bytes())  # no .txt and no .json
        add(tar, "000000008.txt", b"a caption without its image")
        add(tar, "000000008.exe", b"MZ")
    with pytest.raises(VlmcacheError, match=r"00000.tar sample 2 \(key 000000007\): no caption"):
        load_dataset(tmp_path / "shards")
    with caplog.at_level(logging.WARNING, logger="vlmcache"):
        dataset = load_dataset(tmp_path / "shards", on_error="skip")
    assert dataset.image_ids == ["000000000", "000000001"]
    assert [(d["key"], d["reason"].split(" (")[0]) for d in dataset.dropped] == [
        ("000000007", "no caption"), ("000000008", "no image member")]
    assert "it has .exe" in dataset.dropped[1]["reason"]
    assert "skipped" in caplog.text and "000000008" in caplog.text
    # An explicit --caption-key reads the JSON, where these samples have no caption.
    with pytest.raises(VlmcacheError, match=r"sample 0 \(key 000000000\): no caption \(no 'caption' in its .json"):
        load_dataset(tmp_path / "shards", caption_key="caption")


def test_truncated_tar_is_named(tmp_path, flickr_images):
    write_shards(tmp_path / "shards", flickr_images[:3])
    whole = (tmp_path / "shards" / "00000.tar").read_bytes()
    with tarfile.open(tmp_path / "shards" / "00000.tar") as tar:
        members = tar.getmembers()
    inside_image = members[3].offset_data + members[3].size // 2
    inside_header = members[4].offset + 100
    after_last_member = members[-1].offset_data + members[-1].size  # the end-of-archive blocks cut off
    for cut in (inside_image, inside_header, after_last_member):
        (tmp_path / "shards" / "00000.tar").write_bytes(whole[:cut])
        with pytest.raises(VlmcacheError, match=r"00000.tar.*truncated tar"):
            load_dataset(tmp_path / "shards")
    (tmp_path / "shards" / "00000.tar").write_bytes(b"not a tar at all" * 64)
    with pytest.raises(VlmcacheError, match=r"00000.tar"):
        load_dataset(tmp_path / "shards")


def test_member_names_never_reach_the_file_system(tmp_path, flickr_images, tiny_models, capsys):
    """A member named `x/../../secret.jpg` (or `/abs.jpg`) is refused naming shard and member, or skipped
    under --on-error skip; no file outside the shard is read, and serve sends only a member's own bytes."""
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from vlmcache.align.config import TrainConfig
    from vlmcache.align.train import train
    from vlmcache.app.serve import create_app

    secret = tmp_path / "private" / "secret.jpg"
    secret.parent.mkdir()
    secret.write_bytes(flickr_images[5].read_bytes())
    write_shards(tmp_path / "data" / "shards", flickr_images[:4], per_shard=4)
    hostile = ["x/../../../private/secret.jpg", f"{secret}", "x/..", "a\\..\\..\\b.jpg"]
    models = ["--image-model", tiny_models["vit"], "--text-model", tiny_models["distilbert"]]
    for number, name in enumerate(hostile, start=10):
        shards = tmp_path / f"hostile{number}" / "shards"
        write_shards(shards, flickr_images[:4], per_shard=4)
        with tarfile.open(shards / "00000.tar", "a") as tar:
            add(tar, name, b"")  # its own bytes are empty: only the path outside would decode
            add(tar, name.rsplit(".", 1)[0] + ".txt", b"a stolen photo")
        code, _, err = run_cli(["extract", shards, "--out", shards.parent / "cache", *models], capsys)
        assert code == 2 and "00000.tar" in err and "member" in err and "Traceback" not in err, (name, err)
        assert len(err.strip().splitlines()) == 1
        code, _, err = run_cli(["extract", shards, "--out", shards.parent / "cache", "--on-error", "skip", *models], capsys)
        assert code == 0, err
        cache = open_cache(shards.parent / "cache")
        paths = cache.index_rows("image_path", slice(None))
        assert len(paths) == 4 and all(p.startswith(f"{shards.resolve()}/00000.tar#0") for p in paths), paths
    # The page serves a shard's images from their bytes, and nothing outside.
    shards = tmp_path / "hostile10" / "shards"
    run = tmp_path / "run"
    train(shards.parent / "cache", run, TrainConfig(projector="linear", epochs=1, batch_size=4))
    client = TestClient(create_app(run, split="train"))
    served = [client.get(f"/image/{row}") for row in range(3)]
    assert [reply.status_code for reply in served] == [200, 200, 200]
    stored = {image.read_bytes() for image in flickr_images[:4]}
    assert all(reply.content in stored and reply.headers["content-type"] == "image/jpeg" for reply in served)
    assert all(reply.content != secret.read_bytes() for reply in served)
