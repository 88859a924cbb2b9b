"""Captioning on the full Flickr8k cache: train a captioner on the CPU, then score it on the dev split beside
the nearest-neighbour and constant baselines (BLEU-1..4, METEOR, ROUGE-L, CIDEr, all 5 references).

Reports training time (wall, with and without the per-epoch greedy validation, and CPU seconds of this
process: run it with OMP_NUM_THREADS=1 on a shared machine), peak RSS of this process (the Java metric
helpers run as child processes and are not counted), and the same captioner decoded greedily and with
beam search (benchmarks/caption_decoding.py sweeps beam widths and length penalties).

    OMP_NUM_THREADS=1 python benchmarks/caption.py --cache features/flickr8k-lite2 --out runs/caption-bench
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch
from rich.console import Console

from vlmcache.app.tables import caption_table
from vlmcache.caption.config import CaptionConfig
from vlmcache.caption.evaluate import evaluate_captioner
from vlmcache.caption.train import train_captioner


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (all its threads; child processes not counted)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path("features/flickr8k"))
    parser.add_argument("--out", type=Path, default=Path("runs/caption-bench"))
    parser.add_argument("--projector", default="mlp")
    parser.add_argument("--image-features", default=None, help="image feature sets joined by '+', e.g. a+b+c")
    parser.add_argument("--prefix-tokens", type=int, default=4)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write all numbers here")
    args = parser.parse_args()
    console = Console(width=160)
    config = CaptionConfig(projector=args.projector, image_features=args.image_features, prefix_tokens=args.prefix_tokens,
                           layers=args.layers, width=args.width, epochs=args.epochs, batch_size=args.batch_size,
                           lr=args.lr, seed=args.seed)

    def show(record: dict) -> None:
        console.print(f"epoch {record['epoch']}: loss {record['train_loss']:.3f}, val BLEU-4 {record['val_bleu4']:.1f}, "
                      f"CIDEr {record['val_cider']:.1f} ({record['train_seconds']:.0f} s + "
                      f"{record['seconds'] - record['train_seconds']:.0f} s validation)")

    started, cpu_started = time.perf_counter(), cpu_seconds()
    result = train_captioner(args.cache, args.out, config, overwrite=True, device="cpu", on_epoch=show)
    train_wall, train_cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
    optimisation = sum(record["train_seconds"] for record in result.history)
    peak_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2

    started = time.perf_counter()
    beam = evaluate_captioner(args.out, split="val", beam=args.beam)
    eval_seconds = time.perf_counter() - started
    # The best epoch's own validation is the greedy score on the same split (without METEOR, left out there).
    greedy = {"trained (greedy; best epoch's validation)": {name: result.best_metrics.get(name) for name in
                                                           ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider")}}
    rows = {**{name: row for name, row in beam.rows.items() if name.startswith("trained")}, **greedy,
            **{name: row for name, row in beam.rows.items() if not name.startswith("trained")}}
    console.print(caption_table(f"Flickr8k dev (1,000 images, 5 references), ×100; best epoch {result.best_epoch} "
                                 "by val CIDEr", rows))
    console.print(f"training: {train_wall:.0f} s wall, {train_cpu:.0f} CPU-s ({torch.get_num_threads()} threads) for "
                  f"{args.epochs} epochs ({optimisation:.0f} s optimisation, "
                  f"{train_wall - optimisation:.0f} s loading + per-epoch greedy validation); {result.parameters:,} "
                  f"trained parameters; peak RSS {peak_rss_gb:.2f} GB; eval with beam {args.beam} + baselines "
                  f"{eval_seconds:.0f} s")
    for image_id, generated, reference in beam.examples:
        console.print(f"{image_id}: {generated!r}  (a reference: {reference!r})")
    if args.json:
        args.json.write_text(json.dumps({"config": vars(args) | {"cache": str(args.cache), "out": str(args.out),
                                                                 "json": str(args.json)},
                                         "captioning": rows, "train_wall_seconds": train_wall, "train_cpu_seconds": train_cpu,
                                         "threads": torch.get_num_threads(),
                                         "optimisation_seconds": optimisation, "peak_rss_gb": peak_rss_gb,
                                         "best_epoch": result.best_epoch, "history": result.history,
                                         "parameters": result.parameters}, indent=2))


if __name__ == "__main__":
    main()
