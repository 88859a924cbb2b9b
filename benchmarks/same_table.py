"""Are two ablation tables the same apart from timings? `python benchmarks/same_table.py A/ablation.json B/ablation.json`.

Compares every row's metrics and parameters, and every cell's metrics keyed by its config (cells finish
in any order when several run at once). Used to show a refactor left the numbers bit for bit as they were.
"""

from __future__ import annotations

import json
import sys

TIMINGS = {"seconds", "cpu_seconds"}


def untimed(record: dict) -> dict:
    return {key: value for key, value in record.items() if key not in TIMINGS}


def table(path: str) -> tuple[list[dict], dict[str, dict]]:
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    cells = {json.dumps(cell.get("config", cell.get("row")), sort_keys=True): untimed(cell) for cell in data["cells"]}
    return [untimed(row) for row in data["rows"]], cells


def main() -> None:
    first, second = table(sys.argv[1]), table(sys.argv[2])
    same = first == second
    print(f"rows: {len(first[0])}, cells: {len(first[1])}; identical apart from timings: {same}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
