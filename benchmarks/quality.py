"""Retrieval quality per recipe on a multi-set cache: which encoders, per-set standardisation, QB-Norm.

Each recipe is one `vlmcache train` run (linear + InfoNCE unless told otherwise) evaluated exactly as
`vlmcache eval` does it (dev split, plain and QB-Norm rows, bank = training queries), beside CCA on the same
features. The best epoch and QB-Norm's β are chosen on `--select-on` (default: 1,000 images carved out of
train, so nothing is chosen on the reported dev split; `--select-on val` is the old behaviour). Prints one
table and writes the numbers as JSON.

    vlmcache extract ../shared/data/flickr8k --out features/flickr8k-multi \
        --image-model efficientnet-lite0 --image-model efficientnet-lite2
    python benchmarks/quality.py --cache features/flickr8k-multi \
        --recipes efficientnet-lite0 efficientnet-lite2 efficientnet-lite0+efficientnet-lite2
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from vlmcache.align.config import TrainConfig
from vlmcache.align.inputs import trained_row
from vlmcache.align.train import train
from vlmcache.eval.evaluate import evaluate_checkpoint
from vlmcache.metrics.baselines import CCA_ROW
from vlmcache.metrics.qbnorm import QBNORM_SUFFIX


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path("features/flickr8k-multi"))
    parser.add_argument("--recipes", nargs="+", default=["efficientnet-lite0", "efficientnet-lite0+efficientnet-lite2"],
                        help="image feature-set combinations")
    parser.add_argument("--standardize", default="both", choices=("both", "on", "off"))
    parser.add_argument("--projector", default="linear")
    parser.add_argument("--loss", default="infonce")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--select-on", default="train:1000", help="where the best epoch and β are chosen")
    parser.add_argument("--text-features", default=None, help="text feature sets (default: the default set)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--no-baselines", action="store_true", help="skip CCA (and ASIF), which cost minutes")
    parser.add_argument("--json", type=Path, default=Path("runs/quality.json"))
    args = parser.parse_args()
    flags = {"both": (False, True), "on": (True,), "off": (False,)}[args.standardize]
    results = []
    for recipe in args.recipes:
        for standardize in flags:
            chosen = {"lr": args.lr} if args.lr is not None else {}
            config = TrainConfig(projector=args.projector, loss=args.loss, epochs=args.epochs, seed=args.seed,
                                 image_features=recipe, standardize=standardize, dim=args.dim,
                                 text_features=args.text_features,
                                 select_on=None if args.select_on == "val" else args.select_on, **chosen)
            with tempfile.TemporaryDirectory(prefix="vlmcache-quality-") as folder:
                started = time.perf_counter()
                trained = train(args.cache, folder, config)
                seconds = time.perf_counter() - started
                rows = evaluate_checkpoint(folder, with_baselines=not args.no_baselines).rows
            name = trained_row(config)
            missing = {"mean_recall": float("nan")}
            results.append({"image_features": recipe, "text_features": args.text_features, "standardize": standardize,
                            "select_on": args.select_on, "dim": args.dim, "lr": config.lr,
                            "train_seconds": seconds, "selection_mean_recall": trained.best_metrics["mean_recall"],
                            "best_epoch": trained.best_epoch, "plain": rows[name], "qbnorm": rows[name + QBNORM_SUFFIX],
                            "cca": rows.get(CCA_ROW, missing), "cca_qbnorm": rows.get(CCA_ROW + QBNORM_SUFFIX, missing)})
            print(json.dumps({k: v for k, v in results[-1].items() if k in ("image_features", "standardize")}),
                  f"selection {trained.best_metrics['mean_recall']:.2f}",
                  f"plain {rows[name]['mean_recall']:.2f}  QB-Norm {rows[name + QBNORM_SUFFIX]['mean_recall']:.2f}",
                  flush=True)
    table = Table(title=f"dev mean recall (%), {args.projector} + {args.loss}, {args.epochs} epochs, seed {args.seed}, "
                        f"selected on {args.select_on}; "
                        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    for column in ("image features", "standardize", f"{args.select_on} (selection)", "plain", "+ QB-Norm", "CCA",
                   "CCA + QB-Norm", "train s"):
        table.add_column(column)
    for r in results:
        table.add_row(r["image_features"], str(r["standardize"]), f"{r['selection_mean_recall']:.2f}",
                      f"{r['plain']['mean_recall']:.2f}",
                      f"{r['qbnorm']['mean_recall']:.2f} (β={r['qbnorm']['qbnorm_beta']:g})",
                      f"{r['cca']['mean_recall']:.2f}", f"{r['cca_qbnorm']['mean_recall']:.2f}", f"{r['train_seconds']:.1f}")
    Console(width=160).print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
