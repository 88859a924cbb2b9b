"""`vlmcache demo`: the whole pipeline on the shared Flickr8k when it is there, else on a small procedural
dataset of coloured shapes with matching captions, written in the Flickr8k layout so the same pipeline runs."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from vlmcache.align.config import TrainConfig
from vlmcache.align.train import TrainResult
from vlmcache.app.predictor import classify_image
from vlmcache.app.workflows import train
from vlmcache.cache.store import open_cache
from vlmcache.cache.writer import ExtractResult
from vlmcache.encode.config import ExtractConfig
from vlmcache.encode.extract import extract
from vlmcache.eval.evaluate import EvalReport, evaluate_checkpoint

SHARED_FLICKR = Path("../shared/data/flickr8k")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
           "purple": (140, 60, 170), "orange": (240, 130, 30)}
SHAPES = ("circle", "square", "triangle")
PLACES = {"left": (0.3, 0.5), "right": (0.7, 0.5), "top": (0.5, 0.3), "bottom": (0.5, 0.7), "centre": (0.5, 0.5)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20), "grey": (128, 128, 128)}
CAPTION_TEMPLATES = (
    "a {colour} {shape} on the {place} of a {background} picture",
    "a {colour} {shape} at the {place}",
    "{background} background with a {colour} {shape}",
    "there is a {shape} coloured {colour} on {background}",
    "one {colour} {shape} placed {place}",
)


def find_demo_data(data: str | Path | None) -> Path | None:
    """The dataset the demo should use: `data` if given, else the shared Flickr8k if present, else None."""
    if data is not None:
        return Path(data)
    return SHARED_FLICKR if (SHARED_FLICKR / "Flickr8k.token.txt").exists() else None


def make_shapes_dataset(folder: str | Path, train: int = 1200, val: int = 300, seed: int = 0, size: int = 96) -> Path:
    """Write a procedural captioned dataset (Flickr8k layout) of coloured shapes; returns its folder."""
    folder = Path(folder)
    (folder / "Images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    tokens, splits = [], {"train": [], "val": []}
    for index in range(train + val):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        place, background = rng.choice(list(PLACES)), rng.choice(list(BACKGROUNDS))
        name = f"shape_{index:05d}.png"
        _draw(folder / "Images" / name, size, COLOURS[colour], shape, PLACES[place], BACKGROUNDS[background])
        for number, template in enumerate(CAPTION_TEMPLATES):
            caption = template.format(colour=colour, shape=shape, place=place, background=background)
            tokens.append(f"{name}#{number}\t{caption}")
        splits["train" if index < train else "val"].append(name)
    (folder / "Flickr8k.token.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    (folder / "Flickr_8k.trainImages.txt").write_text("\n".join(splits["train"]) + "\n")
    (folder / "Flickr_8k.devImages.txt").write_text("\n".join(splits["val"]) + "\n")
    return folder


def _draw(path: Path, size: int, colour, shape: str, centre, background) -> None:
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    cx, cy, r = centre[0] * size, centre[1] * size, size * 0.18
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    image.save(path)


@dataclass
class DemoResult:
    """What `vlmcache demo` did: the data it used, the cache, the run, its evaluation and one classified photo."""

    source: Path
    generated: bool  # True when no Flickr8k was found and the shapes dataset was made
    extract: ExtractResult
    train: TrainResult
    report: EvalReport
    image: Path
    true_caption: str
    ranking: list
    scale: float


def run_demo(data: str | Path | None, out: Path, limit: int = 2000, epochs: int = 20,
             on_step: Callable[[str], None] = lambda _: None) -> DemoResult:
    """The whole pipeline on the offline default encoders: extract → train (MLP + InfoNCE) → eval → classify one
    validation photo against its own caption and three others. `on_step(title)` announces each step."""
    source = find_demo_data(data)
    generated = source is None
    if generated:
        source = make_shapes_dataset(out / "shapes-data")
    on_step(f"1/4 extract {source} (first {limit} images per split) with efficientnet-lite0 + minilm")
    extracted = extract(source, out / "cache", ExtractConfig(limit=limit))
    on_step("2/4 train an MLP projector with InfoNCE on the cached features")
    trained = train(out / "cache", out / "run", TrainConfig(projector="mlp", loss="infonce", epochs=epochs), overwrite=True)
    on_step("3/4 evaluate: trained vs untrained projector and training-free baselines")
    report = evaluate_checkpoint(out / "run")
    on_step("4/4 classify one validation photo against its own caption and three others")
    val = open_cache(out / "cache").split("val")
    count = len(val.image_ids)
    first_caption = {int(image): caption for caption, image in zip(val.captions, val.caption_image, strict=True)
                     if image in (0, count // 3, count // 2, 2 * count // 3)}
    rows, scale = classify_image(out / "run", val.image_paths[0], list(dict.fromkeys(first_caption.values())))
    return DemoResult(Path(source), generated, extracted, trained, report, Path(val.image_paths[0]), first_caption[0],
                      rows, scale)
