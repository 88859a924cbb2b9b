"""JPEG decoding per CPU core, full vs draft (reduced DCT scale), and what draft does to the features.

Makes photo-sized JPEGs (the shared Flickr8k images are 224 px, smaller than any draft scale) by upscaling
Flickr8k dev images to 800×600 at quality 90 into a temporary folder, then, in this one process with one
torch thread (one decode worker's share of a CPU):

- decode only (`load_rgb`) and decode + preprocess (what an extract worker does per image), in images per
  CPU-second of this process (its CPU time, not wall time: on a shared machine other processes' load
  would otherwise count), full and draft (`load_rgb(path, preprocess.draft_side())`), the two timed in
  alternation, best of --repeats;
- the offline EfficientNet-Lite0 features of every image both ways: cosine per image, mean and min.

    python benchmarks/decode.py                    # 500 images, 800×600, Lite0's own preprocessing
    python benchmarks/decode.py --size 1024x768 --json decode.json
    python benchmarks/decode.py --crop-pct 1.0     # CLIP-style: shorter side to 224, centre crop 224
    python benchmarks/decode.py --margin 1         # draft right down to the side the resize needs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
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


def features(encoder, preprocess: Preprocess, paths: list[Path], batch: int = 64) -> np.ndarray:
    """Pooled features of every image decoded and preprocessed with `preprocess`."""
    rows = []
    for start in range(0, len(paths), batch):
        pixels = [preprocess(load_rgb(path, preprocess.draft_side())) for path in paths[start:start + batch]]
        rows.append(encoder.encode(torch.from_numpy(np.stack(pixels))).pooled.numpy())
    return np.concatenate(rows)


def cosines(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    first = first / np.linalg.norm(first, axis=1, keepdims=True)
    second = second / np.linalg.norm(second, axis=1, keepdims=True)
    return (first * second).sum(axis=1)


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
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core, as one decode worker has
    encoders.DRAFT_MARGIN = args.margin  # read by Preprocess.draft_side
    size = tuple(int(side) for side in args.size.split("x"))
    encoder = load_image_encoder(args.model, device="cpu")
    full = encoder.preprocess if args.crop_pct is None else dataclasses.replace(encoder.preprocess, crop_pct=args.crop_pct)
    draft = dataclasses.replace(full, jpeg_draft=True)
    with tempfile.TemporaryDirectory() as folder:
        paths = make_photos(Path(folder), args.images, size, args.quality)
        with Image.open(paths[0]) as probe:
            probe.draft("RGB", (draft.draft_side(),) * 2)
            drafted = probe.size
        results = rates({"decode_full": lambda p: load_rgb(p),
                         "decode_draft": lambda p: load_rgb(p, draft.draft_side()),
                         "decode_preprocess_full": lambda p: full(load_rgb(p)),
                         "decode_preprocess_draft": lambda p: draft(load_rgb(p, draft.draft_side()))}, paths, args.repeats)
        similarity = cosines(features(encoder, full, paths), features(encoder, draft, paths))
    results.update({"cosine_mean": float(similarity.mean()), "cosine_min": float(similarity.min()),
                    "cosine_p01": float(np.percentile(similarity, 1)), "images": args.images, "size": list(size),
                    "drafted_size": list(drafted), "draft_side": draft.draft_side(), "quality": args.quality,
                    "model": args.model, "crop_pct": full.crop_pct, "margin": args.margin,
                    "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                    "pillow": Image.__version__})
    table = Table(title=f"{args.images} JPEGs {size[0]}×{size[1]} q{args.quality}, one core; draft decodes at "
                        f"{drafted[0]}×{drafted[1]} (side ≥ {draft.draft_side()}); images per CPU-second")
    for column in ("measure", "full", "draft", "speed-up"):
        table.add_column(column)
    for label, key in (("decode", "decode"), ("decode + preprocess", "decode_preprocess")):
        fast, slow = results[f"{key}_draft"], results[f"{key}_full"]
        table.add_row(label, f"{slow:.0f}", f"{fast:.0f}", f"{fast / slow:.2f}×")
    console = Console()
    console.print(table)
    console.print(f"{args.model} features, draft vs full: cosine mean {results['cosine_mean']:.5f}, "
                  f"1st percentile {results['cosine_p01']:.5f}, min {results['cosine_min']:.5f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
