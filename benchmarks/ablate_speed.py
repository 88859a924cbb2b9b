"""Wall time of the default ablation grid (3 projectors × 2 losses × 3 seeds, plus baselines).

Runs on the shared data's Flickr8k cache (6,000 train + 1,000 val images × 5 captions, offline default
encoders: 1280-d image and 384-d text features); extract it first.

    python benchmarks/ablate_speed.py --cache features/flickr8k
    python benchmarks/ablate_speed.py --jobs 1
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from rich.console import Console

from vlmcache.align.ablate import ablate
from vlmcache.app.cli import ablation_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path("features/flickr8k"))
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    if not (args.cache / "manifest.json").exists():
        raise SystemExit(f"{args.cache}: no cache; run `vlmcache extract ../shared/data/flickr8k --out {args.cache}`")
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        result = ablate([args.cache], out, epochs=args.epochs, jobs=args.jobs)
        seconds = time.perf_counter() - started
    console = Console(width=200)
    console.print(ablation_table(result.rows, result.split))
    console.print(f"default grid: {result.cells_trained} runs + baselines in {seconds:.1f} s wall "
                  f"({seconds / 60:.2f} min), jobs={args.jobs or 'all cores'}")


if __name__ == "__main__":
    main()
