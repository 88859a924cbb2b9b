"""Interactive latency: `--help`, argument errors, one-off `vlmcache search`, and the web page's queries.

Builds (once) a small Flickr8k cache and a 3-epoch run, then measures end to end, as a user sees it:
- `vlmcache --help` and an argument error (a subprocess each; targets ≤ 0.5 s);
- a one-off `vlmcache search RUN "<new query>"` and the same query again (target ≤ 3 s), answered from the
  run's search index that `vlmcache train` wrote; and, for comparison, the first search of a split without
  an index (PyTorch path, which then writes the index);
- in `serve` (the Starlette app, driven in-process after start-up): a new text query, a repeated one,
  a new set of 5 labels for an uploaded image and a repeated set (targets: new ≤ 100 ms p50, repeated
  ≤ 30 ms p50).

    python benchmarks/latency.py [--data ../shared/data/flickr8k] [--work features/bench-latency]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

from rich.console import Console
from rich.table import Table

from vlmcache.app.search_index import FOLDER

VLMCACHE = [sys.executable, "-m", "vlmcache"]


def wall(command: list[str]) -> float:
    """Seconds a subprocess takes, start to exit."""
    started = time.perf_counter()
    subprocess.run(command, capture_output=True, check=False)
    return time.perf_counter() - started


def timed(call, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of call(i)."""
    seconds = []
    for number in range(repeats):
        started = time.perf_counter()
        call(number)
        seconds.append(time.perf_counter() - started)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/flickr8k"))
    parser.add_argument("--work", type=Path, default=Path("features/bench-latency"))
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    cache, run = args.work / "cache", args.work / "run"
    if not (run / "best.safetensors").exists():
        subprocess.run([*VLMCACHE, "extract", str(args.data), "--out", str(cache), "--limit", "300"], check=True)
        subprocess.run([*VLMCACHE, "train", str(cache), "--out", str(run), "--epochs", "3", "--overwrite"], check=True)

    rows = []
    rows.append(("vlmcache --help", [wall([*VLMCACHE, "--help"]) for _ in range(15)], 0.5))
    rows.append(("argument error (train --epochs x)", [wall([*VLMCACHE, "train", "x", "--epochs", "x"]) for _ in range(15)], 0.5))
    wall([*VLMCACHE, "search", str(run), "warm-up"])  # a run trained before the index existed gets one here
    queries = [f"a photo of {uuid.uuid4().hex[:8]} on a beach" for _ in range(5)]
    rows.append(("one-off search, new query", [wall([*VLMCACHE, "search", str(run), q]) for q in queries], 3.0))
    rows.append(("one-off search, repeated query", [wall([*VLMCACHE, "search", str(run), queries[0]]) for _ in range(5)], 3.0))
    # A split searched for the first time has no index yet: that search takes the PyTorch path and writes one.
    shutil.rmtree(run / FOLDER, ignore_errors=True)
    rows.append(("one-off search, first of a split (writes the index)",
                 [wall([*VLMCACHE, "search", str(run), queries[1]])], None))

    from starlette.testclient import TestClient

    from vlmcache.app.serve import create_app
    from vlmcache.cache.store import open_cache

    started = time.perf_counter()
    client = TestClient(create_app(run))
    startup = time.perf_counter() - started
    image = Path(open_cache(cache).split("val").image_paths[0]).read_bytes()

    def search(text: str) -> None:
        assert client.get("/search", params={"q": text, "top": 8}).status_code == 200

    def classify(labels: str) -> None:
        reply = client.post("/classify", files={"image": ("photo.jpg", image, "image/jpeg")}, data={"labels": labels})
        assert reply.status_code == 200, reply.text

    search("warm-up query")
    classify("warm, up")
    nonce = uuid.uuid4().hex[:6]
    rows.append(("serve: new text query", timed(lambda i: search(f"a {nonce} dog number {i} runs"), args.repeats), 0.1))
    rows.append(("serve: repeated text query", timed(lambda i: search("a dog runs on the grass"), args.repeats), 0.03))
    words = ("a dog", "a cat", "a car", "a man", "a boat")
    rows.append(("serve: new set of 5 labels (+ image)",
                 timed(lambda i: classify(",".join(f"{word} {nonce}{i}" for word in words)), args.repeats), 0.1))
    rows.append(("serve: repeated set of 5 labels (+ image)",
                 timed(lambda i: classify("a dog,a cat,a car,a man,a boat"), args.repeats), 0.03))

    table = Table(title=f"interactive latency (serve start-up {startup:.1f} s)", title_justify="left")
    for column in ("what", "p50", "p90 / max", "target", "met"):
        table.add_column(column, justify="left" if column == "what" else "right")
    for name, seconds, target in rows:
        p50 = statistics.median(seconds)
        tail = sorted(seconds)[int(0.9 * (len(seconds) - 1))] if len(seconds) >= 10 else max(seconds)
        table.add_row(name, f"{1000 * p50:.0f} ms", f"{1000 * tail:.0f} ms",
                      "—" if target is None else f"≤ {1000 * target:.0f} ms",
                      "—" if target is None else "yes" if p50 <= target else "NO")
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
