"""What verifying shards costs when a split is loaded: the cache as written (fletcher32 on every chunk)
against a copy of the same shards without the checksum filter (same chunking, same bytes otherwise).

Both copies are read once first, so the timed loads come from the page cache and measure the CPU cost of
checking, not the disk. Prints the median of `--repeats` alternating loads of each and the overhead.

    python benchmarks/checksum_overhead.py --cache features/flickr8k [--split train]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import h5py

from vlmcache.cache.store import open_cache


def copy_without_checksums(source: Path, target: Path) -> None:
    """The cache folder copied, its shards rewritten without the fletcher32 filter."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.onnx", "prompt-features*"))
    for shard_path in target.glob("*/shard-*.h5"):
        rewritten = shard_path.with_suffix(".plain")
        with h5py.File(shard_path, "r") as old, h5py.File(rewritten, "w", track_order=True) as new:
            for key, value in old.attrs.items():
                new.attrs[key] = value
            for name, dataset in old.items():
                new.create_dataset(name, data=dataset[()], dtype=dataset.dtype, chunks=dataset.chunks)
        rewritten.replace(shard_path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path("features/flickr8k"))
    parser.add_argument("--split", default="train")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vlmcache-checksum-") as folder:
        plain = Path(folder) / "plain"
        copy_without_checksums(args.cache, plain)
        caches = {"fletcher32 (as written)": args.cache, "no checksum": plain}
        seconds: dict[str, list[float]] = {name: [] for name in caches}
        for path in caches.values():
            open_cache(path).split(args.split)  # warm the page cache
        for _ in range(args.repeats):
            for name, path in caches.items():
                started = time.perf_counter()
                loaded = open_cache(path).split(args.split)
                seconds[name].append(time.perf_counter() - started)
        rows = len(loaded.image_features) + len(loaded.text_features)
        checked, unchecked = (statistics.median(seconds[name]) for name in caches)
        print(f"split {args.split!r} of {args.cache}: {rows:,} feature rows")
        for name in caches:
            print(f"  {name:<24} median {statistics.median(seconds[name]):.3f} s over {args.repeats} loads")
        print(f"  checksum overhead: {100 * (checked - unchecked) / unchecked:+.1f} % of the split load time")


if __name__ == "__main__":
    main()
