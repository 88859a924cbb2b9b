"""One training epoch on the cache vs one epoch with the frozen encoders in the loop, same machine, run.

The in-the-loop variant is how the small CLIP-style projects people copy train: every step decodes the
batch's images, runs the frozen image and text encoders, then updates the projectors. Its epoch time is
extrapolated from `--loop-steps` timed steps (a full epoch of it takes many minutes on a CPU); the cache
epoch time is measured whole. Prints the ratio.

    python benchmarks/train_speed.py --cache features/flickr8k
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from vlmcache import open_cache
from vlmcache.align.config import TrainConfig
from vlmcache.align.model import initial_model
from vlmcache.align.train import train
from vlmcache.data.datasets import load_rgb
from vlmcache.encode.encoders import image_encoder_from_provenance, text_encoder_from_provenance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path("features/flickr8k"))
    parser.add_argument("--projector", default="mlp")
    parser.add_argument("--loss", default="infonce")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--loop-steps", type=int, default=2, help="timed steps of the encoders-in-the-loop variant")
    parser.add_argument("--epochs", type=int, default=20, help="for the full-run timing on the cache")
    args = parser.parse_args()
    cache = open_cache(args.cache)
    config = TrainConfig(projector=args.projector, loss=args.loss, batch_size=args.batch_size, epochs=args.epochs)

    with tempfile.TemporaryDirectory() as folder:
        run = train(cache, folder, config)
    cache_epoch = min(record["train_seconds"] for record in run.history)  # the optimisation steps only
    cache_epoch_with_validation = min(record["seconds"] for record in run.history)
    full_run = run.seconds

    split = cache.split("train")
    images = image_encoder_from_provenance(cache.provenance["images"]["encoder"], "cpu")
    texts = text_encoder_from_provenance(cache.provenance["texts"]["encoder"], "cpu")
    model = initial_model(config, cache.image_dim, cache.text_dim)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(0)
    step_times = []
    for _ in range(args.loop_steps):
        started = time.perf_counter()
        rows = torch.randperm(len(split.image_ids), generator=generator)[:args.batch_size].tolist()
        pixels = torch.stack([torch.from_numpy(images.preprocess(load_rgb(split.image_paths[r]))) for r in rows])
        first_caption = {int(image): caption for caption, image in zip(split.captions, split.caption_image, strict=True)}
        image_features = images.encode(pixels).pooled
        text_features = texts.encode([first_caption[r] for r in rows]).pooled
        loss = model.loss(model.image(image_features), model.text(text_features))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step_times.append(time.perf_counter() - started)
    steps_per_epoch = math.ceil(len(split.image_ids) / args.batch_size)
    loop_epoch = sum(step_times) / len(step_times) * steps_per_epoch

    table = Table(title=f"one training epoch, {args.projector} + {args.loss}, batch {args.batch_size}, "
                        f"{len(split.image_ids):,} train images, {torch.get_num_threads()} CPU threads")
    table.add_column("variant")
    table.add_column("seconds / epoch", justify="right")
    table.add_row("vlmcache train on cached features", f"{cache_epoch:.3f}")
    table.add_row("  the same plus its per-epoch validation (1,000 images × 5,000 captions)",
                  f"{cache_epoch_with_validation:.3f}")
    table.add_row(f"frozen encoders in the loop (extrapolated from {args.loop_steps} steps)", f"{loop_epoch:,.1f}")
    table.add_row("speed-up, training steps alike", f"{loop_epoch / cache_epoch:,.0f}×")
    table.add_row("speed-up, cache epoch including its validation", f"{loop_epoch / cache_epoch_with_validation:,.0f}×")
    table.add_row(f"whole {args.epochs}-epoch run on the cache (incl. loading, validation, checkpoints)", f"{full_run:.1f}")
    Console().print(table)


if __name__ == "__main__":
    main()
