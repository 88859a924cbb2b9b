"""Token-level projectors on the full Flickr8k token cache (issue 13): the ablation against the pooled
projectors, the cost of 20 epochs of the best token projector, token read throughput and cache size.

    vlmcache extract ../shared/data/flickr8k --out ../features/flickr8k-tokens --tokens --max-length 40
    nice python benchmarks/tokens.py ../features/flickr8k-tokens --out runs/bench-tokens

Parts (`--parts`, comma-separated; each writes <out>/<part>.json):
- size: bytes per image and per caption, measured from the shard files (token states vs pooled features);
- read: rows/s (per wall and per CPU second) of float32 token batches (256 rows) read from the HDF5 shards
  vs gathered from memory;
- ablate: one `vlmcache ablate` run (3 seeds, 20 epochs, InfoNCE, dev = split val) of the grid `--grid`;
  the ablation's cells are kept in <out>/ablation/cells, so an interrupted run resumes;
- cost: `vlmcache train` of `--cost-projector` for 20 epochs in a child process: wall and CPU seconds, peak RSS;
- stream: the same projector for `--stream-epochs` epochs in memory, with `--stream` (token states read
  from the shards a window at a time on a background thread; default 1.5 GiB window budget) and with
  `--stream --max-memory 3GB` (Flickr8k's whole train split in one window): pairs/s, CPU seconds, peak RSS.
Timings on a shared machine are under contention: the CPU seconds are beside the wall seconds for that.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np

from vlmcache import open_cache
from vlmcache.align.ablate import ablate, projector_spec
from vlmcache.cache.tokens import token_batch

GRID = ("linear,mlp,cross-attention,cross-attention:queries=4,ndlinear:tokens,resampler:queries=4:resampler-depth=1,"
        "cross-attention:text-tokens")
BATCH = 256


def measure_size(cache) -> dict:
    """Stored bytes per row of each dataset of the default sets (HDF5 storage sizes, checksums included)."""
    result = {}
    for modality in ("images", "texts"):
        chosen, per_dataset = cache.feature_set(modality), {}
        for entry in chosen.shards:
            with h5py.File(cache.path / chosen.folder / entry["file"], "r") as shard:
                for name, dataset in shard.items():
                    per_dataset[name] = per_dataset.get(name, 0) + dataset.id.get_storage_size()
        rows = sum(entry["rows"] for entry in chosen.shards)
        files = sum((cache.path / chosen.folder / entry["file"]).stat().st_size for entry in chosen.shards)
        result[modality] = {"rows": rows, "file_bytes_per_row": files / rows,
                            **{f"{name}_bytes_per_row": size / rows for name, size in per_dataset.items()}}
    return result


def measure_read(cache, seconds: float = 20.0) -> dict:
    """Rows/s of float32 image-token batches: straight from the shards (contiguous 256-row slices, shards in
    random order) vs gathered at random from the split held in memory (fp16, as training holds it)."""
    rng = np.random.default_rng(0)
    chosen = cache.feature_set("images")
    rows, started, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - started < seconds:
        for index in rng.permutation(len(chosen.shards)):
            entry = chosen.shards[index]
            with h5py.File(cache.path / chosen.folder / entry["file"], "r") as shard:
                for start in range(0, entry["rows"], BATCH):
                    shard["tokens"][start:start + BATCH].astype(np.float32)
                    rows += min(BATCH, entry["rows"] - start)
            if time.perf_counter() - started >= seconds:
                break
    hdf5, hdf5_cpu = rows / (time.perf_counter() - started), rows / (time.process_time() - cpu)
    loading = time.perf_counter()
    split = cache.split("train", image_tokens=True)
    load_seconds = time.perf_counter() - loading
    rows, started, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - started < seconds:
        token_batch(split.image_tokens, split.image_token_mask, rng.integers(0, len(split.image_tokens), BATCH))
        rows += BATCH
    memory, memory_cpu = rows / (time.perf_counter() - started), rows / (time.process_time() - cpu)
    return {"hdf5_rows_per_s": hdf5, "memory_rows_per_s": memory, "load_train_split_s": load_seconds,
            "hdf5_rows_per_cpu_s": hdf5_cpu, "memory_rows_per_cpu_s": memory_cpu,
            "train_token_bytes_in_memory": int(split.image_tokens.nbytes), "batch": BATCH}


def measure_cost(cache: Path, spec: str, out: Path, epochs: int, threads: int | None, *extra: str) -> dict:
    """`epochs` epochs of one projector (+ `extra` train options) through the CLI in a child process: wall and
    CPU seconds, peak RSS, training pairs/s."""
    options = projector_spec(spec)
    args = [sys.executable, "-m", "vlmcache", "train", str(cache), "--projector", options.pop("projector"),
            "--epochs", str(epochs), "--out", str(out), "--overwrite", *extra]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    started = time.perf_counter()
    env = {**os.environ, "COLUMNS": "200", **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    # os.wait4: this child's own peak RSS (RUSAGE_CHILDREN's ru_maxrss is the largest of all children so far)
    _, status, usage = os.wait4(subprocess.Popen(args, stdout=subprocess.DEVNULL, env=env).pid, 0)
    if status:
        raise SystemExit(f"{' '.join(args)} failed (status {status})")
    wall = time.perf_counter() - started
    best = json.loads((out / "best.json").read_text())
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    pairs = open_cache(cache).manifest["dataset"]["splits"]["train"]["images"]  # one caption per image and epoch
    return {"projector": spec, "epochs": epochs, "threads": threads, "wall_s": wall,
            "train_pairs_per_s": pairs * len(history) / sum(record["train_seconds"] for record in history),
            "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_gb": usage.ru_maxrss / 1024 ** 2,
            "best_epoch": best["best_epoch"],
            "mean_recall": best["best_metrics"]["mean_recall"], "command": " ".join(args[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cache", type=Path, nargs="?", default=Path("../features/flickr8k-tokens"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench-tokens"))
    parser.add_argument("--parts", default="size,read,ablate,cost")
    parser.add_argument("--grid", default=GRID, help="ablate --projectors entries")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--cost-projector", default="cross-attention:queries=4")
    parser.add_argument("--stream-epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per run [default: cores / jobs]; 1 is faster on a busy machine")
    args = parser.parse_args()
    cache = open_cache(args.cache)
    args.out.mkdir(parents=True, exist_ok=True)
    parts = args.parts.split(",")

    def keep(part: str, result: dict) -> None:
        (args.out / f"{part}.json").write_text(json.dumps(result, indent=2))
        print(part, json.dumps(result, indent=2), flush=True)

    if "size" in parts:
        keep("size", measure_size(cache))
    if "read" in parts:
        keep("read", measure_read(cache))
    if "ablate" in parts:
        started, cpu = time.perf_counter(), time.process_time()
        result = ablate([args.cache], args.out / "ablation", projectors=tuple(args.grid.split(",")),
                        losses=("infonce",), seeds=tuple(int(s) for s in args.seeds.split(",")), epochs=args.epochs,
                        jobs=args.jobs, progress=False, threads=args.threads)
        keep("ablate", {"split": result.split, "wall_s": time.perf_counter() - started,
                        "cpu_s_this_process": time.process_time() - cpu,
                        "rows": [{key: row[key] for key in ("projector", "mean_recall", "mean_recall_std", "i2t_r1",
                                                            "t2i_r1", "parameters", "seconds", "seeds")
                                  if key in row} | {"cpu_seconds": row.get("cpu_seconds")}
                                 for row in result.rows]})
    if "cost" in parts:
        keep("cost", measure_cost(args.cache, args.cost_projector, args.out / "cost-run", args.epochs, args.threads))
    if "stream" in parts:
        keep("stream", {how: measure_cost(args.cache, args.cost_projector, args.out / f"stream-{how}", args.stream_epochs,
                                          args.threads, *extra) for how, extra in (("memory", ()), ("stream", ("--stream",)),
                                                                   ("stream-3GB", ("--stream", "--max-memory", "3GB")))})


if __name__ == "__main__":
    main()
