"""Scale: in-memory vs streamed training, evaluation at 1e5 × 5e5 and search over 1e6, on synthetic caches.

    python benchmarks/scale.py --work /tmp/scale-bench --json runs/scale.json                 # N = 1e5, 1e6
    python benchmarks/scale.py --work /tmp/scale-bench --sizes 10000000 --skip-in-memory      # N = 1e7 (~20 GB)
    python benchmarks/scale.py --work /tmp/scale-bench --only eval,search

Caches are written by `vlmcache.data.synthetic.write_synthetic_cache` (the real store API: index, manifest,
fletcher32-checked HDF5 shards of 16,384 rows): N training pairs (one caption per image) of 512-d
float16 image and text features sharing a latent, plus 2,000 val images. Every measurement runs in its
own child process, so its peak RSS (`os.wait4`'s ru_maxrss) and CPU seconds (user + system) are its own:

- train: `vlmcache.train` of a linear + InfoNCE pair, one epoch, batch 256, in memory and with `stream=True`;
  rows/s = pairs / the epoch's training-loop seconds (streaming reads inside that loop; loading the split
  in memory happens before it and is in the wall time);
- read: the streaming reader alone (batches of 4,096, no training): the rate it could feed a faster trainer;
- eval: R@1/5/10 and median ranks of the 1e5-train-pairs model on a split of 100,000 images × 500,000
  captions (5 each), embedded chunk by chunk (`vlmcache.cache.stream.embed_split`) and ranked in tiles;
- search: a 1,000,000-image split embedded once (`Predictor.searchable`), then exact top-5 of 50 random
  query vectors (matrix product + top-k; the text encoder's cost per query is measured in benchmarks/latency.py).
One torch thread per child (the machine's two cores are shared). Synthetic caches are deleted at the end
unless --keep.
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

SHARD = 16_384
VAL = 2_000
NOISE = 3.0  # per-feature noise 3x the latent signal: one epoch of 20k pairs reaches ~21 val mean recall (untrained 0.3)


def child(mode: str, args: list[str]) -> dict:
    """Run one measurement in a child process; its result (last stdout line, JSON) plus wall, CPU and peak RSS."""
    started = time.perf_counter()
    # One torch thread: on a shared 2-core machine a second OpenMP thread spin-waits (68 vs 5 ms per step, measured).
    process = subprocess.Popen([sys.executable, __file__, "--child", mode, *args], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
                                    "OMP_NUM_THREADS": "1"})
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise SystemExit(f"{mode} {args} failed (status {status}): {output[-2000:]}")
    result = json.loads(output.strip().splitlines()[-1])
    return {**result, "wall_s": round(time.perf_counter() - started, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_mb": round(usage.ru_maxrss / 1024)}


def run_child(mode: str, args: list[str]) -> None:
    """The measurement itself (in the child)."""
    import torch

    from vlmcache.align.config import TrainConfig
    from vlmcache.align.load import load_model
    from vlmcache.align.model import initial_model
    from vlmcache.align.train import train
    from vlmcache.cache.store import open_cache
    from vlmcache.cache.stream import embed_split
    from vlmcache.data.synthetic import write_synthetic_cache
    from vlmcache.metrics.retrieval import retrieval_metrics

    if mode == "write":
        out, train_images, val_images, captions = args[0], int(args[1]), int(args[2]), int(args[3])
        started = time.perf_counter()
        write_synthetic_cache(out, train_images, val_images=val_images, captions_per_image=captions, dim=512,
                              shard_size=SHARD, noise=NOISE)
        print(json.dumps({"seconds": time.perf_counter() - started}))
    elif mode == "train":
        cache, out, stream = args[0], args[1], args[2] == "stream"
        result = train(cache, out, TrainConfig(projector="linear", loss="infonce", epochs=1, batch_size=256, stream=stream),
                       overwrite=True)
        record = result.history[0]
        rows = open_cache(cache).manifest["dataset"]["splits"]["train"]["captions"]
        print(json.dumps({"rows": rows, "train_seconds": record["train_seconds"], "rows_per_s": rows / record["train_seconds"],
                          "val_mean_recall": record["val_mean_recall"], "epoch_seconds": record["seconds"]}))
    elif mode == "read":  # the streaming reader alone: how fast it can feed a faster trainer (a GPU)
        from vlmcache.cache.stream import ShardStream

        stream = ShardStream(open_cache(args[0]), "train", 4096, seed=0)
        started, rows, size = time.perf_counter(), 0, 0
        for batch in stream.epoch(0):
            rows, size = rows + len(batch.images), size + batch.images.numel() + batch.texts.numel()
        seconds = time.perf_counter() - started
        print(json.dumps({"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds,
                          "stored_mb_per_s": 2 * size / seconds / 2**20}))  # float16 on disk
    elif mode == "eval":
        checkpoint, cache = args
        # Ranking costs the same whatever the weights: without a run (--only eval) an untrained linear pair is used.
        model = (load_model(checkpoint)[0] if Path(checkpoint).exists()
                 else initial_model(TrainConfig(projector="linear"), 512, 512))
        started = time.perf_counter()
        opened = open_cache(cache)
        image_emb, text_emb, owner = embed_split(model, opened, "val")
        embedded = time.perf_counter() - started
        metrics = retrieval_metrics(image_emb, text_emb, owner)
        print(json.dumps({"images": len(image_emb), "captions": len(text_emb), "embed_seconds": embedded,
                          "seconds": time.perf_counter() - started, **metrics}))
    elif mode == "search":
        from vlmcache.app.predictor import Predictor

        checkpoint, cache = args
        started = time.perf_counter()
        predictor = Predictor(checkpoint)
        split, image_emb = predictor.searchable("train", cache)
        loaded = time.perf_counter() - started
        generator = torch.Generator().manual_seed(0)
        latencies = []
        for _ in range(50):
            query = torch.nn.functional.normalize(torch.randn(1, image_emb.shape[1], generator=generator), dim=-1)
            tick = time.perf_counter()
            best = torch.topk((query @ image_emb.T)[0], 5)
            [split.image_ids[i] for i in best.indices.tolist()]  # what a hit reports
            latencies.append(1000 * (time.perf_counter() - tick))
        latencies.sort()
        print(json.dumps({"images": len(image_emb), "load_seconds": loaded, "p50_ms": latencies[25],
                          "p90_ms": latencies[45], "max_ms": latencies[-1]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/vlmcache-scale"))
    parser.add_argument("--sizes", default="100000,1000000", help="training pairs per cache, comma-separated")
    parser.add_argument("--only", default="train,read,eval,search")
    parser.add_argument("--skip-in-memory", action="store_true", help="stream only (for N too large for memory)")
    parser.add_argument("--eval-images", type=int, default=100_000, help="eval split images (5 captions each)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the synthetic caches")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.child:
        run_child(args.child, rest)
        return
    only, report = set(args.only.split(",")), {}
    args.work.mkdir(parents=True, exist_ok=True)
    made = []

    def cache(name: str, train_images: int, val_images: int, captions: int) -> str:
        path = args.work / name
        if not (path / "manifest.json").exists() or json.loads((path / "manifest.json").read_text())["status"] != "complete":
            report[f"write {name}"] = child("write", [str(path), str(train_images), str(val_images), str(captions)])
            print(f"write {name}: {report[f'write {name}']}", flush=True)
            made.append(path)
        return str(path)

    sizes = [int(float(size)) for size in args.sizes.split(",")]
    checkpoint = str(args.work / f"run-stream-{min(sizes)}")
    for size in sizes if "train" in only else []:
        path = cache(f"train-{size}", size, VAL, 1)
        for how in ("memory", "stream"):
            if how == "memory" and args.skip_in_memory:
                continue
            key = f"train {size} {how}"
            report[key] = child("train", [path, str(args.work / f"run-{how}-{size}"), how])
            print(f"{key}: {report[key]}", flush=True)
    for size in sizes if "read" in only else []:
        report[f"read {size}"] = child("read", [cache(f"train-{size}", size, VAL, 1)])
        print(f"read {size}: {report[f'read {size}']}", flush=True)
    if "eval" in only:
        path = cache(f"eval-{args.eval_images}", 1000, args.eval_images, 5)
        report["eval"] = child("eval", [checkpoint, path])
        print(f"eval: {report['eval']}", flush=True)
    if "search" in only:
        report["search"] = child("search", [checkpoint, cache(f"train-{max(sizes)}", max(sizes), VAL, 1)])
        print(f"search: {report['search']}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        old = json.loads(args.json.read_text()) if args.json.exists() else {}
        args.json.write_text(json.dumps({**old, **report}, indent=2))
    if not args.keep:
        for path in made:
            shutil.rmtree(path)


if __name__ == "__main__":
    main()
