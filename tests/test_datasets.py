"""Dataset readers and image decoding, including every kind of bad input the issue lists."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import CIFAR, FLICKR, require_shared_data
from PIL import Image

from vlmcache.data.datasets import ImageDecodeError, load_dataset, load_rgb
from vlmcache.errors import VlmcacheError


def test_flickr8k_official_layout_rows_in_documented_order(flickr_slice):
    dataset = load_dataset(flickr_slice)
    assert dataset.format == "flickr8k"
    assert dataset.image_splits == ["train"] * 6 + ["val"] * 4
    assert dataset.num_captions == 50
    # 5 captions per image are 5 rows pointing at one image row, in image order.
    assert dataset.caption_image.tolist() == [i for i in range(10) for _ in range(5)]
    assert dataset.split_counts() == {"train": {"images": 6, "captions": 30}, "val": {"images": 4, "captions": 20}}


def test_full_shared_flickr8k_counts():
    require_shared_data()
    dataset = load_dataset(FLICKR)
    assert dataset.split_counts() == {"train": {"images": 6000, "captions": 30000},
                                      "val": {"images": 1000, "captions": 5000}}


def test_limit_and_split_selection(flickr_slice):
    dataset = load_dataset(flickr_slice, splits=["val"], limit=2)
    assert dataset.image_splits == ["val", "val"] and dataset.num_captions == 10
    with pytest.raises(VlmcacheError, match="no split named test"):
        load_dataset(flickr_slice, splits=["test"])


def test_fingerprint_changes_with_any_caption(flickr_slice):
    first = load_dataset(flickr_slice)
    second = load_dataset(flickr_slice)
    assert first.fingerprint() == second.fingerprint()
    second.captions[3] += "!"
    assert first.fingerprint() != second.fingerprint()


def test_karpathy_json_with_restval_and_filepath(tmp_path):
    (tmp_path / "images" / "val2014").mkdir(parents=True)
    entries = [
        {"filename": "a.jpg", "filepath": "val2014", "split": "test", "sentences": [{"raw": "a cat"}, {"raw": "a pet"}]},
        {"filename": "b.jpg", "filepath": "val2014", "split": "restval", "sentences": [{"raw": "a dog"}]},
        {"filename": "c.jpg", "filepath": "val2014", "split": "val", "sentences": [{"raw": "a car"}]},
    ]
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": entries, "dataset": "coco"}))
    dataset = load_dataset(tmp_path / "dataset_coco.json")
    assert dataset.image_splits == ["train", "val", "test"]  # restval is train; splits in documented order
    assert dataset.image_ids == ["val2014/b.jpg", "val2014/c.jpg", "val2014/a.jpg"]
    assert dataset.image_paths[0] == str((tmp_path / "images" / "val2014" / "b.jpg").resolve())
    assert dataset.captions == ["a dog", "a car", "a cat", "a pet"]
    assert dataset.caption_image.tolist() == [0, 1, 2, 2]


def test_karpathy_json_malformed(tmp_path):
    (tmp_path / "dataset_x.json").write_text(json.dumps({"images": [{"filename": "a.jpg"}]}))
    with pytest.raises(VlmcacheError, match=r"images\[0\] lacks"):
        load_dataset(tmp_path / "dataset_x.json")


def test_jsonl_and_csv_pairs_group_captions_by_image(tmp_path):
    rows = [{"image": "x.jpg", "caption": "one"}, {"image": "y.jpg", "caption": "two", "split": "val"},
            {"image": "x.jpg", "caption": "three"}]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    dataset = load_dataset(tmp_path / "pairs.jsonl")
    assert dataset.image_ids == ["x.jpg", "y.jpg"] and dataset.captions == ["one", "three", "two"]
    (tmp_path / "pairs.csv").write_text("image,caption\nx.jpg,one\ny.jpg,two\n")
    assert load_dataset(tmp_path / "pairs.csv").captions == ["one", "two"]
    (tmp_path / "bad.csv").write_text("path,text\nx.jpg,one\n")
    with pytest.raises(VlmcacheError, match="bad.csv row 1: needs the fields 'image' and 'caption'"):
        load_dataset(tmp_path / "bad.csv")


def test_non_utf8_captions_file_is_named(tmp_path):
    (tmp_path / "pairs.csv").write_bytes("image,caption\nx.jpg,caf\xe9\n".encode("latin-1"))
    with pytest.raises(VlmcacheError, match=r"pairs.csv: not valid UTF-8 at byte \d+; re-save the file as UTF-8"):
        load_dataset(tmp_path / "pairs.csv")


def test_labelled_image_folder():
    require_shared_data()
    dataset = load_dataset(CIFAR)
    assert dataset.format == "imagefolder" and dataset.classes[0] == "airplane" and len(dataset.classes) == 10
    assert dataset.num_images == 500 and dataset.num_captions == 0
    assert dataset.image_labels is not None and np.bincount(dataset.image_labels).tolist() == [50] * 10


def test_missing_dataset_path(tmp_path):
    with pytest.raises(VlmcacheError, match="no such file or folder"):
        load_dataset(tmp_path / "nope")


# --- image decoding ---------------------------------------------------------------------------------------

def test_missing_empty_truncated_and_non_image_files(tmp_path):
    with pytest.raises(ImageDecodeError, match="not found"):
        load_rgb(tmp_path / "missing.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageDecodeError, match="empty"):
        load_rgb(tmp_path / "empty.jpg")
    Image.new("RGB", (64, 64), (200, 10, 10)).save(tmp_path / "whole.jpg", quality=90)
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match="truncated"):
        load_rgb(tmp_path / "truncated.jpg")
    (tmp_path / "notes.jpg").write_text("this is text, not a JPEG")
    with pytest.raises(ImageDecodeError, match="not an image"):
        load_rgb(tmp_path / "notes.jpg")


def test_greyscale_and_cmyk_become_rgb(tmp_path):
    Image.new("L", (8, 8), 77).save(tmp_path / "grey.png")
    assert load_rgb(tmp_path / "grey.png").getpixel((0, 0)) == (77, 77, 77)
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    red, green, blue = load_rgb(tmp_path / "cmyk.jpg").getpixel((0, 0))
    assert red > 200 and green < 60 and blue < 60


def test_transparent_images_composite_on_white(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    rgba.save(tmp_path / "rgba.png")
    image = load_rgb(tmp_path / "rgba.png")
    assert image.mode == "RGB" and image.getpixel((1, 1)) == (255, 255, 255) and image.getpixel((0, 0)) == (0, 0, 255)
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0] + [10, 200, 10] * 255)
    palette.putpixel((0, 0), 1)
    palette.save(tmp_path / "palette.png", transparency=0)
    image = load_rgb(tmp_path / "palette.png")
    assert image.getpixel((1, 1)) == (255, 255, 255) and image.getpixel((0, 0)) == (10, 200, 10)


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    pixels = np.array([[0, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(pixels).save(tmp_path / "deep.png")
    image = load_rgb(tmp_path / "deep.png")
    assert [image.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)  # 10,000 px: over the warning limit
    with pytest.raises(ImageDecodeError, match="decompression-bomb limit"):
        load_rgb(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # over twice the limit: Pillow's own error
    with pytest.raises(ImageDecodeError, match="decompression-bomb limit"):
        load_rgb(tmp_path / "big.png")
