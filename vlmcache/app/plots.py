"""PNG plots: training curves from a run's metrics.jsonl, and the ablation as bars with error bars — or, for an
ablation with a capacity axis (`ablate --capacity`), as mean recall against trainable parameters per projector family.

matplotlib is an optional extra (`pip install 'vlmcache[plots]'`); it is imported only here.
"""

from __future__ import annotations

import json
from pathlib import Path

from vlmcache.errors import VlmcacheError
from vlmcache.files import atomic_write, check_writable, read_json_file, shape_error


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise VlmcacheError("plots need matplotlib: pip install 'vlmcache[plots]'") from None
    return plt


NUMBER = (int, float)
# The epoch records a plot draws (vlmcache.files.shape_error): a training run's and a captioning run's.
RUN_RECORD = {"epoch": int, "train_loss": NUMBER, "logit_scale": NUMBER,
              **{f"val_{key}": NUMBER for key in ("i2t_r1", "t2i_r1", "i2t_r10", "t2i_r10", "mean_recall")}}
CAPTION_RECORD = {"epoch": int, "train_loss": NUMBER, **{f"val_{key}": NUMBER for key in ("bleu1", "bleu4", "rouge_l",
                                                                                         "cider")}}
ABLATION = {"split": str, "rows": [{"cache": str, "encoders": str, "projector": str, "loss": str,
                                    "mean_recall": NUMBER, "mean_recall_std": NUMBER, "mean_recall_ci_low?": NUMBER,
                                    "mean_recall_ci_high?": NUMBER, "parameters?": int, "capacity?": int,
                                    "family?": str}]}
TRAINING_FREE = "—"  # the loss of the baseline rows (untrained, CCA, ASIF)


def save_figure(figure, out: Path) -> None:
    """Save a figure atomically, in the format its file name says (a full disk leaves no half image)."""
    with atomic_write(out) as temporary:
        figure.savefig(temporary, dpi=110, format=out.suffix.lstrip(".") or "png")


def read_metrics_log(log: Path) -> list[dict]:
    """The complete epoch records of a metrics.jsonl, all of the first record's kind (a training or a captioning
    run); a line cut short by a kill, not JSON, or without what a plot draws is skipped."""
    records, kind = [], None
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as error:
        raise VlmcacheError(f"{log}: cannot be read ({error.strerror}); pass a run folder written by vlmcache train") from None
    for line in lines:
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue
        shapes = [kind] if kind else [RUN_RECORD, CAPTION_RECORD]
        kind = next((shape for shape in shapes if not shape_error(record, shape)), kind)
        if kind is not None and not shape_error(record, kind):
            records.append(record)
    return records


