"""The rich tables vlmcache prints (and benchmarks reuse): retrieval reports with intervals, label rankings,
the ablation grid, linear-probe accuracy and caption metrics with intervals."""

from __future__ import annotations

from pathlib import Path

from rich.markup import escape
from rich.table import Table


def statistics_caption(resampled: str) -> str:
    """A table's caption explaining its intervals and marks; `resampled` names what the bootstrap draws."""
    return (f"± = half-width of the 95% interval (bootstrap over {resampled}); * = best; ≈ = not distinguishable "
            "from the best (paired bootstrap on the same images, Holm-corrected, 5%)")


STATISTICS_CAPTION = statistics_caption("the evaluated images, each with its captions, and over the seeds of a row "
                                        "that has several")


def report_table(report) -> Table:
    """An EvalReport as a table: every row with its 95% interval and its mark against the best row."""
    return metrics_table(f"retrieval on split {report.split!r} of {report.cache} (%); "
                          f"{selection_note(report.selected_on, report.split)}",
                          {name: {**row, **report.statistics.get(name, {})} for name, row in report.rows.items()})


def with_interval(row: dict, metric: str, digits: int = 1, spread: str = "_std") -> str:
    """'45.3 ±1.4' marked best (*, bold green) or not distinguishable from it (≈, green), from a row's
    <metric>_ci_low/_ci_high/_mark keys; rows without them (older files) show `spread` (± std over seeds)."""
    value = row[metric]
    if f"{metric}_ci_low" not in row:
        return f"{value:.{digits}f}" + (f" ± {row[metric + spread]:.{digits}f}" if metric + spread in row else "")
    half = (row[f"{metric}_ci_high"] - row[f"{metric}_ci_low"]) / 2
    text = f"{value:.{digits}f} ±{half:.{digits}f}"
    mark = row[f"{metric}_mark"]
    return f"[bold green]{text}*[/bold green]" if mark == "best" else f"[green]{text}≈[/green]" if mark == "tied" else text


def selection_note(selected_on: str, reported: str) -> str:
    """Where choices were made, for a table's title; flags selection on the reported split itself."""
    if selected_on == reported:
        return f"best epoch chosen on {selected_on!r} too (optimistic: --select-on train:1000 keeps them apart)"
    return f"best epoch chosen on {selected_on!r}"


def metrics_table(title: str, rows: dict[str, dict]) -> Table:
    from vlmcache.metrics.retrieval import MEDIAN_RANK_KEYS, MEDIAN_RANK_LABELS, RETRIEVAL_KEYS, RETRIEVAL_LABELS

    with_intervals = any("mean_recall_ci_low" in m for m in rows.values())
    table = Table(title=title, title_justify="left", caption=STATISTICS_CAPTION if with_intervals else None,
                  caption_justify="left")
    table.add_column("model", no_wrap=True)
    for column in (*RETRIEVAL_LABELS, *MEDIAN_RANK_LABELS):
        table.add_column(column, justify="right")
    for name, m in rows.items():
        table.add_row(escape(name), *(with_interval(m, key, 2 if key == "mean_recall" else 1) for key in RETRIEVAL_KEYS),
                      *(f"{m[key]:g}" for key in MEDIAN_RANK_KEYS))
    return table


def ranking_table(image: Path, rows: list, scale: float) -> Table:
    table = Table(title=f"{image}", caption=f"probability = softmax(cosine × {scale:.1f}, the learned logit scale)",
                  title_justify="left")
    for column, justify in (("rank", "right"), ("prompt", "left"), ("cosine", "right"), ("probability", "right")):
        table.add_column(column, justify=justify)
    for row in rows:
        table.add_row(str(row.rank), row.prompt, f"{row.cosine:.4f}", f"{100 * row.probability:.1f}%")
    return table


