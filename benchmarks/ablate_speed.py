"""Wall time of the default ablation grid (3 projectors × 2 losses × 3 seeds, plus baselines), and of its
statistics (intervals, paired tests against the best row) alone.

Runs on the shared data's Flickr8k cache (6,000 train + 1,000 val images × 5 captions, offline default
encoders: 1280-d image and 384-d text features); extract it first, or write a synthetic cache of the same
shape with --synthetic (no extraction; the numbers in the table then mean nothing, the times do).

    python benchmarks/ablate_speed.py --cache features/flickr8k
    python benchmarks/ablate_speed.py --jobs 1
    python benchmarks/ablate_speed.py --cache /tmp/f8k-shaped --synthetic
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from rich.console import Console

from vlmcache.align.ablate import ablate
from vlmcache.app.tables import ablation_table
from vlmcache.data.synthetic import write_synthetic_cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path("features/flickr8k"))
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--synthetic", action="store_true", help="write a Flickr8k-shaped synthetic cache at --cache first")
    args = parser.parse_args()
    if args.synthetic and not (args.cache / "manifest.json").exists():
        write_synthetic_cache(args.cache, 6000, val_images=1000, captions_per_image=5, dim=1280, text_dim=384)
    if not (args.cache / "manifest.json").exists():
        raise SystemExit(f"{args.cache}: no cache; run `vlmcache extract ../shared/data/flickr8k --out {args.cache}`")
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        result = ablate([args.cache], out, epochs=args.epochs, jobs=args.jobs)
        seconds = time.perf_counter() - started
    console = Console(width=200)
    console.print(ablation_table(result.rows, result.split, result.selected_on))
    console.print(f"default grid: {result.cells_trained} runs + baselines in {seconds:.1f} s wall "
                  f"({seconds / 60:.2f} min), jobs={args.jobs or 'all cores'}; of which statistics "
                  f"({result.statistics['resamples']} bootstrap replicates, {len(result.rows)} rows) "
                  f"{result.statistics['seconds']:.2f} s")


if __name__ == "__main__":
    main()