def plot_training(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Loss, logit scale and validation recall per epoch from `run_dir/metrics.jsonl`; returns the PNG path."""
    run_dir = Path(run_dir)
    log = run_dir / "metrics.jsonl"
    if not log.exists():
        raise VlmcacheError(f"{log}: not found; pass a run folder written by vlmcache train")
    records = read_metrics_log(log)
    if not records:
        raise VlmcacheError(f"{log}: holds no complete epoch; train at least one epoch")
    if "val_cider" in records[0]:
        return plot_caption_training(run_dir, records, out)
    epochs = [r["epoch"] for r in records]
    plt = _pyplot()
    figure, (loss_ax, scale_ax, recall_ax) = plt.subplots(1, 3, figsize=(15, 4.2))
    loss_ax.plot(epochs, [r["train_loss"] for r in records], marker="o")
    loss_ax.set(title="training loss", xlabel="epoch", ylabel="loss (mean over steps)")
    scale_ax.plot(epochs, [r["logit_scale"] for r in records], marker="o", color="tab:orange")
    scale_ax.set(title="learned logit scale (1 / temperature)", xlabel="epoch", ylabel="scale")
    for key, label in (("val_i2t_r1", "image→text R@1"), ("val_t2i_r1", "text→image R@1"),
                       ("val_i2t_r10", "image→text R@10"), ("val_t2i_r10", "text→image R@10"),
                       ("val_mean_recall", "mean recall")):
        recall_ax.plot(epochs, [r[key] for r in records], marker=".", label=label,
                       linewidth=2.5 if key == "val_mean_recall" else 1.2)
    recall_ax.set(title="validation retrieval", xlabel="epoch", ylabel="recall (%)")
    recall_ax.legend(fontsize=8)
    for axis in (loss_ax, scale_ax, recall_ax):
        axis.grid(alpha=0.3)
    figure.suptitle(f"vlmcache run {run_dir}")
    figure.tight_layout()
    out = check_writable(Path(out) if out else run_dir / "training.png", "--out")
    save_figure(figure, out)
    plt.close(figure)
    return out


def plot_caption_training(run_dir: Path, records: list[dict], out: str | Path | None = None) -> Path:
    """A captioning run: training loss and validation BLEU-1..4 / ROUGE-L / CIDEr per epoch."""
    epochs = [r["epoch"] for r in records]
    plt = _pyplot()
    figure, (loss_ax, score_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    loss_ax.plot(epochs, [r["train_loss"] for r in records], marker="o")
    loss_ax.set(title="training loss", xlabel="epoch", ylabel="cross-entropy per token")
    for key, label in (("val_bleu1", "BLEU-1"), ("val_bleu4", "BLEU-4"), ("val_rouge_l", "ROUGE-L"),
                       ("val_cider", "CIDEr")):
        score_ax.plot(epochs, [r[key] for r in records], marker=".", label=label,
                      linewidth=2.5 if key == "val_cider" else 1.2)
    score_ax.set(title="validation captions (greedy; best epoch by CIDEr)", xlabel="epoch", ylabel="score ×100")
    score_ax.legend(fontsize=8)
    for axis in (loss_ax, score_ax):
        axis.grid(alpha=0.3)
    figure.suptitle(f"vlmcache captioning run {run_dir}")
    figure.tight_layout()
    out = Path(out) if out else run_dir / "training.png"
    save_figure(figure, out)
    plt.close(figure)
    return out


def plot_ablation(ablation_json: str | Path, out: str | Path | None = None) -> Path:
    """Mean recall per ablation row as bars with error bars: its 95% interval (images and seeds), or ±std over
    seeds for an ablation.json written before intervals; an ablation with a capacity axis is drawn by
    `plot_capacity` instead. Returns the PNG path."""
    path = Path(ablation_json)
    if path.is_dir():
        path = path / "ablation.json"
    if not path.exists():
        raise VlmcacheError(f"{path}: not found; run vlmcache ablate first")
    data = read_json_file(path, "ablation.json", "run vlmcache ablate again", shape=ABLATION)
    rows = data["rows"]
    if not rows:
        raise VlmcacheError(f"{path}: not a complete ablation.json (no rows); run vlmcache ablate again")
    out = check_writable(Path(out) if out else path.with_name("ablation.png"), "--out")
    if any("capacity" in row for row in rows):
        return plot_capacity(path, data, out)
    several = len({row["cache"] for row in rows}) > 1
    labels = [(f"{row['encoders'].split(' (')[0]}\n" if several else "") +
              (row["projector"] if row["loss"] == TRAINING_FREE else f"{row['projector']}\n{row['loss']}") for row in rows]
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(max(6.0, 1.1 * len(rows)), 4.8))
    colours = ["tab:blue" if row["loss"] == "infonce" else "tab:orange" if row["loss"] == "sigmoid" else "tab:gray"
               for row in rows]
    below, above, spread = error_bars(rows)
    axis.bar(range(len(rows)), [row["mean_recall"] for row in rows], yerr=[below, above], capsize=4, color=colours)
    for index, row in enumerate(rows):
        axis.text(index, row["mean_recall"] + above[index] + 0.5, f"{row['mean_recall']:.1f}", ha="center", fontsize=8)
    axis.set_xticks(range(len(rows)), labels, fontsize=8)
    axis.set(ylabel="mean recall (%), R@1/5/10 both ways",
             title=f"ablation on split {data['split']!r}: mean, {spread} (blue InfoNCE, orange sigmoid, grey "
                   "training-free)")
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    save_figure(figure, out)
    plt.close(figure)
    return out


def error_bars(rows: list[dict]) -> tuple[list[float], list[float], str]:
    """(below, above, what they are) of each row's mean recall: its 95% interval when every row has one, else
    ± std over seeds (an ablation.json written before intervals)."""
    if all("mean_recall_ci_low" in row and "mean_recall_ci_high" in row for row in rows):
        return ([row["mean_recall"] - row["mean_recall_ci_low"] for row in rows],
                [row["mean_recall_ci_high"] - row["mean_recall"] for row in rows], "95% interval (images and seeds)")
    return [row["mean_recall_std"] for row in rows], [row["mean_recall_std"] for row in rows], "± std over seeds"


def plot_capacity(path: Path, data: dict, out: Path) -> Path:
    """The Pareto picture of an ablation with a capacity axis: mean recall against trainable parameters (log x),
    one line per projector family (and loss, and encoders when there are several) through its capacity rows,
    each with its 95% interval as error bars; the training-free rows as horizontal lines."""
    rows = data["rows"]
    sized = [row for row in rows if "capacity" in row]
    bad = next((index for index, row in enumerate(rows) if "capacity" in row and (
        "family" not in row or row.get("parameters", 0) < 1)), None)
    if bad is not None:
        raise VlmcacheError(f"{path}: not a valid ablation.json (rows.{bad} has a capacity but no family or no "
                            "positive parameters); run vlmcache ablate again")
    several = len({row["encoders"] for row in rows}) > 1
    def named(row: dict, name: str) -> str:
        return f"{row['encoders'].split(' (')[0]}: {name}" if several else name

    lines: dict[str, list[dict]] = {}
    for row in sorted(sized, key=lambda row: row["parameters"]):
        lines.setdefault(named(row, f"{row['family']} ({row['loss']})"), []).append(row)
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(8.5, 5.2))
    spread = ""
    for label, members in lines.items():
        below, above, spread = error_bars(members)
        axis.errorbar([row["parameters"] for row in members], [row["mean_recall"] for row in members],
                      yerr=[below, above], marker="o", capsize=3, label=label)
    for row in rows:
        if row["loss"] == TRAINING_FREE:
            axis.axhline(row["mean_recall"], color="tab:gray", linestyle=":", linewidth=1)
            axis.annotate(named(row, row["projector"]), (0.01, row["mean_recall"]), xycoords=("axes fraction", "data"),
                          fontsize=7, color="tab:gray", va="bottom")
    axis.set_xscale("log")
    axis.set(xlabel="trainable parameters (image + text projector; log scale)",
             ylabel="mean recall (%), R@1/5/10 both ways",
             title=f"capacity ablation on split {data['split']!r}: mean, {spread}; dotted: training-free")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3, which="both")
    figure.tight_layout()
    save_figure(figure, out)
    plt.close(figure)
    return out
