"""Decoding levers on a trained captioner: greedy and beam search of several widths and length penalties,
scored on one split (BLEU-1..4, METEOR, ROUGE-L, CIDEr, ×100, all references), with CPU seconds per row.

    python benchmarks/caption_decoding.py runs/caption-bench --beams 1,3,5 --length-penalties 0,0.5,1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from caption import cpu_seconds  # benchmarks/caption.py (this folder is on the path when run as a script)
from rich.console import Console

from vlmcache.app.tables import caption_table
from vlmcache.cache.store import open_cache
from vlmcache.caption.data import load_split
from vlmcache.caption.decode import generate
from vlmcache.caption.model import load_captioner
from vlmcache.metrics.captions import score_captions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="captioning run folder (its best checkpoint)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--beams", default="1,3,5")
    parser.add_argument("--length-penalties", default="0,0.5,1")
    parser.add_argument("--meteor", action="store_true", help="also METEOR (a slow Java run per row)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    model, meta = load_captioner(args.run)
    data = load_split(open_cache(meta["cache"]), args.split, model.config.projector == "resampler")
    references = data.references()
    rows, seconds = {}, {}
    for beam in [int(b) for b in args.beams.split(",")]:
        for penalty in [0.0] if beam == 1 else [float(p) for p in args.length_penalties.split(",")]:
            name = "greedy" if beam == 1 else f"beam {beam}, length penalty {penalty:g}"
            started, cpu = time.perf_counter(), cpu_seconds()
            captions = generate(model, data.images, beam, length_penalty=penalty)
            seconds[name] = {"wall": time.perf_counter() - started, "cpu": cpu_seconds() - cpu}
            rows[name] = score_captions(captions, references, meteor=args.meteor) | {
                "mean_words": sum(len(c.split()) for c in captions) / len(captions)}
            Console().print(f"{name}: BLEU-4 {rows[name]['bleu4']:.1f}, CIDEr {rows[name]['cider']:.1f}, "
                            f"{rows[name]['mean_words']:.1f} words, decoding {seconds[name]['cpu']:.0f} CPU-s")
    Console(width=160).print(caption_table(f"{args.run} on split {args.split!r} (×100)", rows))
    if args.json:
        args.json.write_text(json.dumps({"run": str(args.run), "split": args.split, "captioning": rows,
                                         "decoding_seconds": seconds}, indent=2))


if __name__ == "__main__":
    main()
