"""JPEG decoding per CPU core, full vs draft (reduced DCT scale), and what draft does to the features.

Makes photo-sized JPEGs (the shared Flickr8k images are 224 px, smaller than any draft scale) by upscaling
Flickr8k dev images to 800×600 at quality 90 into a temporary folder, then, in this one process with one
torch thread (one decode worker's share of a CPU):

- decode only (`load_rgb`) and decode + preprocess (what an extract worker does per image), in images per
  CPU-second of this process (its CPU time, not wall time: on a shared machine other processes' load
  would otherwise count): full, draft by Pillow (`load_rgb(path, preprocess.draft_side())`) and draft by
  simplejpeg (`load_rgb(path, side, "simplejpeg")`, what `--decode draft` uses when it is installed), timed
  in alternation, best of --repeats;
- the offline EfficientNet-Lite0 features of every image each way: cosine per image to the full decode, mean,
  1st percentile and min; and on how many images simplejpeg's pixels equal Pillow's draft exactly.

--breakdown adds where a decode's time goes (libjpeg-turbo called through simplejpeg into a numpy array of RGBX
pixels, so no Pillow work: at full scale, at the draft scale, and at 1/8, which still entropy-decodes every coefficient but
inverse-transforms and colour-converts 1/64 of the pixels; Pillow's own full decode without load_rgb's copies;
the file read with Pillow's header and EXIF parse). --variants adds simplejpeg's other settings: fastdct,
fastupsample, and any of libjpeg-turbo's n/8 scales (the smallest keeping the margin) instead of Pillow's
1/2, 1/4, 1/8; and Pillow's draft to YCbCr (libjpeg-turbo's colour conversion skipped) converted to RGB by
Pillow: each with its speed and feature cosine.

    python benchmarks/decode.py                    # 500 images, 800×600, Lite0's own preprocessing
    python benchmarks/decode.py --size 1024x768 --json decode.json
    python benchmarks/decode.py --size 1280x960 --breakdown --variants
    python benchmarks/decode.py --crop-pct 1.0     # CLIP-style: shorter side to 224, centre crop 224
    python benchmarks/decode.py --margin 1         # draft right down to the side the resize needs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import simplejpeg
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

from vlmcache.data.datasets import load_rgb
from vlmcache.encode import encoders
from vlmcache.encode.encoders import Preprocess, load_image_encoder

FLICKR = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k"


def make_photos(folder: Path, count: int, size: tuple[int, int], quality: int) -> list[Path]:
    """Flickr8k dev images upscaled (bicubic) to `size` and saved as JPEGs of `quality` in `folder`."""
    names = (FLICKR / "Flickr_8k.devImages.txt").read_text().split()[:count]
    paths = []
    for name in names:
        with Image.open(FLICKR / "Images" / name) as image:
            photo = image.convert("RGB").resize(size, Image.BICUBIC)
        paths.append(folder / name)
        photo.save(paths[-1], quality=quality)
    return paths


def rates(functions: dict, paths: list[Path], repeats: int) -> dict[str, float]:
    """Images per CPU-second of each function(path) over all paths: best of `repeats` passes, the functions
    in alternation so that a change in the machine's load touches all alike (after one warm-up pass)."""
    best = dict.fromkeys(functions, float("inf"))
    for number in range(repeats + 1):
        for name, function in functions.items():
            started = time.process_time()
            for path in paths:
                function(path)
            if number:
                best[name] = min(best[name], time.process_time() - started)
    return {name: len(paths) / seconds for name, seconds in best.items()}


def features(encoder, preprocess: Preprocess, paths: list[Path], decode=None, batch: int = 64) -> np.ndarray:
    """Pooled features of every image decoded by `decode` (default: as `preprocess` says) and preprocessed."""
    decode = decode or (lambda path: load_rgb(path, preprocess.draft_side(), preprocess.jpeg_decoder))
    rows = []
    for start in range(0, len(paths), batch):
        pixels = [preprocess(decode(path)) for path in paths[start:start + batch]]
        rows.append(encoder.encode(torch.from_numpy(np.stack(pixels))).pooled.numpy())
    return np.concatenate(rows)


