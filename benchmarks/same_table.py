"""Are two ablation tables the same apart from timings? `python benchmarks/same_table.py A/ablation.json B/ablation.json`.

Compares every row's metrics and parameters, and every cell's metrics keyed by its config (cells finish
in any order when several run at once), on the keys both tables have (a newer table may add columns, such
as intervals, and a newer config may add options at their defaults). Used to show a refactor left the
numbers bit for bit as they were.
"""

from __future__ import annotations

import json
import sys

TIMINGS = {"seconds", "cpu_seconds"}
# What tells the cells of one grid apart (a newer config adds options at their defaults, e.g. select_on, log).
GRID = ("cache", "projector", "loss", "dim", "seed", "epochs", "image_features", "text_features", "tokens", "queries")


def untimed(record: dict) -> dict:
    return {key: value for key, value in record.items() if key not in TIMINGS}


def common(first, second):
    """`first` and `second` restricted to the keys both have, recursively (lists compared item by item)."""
    if isinstance(first, dict) and isinstance(second, dict):
        keys = first.keys() & second.keys()
        return {k: common(first[k], second[k])[0] for k in keys}, {k: common(first[k], second[k])[1] for k in keys}
    if isinstance(first, list | tuple) and isinstance(second, list | tuple) and len(first) == len(second):
        pairs = [common(a, b) for a, b in zip(first, second, strict=True)]
        return type(first)(a for a, _ in pairs), type(second)(b for _, b in pairs)
    return first, second


def table(path: str) -> tuple[list[dict], dict[str, dict]]:
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    cells = {cell.get("row") or json.dumps({k: cell.get(k, cell["config"].get(k)) for k in GRID}, sort_keys=True): untimed(cell)
             for cell in data["cells"]}
    return [untimed(row) for row in data["rows"]], cells


def main() -> None:
    first, second = common(table(sys.argv[1]), table(sys.argv[2]))
    same = first == second and len(first[1]) == len(table(sys.argv[1])[1])
    print(f"rows: {len(first[0])}, cells: {len(first[1])}; identical apart from timings: {same}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
