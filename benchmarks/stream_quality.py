"""Does streaming cost quality? In-memory vs streamed training on a real cache, several seeds.

    python benchmarks/stream_quality.py --cache ../wt-quality/features/flickr8k-multi --out runs/stream-quality

Trains linear + InfoNCE (20 epochs, batch 256, the defaults otherwise) on the cache's default feature
sets three ways, each with seeds 0, 1, 2: in memory; streamed with the default window (65,536 images:
the whole Flickr8k train split, so only the order's random source differs); streamed with a one-shard
window (1,024 images: a batch mixes at most two shards). Reports best-epoch val mean recall, mean ± std.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from vlmcache.align.config import TrainConfig
from vlmcache.align.train import train

VARIANTS = {"in memory": {}, "streamed, window 65,536 images": {"stream": True},
            "streamed, window 1,024 images (one shard)": {"stream": True, "stream_buffer": 1024}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--out", default="runs/stream-quality")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    for name, options in VARIANTS.items():
        recalls, seconds = [], []
        for seed in (int(s) for s in args.seeds.split(",")):
            config = TrainConfig(projector="linear", loss="infonce", epochs=args.epochs, seed=seed, **options)
            started = time.perf_counter()
            run = f"{'stream' if options else 'memory'}-{options.get('stream_buffer', 'all')}-seed{seed}"
            result = train(args.cache, Path(args.out) / run, config, overwrite=True)
            seconds.append(time.perf_counter() - started)
            recalls.append(result.best_metrics["mean_recall"])
            print(f"{name} seed {seed}: {recalls[-1]:.2f} (best epoch {result.best_epoch}, {seconds[-1]:.1f} s)", flush=True)
        results[name] = {"mean_recall": recalls, "mean": statistics.mean(recalls), "std": statistics.pstdev(recalls),
                         "seconds": seconds}
        print(f"{name}: {results[name]['mean']:.2f} ± {results[name]['std']:.2f}", flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "stream-quality.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
