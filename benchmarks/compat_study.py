"""Does a compatibility score predict the trained result? Rank correlation on real Flickr8k.

    python benchmarks/compat_study.py --data ../shared/data/flickr8k --work features/compat-study \
        --train 2000 --select 500 --json runs/compat-study.json

1. A Flickr8k-layout folder (symlinks) is carved from the shared data: `--select` images drawn (seed 0)
   from the training list become a *selection* split (stored as the cache's "test" split), the next
   `--train` images the training split, and the 1,000 dev images stay the reporting split ("val").
2. One cache holds every offline encoder at several layers (`--image-layers`, `--text-layers`), extracted
   with `vlmcache extract --layers` (resumable: a rerun computes only what is missing).
3. `vlmcache compat` scores every (image set, text set) pair on the training split (singles only).
4. Every pair is trained (linear + InfoNCE, the train defaults); its best epoch is chosen on the selection
   split — never on dev — and that checkpoint's mean recall on dev is reported. Results are kept per pair
   under WORK/results/, so an interrupted study resumes.
5. For each score: Spearman's ρ with dev mean recall over the pairs, a 95% interval by bootstrap over pairs
   (2,000 resamples, seed 0) and by Fisher's z (standard error 1.06/sqrt(n−3)), and whether the
   best-scored pair is the best trained one.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt", "test": "Flickr_8k.testImages.txt"}


def carve(data: Path, out: Path, train: int, select: int) -> Path:
    """The study's dataset folder: train / selection ("test") carved from the training list, dev as val."""
    if (out / "Flickr8k.token.txt").exists():
        return out
    names = (data / SPLIT_FILES["train"]).read_text().split()
    random.Random(0).shuffle(names)
    splits = {"test": names[:select], "train": names[select:select + train],
              "val": (data / SPLIT_FILES["val"]).read_text().split()}
    (out / "Images").mkdir(parents=True)
    for split, chosen in splits.items():
        (out / SPLIT_FILES[split]).write_text("\n".join(chosen) + "\n")
        for name in chosen:
            (out / "Images" / name).symlink_to((data / "Images" / name).resolve())
    wanted = {name for chosen in splits.values() for name in chosen}
    lines = [line for line in (data / "Flickr8k.token.txt").read_text(encoding="utf-8").splitlines()
             if line.split("#")[0] in wanted]
    (out / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def train_pair(cache: Path, image: str, text: str, results: Path, epochs: int) -> dict:
    """Train one pair (selection split for the best epoch) and report its dev metrics; cached as JSON."""
    from vlmcache.align.config import TrainConfig
    from vlmcache.align.inputs import evaluate_model
    from vlmcache.align.load import load_model
    from vlmcache.align.train import train
    from vlmcache.cache.store import load_features, open_cache

    path = results / f"{image}__{text}.json".replace(":", "-")
    if path.exists():
        return json.loads(path.read_text())
    config = TrainConfig(projector="linear", loss="infonce", epochs=epochs, image_features=image, text_features=text,
                         val_split="test")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="compat-study-") as folder:
        result = train(cache, folder, config)
        model, _ = load_model(Path(folder) / "best.safetensors")
        dev = evaluate_model(model, load_features(open_cache(cache), "val", None, config.image_sets, config.text_sets))
    record = {"image_features": image, "text_features": text, "best_epoch": result.best_epoch,
              "selection_mean_recall": result.best_metrics["mean_recall"], "dev": dev,
              "seconds": time.perf_counter() - started}
    results.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    return record


def correlation(scores: np.ndarray, recall: np.ndarray, resamples: int = 2000) -> dict:
    """Spearman's ρ with a bootstrap (over pairs) and a Fisher-z 95% interval."""
    rho = float(spearmanr(scores, recall).statistic)
    rng = np.random.default_rng(0)
    draws = []
    for _ in range(resamples):
        picked = rng.integers(0, len(scores), len(scores))
        if len(set(picked)) > 2:
            value = spearmanr(scores[picked], recall[picked]).statistic
            if np.isfinite(value):
                draws.append(value)
    z, se = np.arctanh(np.clip(rho, -0.999999, 0.999999)), 1.06 / np.sqrt(len(scores) - 3)
    return {"spearman": rho, "bootstrap_95": [float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))],
            "fisher_95": [float(np.tanh(z - 1.96 * se)), float(np.tanh(z + 1.96 * se))], "pairs": len(scores)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/flickr8k"))
    parser.add_argument("--work", type=Path, default=Path("features/compat-study"))
    parser.add_argument("--train", type=int, default=2000, help="Training images (the rest of train is unused).")
    parser.add_argument("--select", type=int, default=500, help="Images carved from train to choose the best epoch.")
    parser.add_argument("--image-models", default="efficientnet-lite0,efficientnet-lite1,efficientnet-lite2")
    parser.add_argument("--image-layers", default="-2,-4")
    parser.add_argument("--text-layers", default="-2,-3")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--json", type=Path, default=Path("runs/compat-study.json"))
    args = parser.parse_args()
    from vlmcache.encode.extract import extract
    from vlmcache.eval.compat import compat
    from vlmcache.metrics.compat import SCORES

    data = carve(args.data, args.work / "data", args.train, args.select)
    cache = args.work / "cache"
    models = args.image_models.split(",")
    started = time.perf_counter()
    extract(data, cache, image_model=models[0], extra_image_models=tuple(models[1:]), progress=False,
            image_layers=tuple(args.image_layers.split(",")), text_layers=tuple(args.text_layers.split(",")))
    extract_seconds = time.perf_counter() - started
    scored = compat(cache, "train", combine=1)
    print(f"compat: {len(scored.scores)} pairs in {scored.seconds:.1f} s", flush=True)
    pairs = []
    for score in scored.scores:
        record = train_pair(cache, score.image_features, score.text_set, args.work / "results", args.epochs)
        pairs.append({**record, **{name: score.score(name) for name in SCORES}})
        print(f"{score.image_features} + {score.text_set}: dev mean recall {record['dev']['mean_recall']:.2f} "
              f"(cka {score.cka:.3f}, debiased {score.cka_debiased:.3f}, mknn {score.mutual_knn:.3f})", flush=True)
    recall = np.array([p["dev"]["mean_recall"] for p in pairs])
    best = int(np.argmax(recall))
    summary = {}
    for name in SCORES:
        values = np.array([p[name] for p in pairs])
        top = int(np.argmax(values))
        summary[name] = {**correlation(values, recall), "top_pair": f"{pairs[top]['image_features']} + "
                         f"{pairs[top]['text_features']}", "top_pair_recall": float(recall[top])}
    report = {"train_images": args.train, "selection_images": args.select, "dev_images": 1000, "epochs": args.epochs,
              "extract_seconds": extract_seconds, "compat_seconds": scored.seconds, "compat_rows": scored.rows,
              "best_pair": f"{pairs[best]['image_features']} + {pairs[best]['text_features']}",
              "best_recall": float(recall[best]), "scores": summary, "pairs": pairs, "cpus": os.cpu_count()}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    for name, row in summary.items():
        low, high = row["bootstrap_95"]
        print(f"{name}: Spearman {row['spearman']:.2f} (bootstrap 95% {low:.2f}..{high:.2f}, "
              f"Fisher {row['fisher_95'][0]:.2f}..{row['fisher_95'][1]:.2f}); its top pair {row['top_pair']} "
              f"{row['top_pair_recall']:.2f} vs best {report['best_pair']} {report['best_recall']:.2f}")


if __name__ == "__main__":
    main()