def ablation_table(rows: list[dict], split: str, selected_on: str | None = None) -> Table:
    """The ablation as a rich table: mean over seeds ± the half-width of its 95% interval, the best row per
    column and those not distinguishable from it marked (older ablation files: mean ± std, best in bold green).
    The title names the reported split and, when known, where each cell's best epoch was chosen; an ablation
    with --capacity has a target column beside the params trained."""
    with_intervals = all("mean_recall_ci_low" in row for row in rows)
    spread = "mean over seeds ± half-width of its 95% interval" if with_intervals else "mean ± std over seeds"
    selection = "" if selected_on is None else f"; {selection_note(selected_on, split)}"
    table = Table(title=f"ablation on split {split!r}: recall in %, {spread}{selection}", title_justify="left",
                  caption=STATISTICS_CAPTION if with_intervals else None, caption_justify="left")
    several_caches = len({row["encoders"] for row in rows}) > 1
    if several_caches:
        table.add_column("encoders")
    from vlmcache.align.ablate import tuned_text
    from vlmcache.metrics.retrieval import RETRIEVAL_KEYS as metric_names
    from vlmcache.metrics.retrieval import RETRIEVAL_LABELS

    sized = any("capacity" in row for row in rows)
    for column in ("projector", "loss", "dim"):
        table.add_column(column)
    tuned = any("tuned" in row for row in rows)
    if tuned:
        table.add_column("tuned (on the selection split)")
    for column in RETRIEVAL_LABELS:
        table.add_column(column, justify="right")
    if sized:
        table.add_column("target", justify="right")
    table.add_column("params", justify="right")
    table.add_column("s/run", justify="right")
    best = {metric: max(row[metric] for row in rows) for metric in metric_names}
    for row in rows:
        cells = [row["encoders"]] if several_caches else []
        # A capacity row: its family and knob, short (ablation.json's label, e.g.
        # ndlinear:ndlinear-layers=2:ndlinear-hidden=11x11, says the same but is too wide for the table).
        cells += [f"{row['family']} {knob_text(row['knob'])}" if "capacity" in row else row["projector"]]
        cells += [row["loss"], str(row["dim"])] + ([tuned_text(row)] if tuned else [])
        for metric in metric_names:
            if with_intervals:
                cells.append(with_interval(row, metric))
                continue
            text = f"{row[metric]:.1f} ± {row[metric + '_std']:.1f}"
            cells.append(f"[bold green]{text}[/bold green]" if row[metric] == best[metric] else text)
        cells += [short_count(row["capacity"]) if "capacity" in row else ""] if sized else []
        cells += [f"{row['parameters']:,}", f"{row['seconds']:.1f}"]
        table.add_row(*cells)
    return table


def probe_table(result) -> Table:
    """A ProbeResult as a table: accuracy with its 95% interval and mark against the best row (chance, a
    constant, and older results without intervals: the number alone)."""
    title = (f"linear probe on {result.cache}: {result.classes} classes, {result.train_images} train "
             f"({result.val_images} of them for choosing C) / {result.test_images} test images")
    with_intervals = any("top1_ci_low" in row for row in result.rows.values())
    caption = result.split_note + (f"\n{statistics_caption('the test images')}" if with_intervals else "")
    table = Table(title=title, caption=caption, title_justify="left", caption_justify="left")
    for column in ("features", "top-1 %", "mean per-class %", "C", "val top-1 %"):
        table.add_column(column, justify="left" if column == "features" else "right")
    for name, row in result.rows.items():
        table.add_row(escape(name), with_interval(row, "top1"), with_interval(row, "mean_per_class"),
                      "—" if row["C"] is None else f"{row['C']:g}",
                      "—" if row["val_top1"] is None else f"{row['val_top1']:.1f}")
    return table


def knob_text(knob: dict) -> str:
    """A capacity row's knob, short: {'rank': 8} -> 'rank 8', {'rank': None} -> 'full', {'mlp_hidden': 64} ->
    'hidden 64', {'ndlinear_layers': 2, 'ndlinear_hidden': [16, 16]} -> '2×16x16' (layers × hidden grid),
    {'ndlinear_layers': 1, 'ndlinear_hidden': None} -> '1 layer'."""
    if "ndlinear_layers" in knob:
        grid = knob.get("ndlinear_hidden")
        return f"{knob['ndlinear_layers']}×{'x'.join(map(str, grid))}" if grid else f"{knob['ndlinear_layers']} layer"
    return next((f"{key.split('_')[-1]} {value}" for key, value in knob.items() if value is not None), "full")


def short_count(count: int) -> str:
    """A parameter count as --capacity takes it: 2000000 -> '2M', 30000 -> '30k', 1500 -> '1.5k', 250 -> '250'
    (a count that does not round to one decimal of k or M stays whole: 1,234,567)."""
    for unit, size in (("M", 1_000_000), ("k", 1_000)):
        if count >= size and count % (size // 10) == 0:
            return f"{count / size:g}{unit}"
    return f"{count:,}"


def caption_table(title: str, rows: dict[str, dict]) -> Table:
    """Caption metrics per captioner, with each metric's 95% interval and mark where the rows have them."""
    from vlmcache.metrics.captions import METRIC_LABELS, METRICS

    with_intervals = any("cider_ci_low" in row for row in rows.values())
    table = Table(title=title, title_justify="left", caption_justify="left",
                  caption=statistics_caption("the evaluated images, each with all its references") if with_intervals
                  else None)
    table.add_column("captioner", no_wrap=True)
    for column in METRIC_LABELS:
        table.add_column(column, justify="right")
    for name, m in rows.items():
        table.add_row(escape(name), *("-" if m[key] is None else with_interval(m, key) for key in METRICS))
    return table
