"""`vlmcache compat` at Flickr8k size: wall time and peak RSS of scoring every pair of a many-set cache.

    python benchmarks/compat.py --work /tmp/compat-bench --json runs/compat-bench.json
    python benchmarks/compat.py --work /tmp/compat-bench --samples 2000,3000 --keep

The cache is synthetic (vlmcache.data.synthetic, the real store API): 6,000 train images × 5 captions plus
1,000 val images, 10 image sets of 1,280-d (EfficientNet-Lite2's width) and 3 text sets of 384-d (MiniLM's),
float16 in shards of 1,024 rows, each set its own random map of a shared latent with its own noise level.
Each measurement is the command line itself (`python -m vlmcache compat CACHE --sample N --json ...`) in a
child process: wall time includes starting Python and importing torch; peak RSS is the child's
(`os.wait4`'s ru_maxrss); the command's own time (reading + scoring) is in its JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

TRAIN, VAL, CAPTIONS = 6_000, 1_000, 5
IMAGE_SETS, TEXT_SETS, IMAGE_DIM, TEXT_DIM = 10, 3, 1280, 384


def write_cache(out: Path) -> float:
    """The synthetic 10 × 3-set cache; returns the seconds it took."""
    from vlmcache.data.synthetic import write_synthetic_cache

    started = time.perf_counter()
    # Noise levels spread so the sets differ in how much they share with the text side.
    write_synthetic_cache(out, TRAIN, val_images=VAL, captions_per_image=CAPTIONS, dim=IMAGE_DIM, text_dim=TEXT_DIM,
                          shard_size=1024, noise=1.0,
                          extra_image_sets={f"image-{i}": 0.5 + 0.4 * i for i in range(1, IMAGE_SETS)},
                          extra_text_sets={f"text-{i}": 0.5 + 0.5 * i for i in range(1, TEXT_SETS)})
    return time.perf_counter() - started


def measure(cache: Path, sample: int, json_out: Path) -> dict:
    """One `vlmcache compat` run in a child process: wall seconds, CPU seconds, peak RSS and the command's report."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "vlmcache", "compat", str(cache), "--sample", str(sample),
                                "--json", str(json_out)], stdout=subprocess.DEVNULL,
                               env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise SystemExit(f"vlmcache compat --sample {sample} failed (status {status})")
    report = json.loads(json_out.read_text())
    return {"sample": sample, "rows": report["rows"], "pairs": len(report["pairs"]),
            "wall_s": round(time.perf_counter() - started, 2), "command_s": round(report["seconds"], 2),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024),
            "best": report["pairs"][0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/compat-bench"), help="Folder for the synthetic cache.")
    parser.add_argument("--samples", default="2000", help="Comma-separated --sample values to time.")
    parser.add_argument("--json", type=Path, help="Write the measurements here.")
    parser.add_argument("--keep", action="store_true", help="Keep the synthetic cache.")
    args = parser.parse_args()
    cache = args.work / "cache"
    written = None
    if not (cache / "manifest.json").exists():
        written = round(write_cache(cache), 1)
    results = {"cache": {"train_images": TRAIN, "captions_per_image": CAPTIONS, "image_sets": IMAGE_SETS,
                         "text_sets": TEXT_SETS, "image_dim": IMAGE_DIM, "text_dim": TEXT_DIM, "write_s": written},
               "cpus": os.cpu_count(), "load_average": os.getloadavg(),
               "runs": [measure(cache, int(sample), args.work / f"compat-{sample}.json")
                        for sample in args.samples.split(",")]}
    for run in results["runs"]:
        print(f"--sample {run['sample']}: {run['pairs']} pairs ({IMAGE_SETS} image × {TEXT_SETS} text sets + "
              f"combinations) in {run['wall_s']} s wall ({run['command_s']} s in the command, {run['cpu_s']} s CPU), "
              f"peak RSS {run['peak_rss_mb']} MB")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
