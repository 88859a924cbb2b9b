"""Full `vlmcache extract` of a dataset with one image encoder: images/s of the image pass, and the
machine's load average sampled during it (the CPU may be shared; read the rate with the load beside it).

    python benchmarks/extract_full.py --model efficientnet-lite2 --out features/flickr8k-lite2-bench
"""

from __future__ import annotations

import argparse
import json
import os
import threading
from pathlib import Path

from vlmcache.encode.extract import extract

FLICKR = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=FLICKR)
    parser.add_argument("--model", default="efficientnet-lite2")
    parser.add_argument("--out", type=Path, required=True, help="a new cache folder (an existing one is resumed)")
    parser.add_argument("--limit", type=int, default=None, help="images per split (default: all)")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    loads, done = [], threading.Event()

    def sample() -> None:
        while not done.wait(10.0):
            loads.append(os.getloadavg()[0])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    result = extract(args.data, args.out, image_model=args.model, limit=args.limit)
    done.set()
    numbers = {"model": args.model, "images": result.images, "image_seconds": result.image_seconds,
               "images_per_second": result.images / result.image_seconds if result.image_seconds else None,
               "load_average_mean": sum(loads) / len(loads) if loads else None,
               "load_average_max": max(loads, default=None), "cores": os.cpu_count(),
               "shards_reused": result.shards_reused}
    print(json.dumps(numbers, indent=1))
    if args.json:
        args.json.write_text(json.dumps(numbers, indent=1))


if __name__ == "__main__":
    main()
