"""Wall time of the default ablation grid (3 projectors × 2 losses × 3 seeds, plus baselines), and of its
statistics (intervals, paired tests against the best row) alone.

Runs on the shared data's Flickr8k cache (6,000 train + 1,000 val images × 5 captions, offline default
encoders: 1280-d image and 384-d text features); extract it first, or write a synthetic cache of the same
shape with --synthetic (no extraction; the numbers in the table then mean nothing, the times do).

    python benchmarks/ablate_speed.py --cache features/flickr8k
    python benchmarks/ablate_speed.py --jobs 1
    python benchmarks/ablate_speed.py --cache /tmp/f8k-shaped --synthetic
    python benchmarks/ablate_speed.py --capacity 2k,30k,400k,2M --losses infonce --out runs/capacity   # then: vlmcache plot
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

from rich.console import Console

from vlmcache.align.ablate import ablate, parse_tune
from vlmcache.app.tables import ablation_table
from vlmcache.data.synthetic import write_synthetic_cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path("features/flickr8k"))
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--capacity", help="ablate --capacity: each family at these parameter counts")
    parser.add_argument("--losses", default="infonce,sigmoid")
    parser.add_argument("--tune", help="ablate --tune, e.g. lr=3e-4,1e-3,3e-3 (needs --select-on)")
    parser.add_argument("--select-on", help="ablate --select-on, e.g. train:1000")
    parser.add_argument("--out", type=Path, help="keep the grid's folder here (default: a temporary one)")
    parser.add_argument("--synthetic", action="store_true", help="write a Flickr8k-shaped synthetic cache at --cache first")
    args = parser.parse_args()
    if args.synthetic and not (args.cache / "manifest.json").exists():
        write_synthetic_cache(args.cache, 6000, val_images=1000, captions_per_image=5, dim=1280, text_dim=384)
    if not (args.cache / "manifest.json").exists():
        raise SystemExit(f"{args.cache}: no cache; run `vlmcache extract ../shared/data/flickr8k --out {args.cache}`")
    options = {"capacity": args.capacity, "losses": tuple(args.losses.split(",")),
               "tune": parse_tune(args.tune) if args.tune else None,
               "base_config": {"select_on": args.select_on} if args.select_on else None}
    with tempfile.TemporaryDirectory() as temporary:
        started = time.perf_counter()
        result = ablate([args.cache], args.out or temporary, epochs=args.epochs, jobs=args.jobs, **options)
        seconds = time.perf_counter() - started
    console = Console(width=200)
    console.print(ablation_table(result.rows, result.split, result.selected_on))
    console.print(f"grid: {result.cells_trained} runs + baselines in {seconds:.1f} s wall "
                  f"({seconds / 60:.2f} min), jobs={args.jobs or 'all cores'}; of which statistics "
                  f"({result.statistics['resamples']} bootstrap replicates, {len(result.rows)} rows) "
                  f"{result.statistics['seconds']:.2f} s")
    cpu = sum(getattr(resource.getrusage(who), field) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for field in ("ru_utime", "ru_stime"))
    # The machine may be shared: the CPU seconds and the load say how much of the wall time was this grid's.
    console.print(f"CPU {cpu:.0f} s (this process and its workers) on {os.cpu_count()} cores; "
                  f"load average at the end {os.getloadavg()[0]:.1f} (1 min), {os.getloadavg()[1]:.1f} (5 min)")


if __name__ == "__main__":
    main()