def then_preprocess(decode, preprocess: Preprocess):
    return lambda path: preprocess(decode(path))


def cosines(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    first = first / np.linalg.norm(first, axis=1, keepdims=True)
    second = second / np.linalg.norm(second, axis=1, keepdims=True)
    return (first * second).sum(axis=1)


def summary(similarity: np.ndarray) -> dict[str, float]:
    return {"mean": float(similarity.mean()), "p01": float(np.percentile(similarity, 1)),
            "min": float(similarity.min())}


def pillow_scale(size: tuple[int, int], side: int) -> tuple[int, int]:
    """(height, width) Image.draft decodes a `size` JPEG at when both sides must stay ≥ `side`."""
    scale = min(size[0] // side, size[1] // side)
    scale = next(factor for factor in (8, 4, 2, 1) if scale >= factor)
    return -(-size[1] // scale), -(-size[0] // scale)


def other_variants(side: int) -> dict:
    """simplejpeg's other settings, and Pillow's draft to YCbCr converted to RGB by Pillow, each a decode function
    path -> RGB image (no fallback: test JPEGs only)."""
    def variant(fastdct: bool, fastupsample: bool, any_scale: bool):
        def decode(path: Path) -> Image.Image:
            data = path.read_bytes()
            if any_scale:  # libjpeg-turbo's smallest n/8 scale keeping both sides ≥ side
                wanted = (side, side)
            else:
                height, width = simplejpeg.decode_jpeg_header(data)[:2]
                wanted = pillow_scale((width, height), side)
            pixels = simplejpeg.decode_jpeg(data, "RGBX", fastdct, fastupsample, *wanted)  # as draft_with_simplejpeg
            return Image.frombytes("RGB", pixels.shape[1::-1], pixels, "raw", "RGBX")
        return decode

    def pillow_ycbcr(path: Path) -> Image.Image:  # libjpeg-turbo skips its colour conversion, Pillow does it
        with Image.open(path) as image:
            image.draft("YCbCr", (side, side))
            image.load()
            return image.convert("RGB")

    return {"pillow_ycbcr": pillow_ycbcr, "sj_fastdct": variant(True, False, False),
            "sj_fastupsample": variant(False, True, False), "sj_fastdct_fastupsample": variant(True, True, False),
            "sj_any_scale": variant(False, False, True), "sj_any_scale_fast": variant(True, True, True)}


def breakdown_functions(size: tuple[int, int], side: int) -> dict:
    """The parts of a decode, each path -> something, for rates()."""
    def pillow_full(path: Path):
        with Image.open(path) as image:
            image.load()
            return image

    def header(path: Path):
        data = path.read_bytes()
        with Image.open(path) as image:
            return data, image.getexif()

    drafted = pillow_scale(size, side)
    return {"raw_full": lambda path: simplejpeg.decode_jpeg(path.read_bytes(), "RGBX"),
            "raw_draft": lambda path: simplejpeg.decode_jpeg(path.read_bytes(), "RGBX", False, False, *drafted),
            "raw_eighth": lambda path: simplejpeg.decode_jpeg(path.read_bytes(), "RGBX", False, False, 1, 1),
            "pillow_full_no_copies": pillow_full, "read_header_exif": header}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--size", default="800x600", help="WIDTHxHEIGHT of the test JPEGs")
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="efficientnet-lite0")
    parser.add_argument("--crop-pct", type=float, help="preprocess with this crop_pct instead of the model's")
    parser.add_argument("--margin", type=float, default=encoders.DRAFT_MARGIN,
                        help="draft down to this many times the side the resize needs [default: vlmcache's]")
    parser.add_argument("--breakdown", action="store_true", help="also time the parts of a decode")
    parser.add_argument("--variants", action="store_true", help="also measure simplejpeg's other settings")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core, as one decode worker has
    encoders.DRAFT_MARGIN = args.margin  # read by Preprocess.draft_side
    size = tuple(int(side) for side in args.size.split("x"))
    load_before = os.getloadavg()
    encoder = load_image_encoder(args.model, device="cpu")
    full = encoder.preprocess if args.crop_pct is None else dataclasses.replace(encoder.preprocess, crop_pct=args.crop_pct)
    draft = dataclasses.replace(full, jpeg_draft=True)
    fast = dataclasses.replace(draft, jpeg_decoder="simplejpeg")
    side = draft.draft_side()
    with tempfile.TemporaryDirectory() as folder:
        paths = make_photos(Path(folder), args.images, size, args.quality)
        with Image.open(paths[0]) as probe:
            probe.draft("RGB", (side, side))
            drafted = probe.size
        decoders = {"full": lambda p: load_rgb(p), "draft": lambda p: load_rgb(p, side),
                    "simplejpeg": lambda p: load_rgb(p, side, "simplejpeg")}
        if args.variants:
            decoders.update(other_variants(side))
        functions = {f"decode_{name}": decode for name, decode in decoders.items()}
        functions.update({f"decode_preprocess_{name}": then_preprocess(decode, full) for name, decode in decoders.items()})
        if args.breakdown:
            functions.update(breakdown_functions(size, side))
        results = rates(functions, paths, args.repeats)
        reference = features(encoder, full, paths)
        results["cosine"] = {"draft": summary(cosines(reference, features(encoder, draft, paths))),
                             "simplejpeg": summary(cosines(reference, features(encoder, fast, paths)))}
        for name, decode in decoders.items():
            if name not in ("full", "draft", "simplejpeg"):
                results["cosine"][name] = summary(cosines(reference, features(encoder, full, paths, decode)))
        results["simplejpeg_equal_to_draft"] = sum(
            np.array_equal(np.asarray(load_rgb(path, side)), np.asarray(load_rgb(path, side, "simplejpeg")))
            for path in paths)
        if args.variants:
            results["any_scale_size"] = list(decoders["sj_any_scale"](paths[0]).size)
    results.update({"cosine_mean": results["cosine"]["draft"]["mean"], "cosine_min": results["cosine"]["draft"]["min"],
                    "cosine_p01": results["cosine"]["draft"]["p01"], "images": args.images, "size": list(size),
                    "drafted_size": list(drafted), "draft_side": side, "quality": args.quality,
                    "model": args.model, "crop_pct": full.crop_pct, "margin": args.margin,
                    "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                    "pillow": Image.__version__, "simplejpeg": simplejpeg.__version__,
                    "load_average": [list(load_before), list(os.getloadavg())]})
    table = Table(title=f"{args.images} JPEGs {size[0]}×{size[1]} q{args.quality}, one core; draft side ≥ {side}; "
                        "images per CPU-second; cosine of Lite0 features to the full decode")
    for column in ("decoder", "decodes at", "decode", "speed-up", "decode + preprocess", "speed-up", "cosine mean",
                   "1st pct", "min"):
        table.add_column(column)
    for name in decoders:
        at = results.get("any_scale_size") if name.startswith("sj_any") else (size if name == "full" else drafted)
        cosine = results["cosine"].get(name, {"mean": 1.0, "p01": 1.0, "min": 1.0})
        table.add_row(name, f"{at[0]}×{at[1]}", f"{results[f'decode_{name}']:.0f}",
                      f"{results[f'decode_{name}'] / results['decode_full']:.2f}×",
                      f"{results[f'decode_preprocess_{name}']:.0f}",
                      f"{results[f'decode_preprocess_{name}'] / results['decode_preprocess_full']:.2f}×",
                      *(f"{cosine[key]:.5f}" for key in ("mean", "p01", "min")))
    console = Console()
    console.print(table)
    console.print(f"simplejpeg's pixels equal Pillow's draft on {results['simplejpeg_equal_to_draft']} of "
                  f"{args.images} images" + (f"; any n/8 scale decodes at {results['any_scale_size']}"
                                             if args.variants else ""))
    if args.breakdown:
        for name in breakdown_functions(size, side):
            console.print(f"{name}: {1000 / results[name]:.2f} ms of CPU per image ({results[name]:.0f}/s)")
    console.print(f"load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after; "
                  f"Pillow {Image.__version__}, simplejpeg {simplejpeg.__version__}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
