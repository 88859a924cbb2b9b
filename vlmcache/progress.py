"""Rich progress bars shared by the long-running steps (extract, ablate)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

console = Console(stderr=True)


class RateColumn(ProgressColumn):
    """Items per second, from rich's own speed estimate; the unit comes from the task's `unit` field."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "it")
        return Text(f"{speed:,.1f} {unit}/s" if speed else f"- {unit}/s", style="progress.data.speed")


@contextmanager
def make_progress(enabled: bool = True) -> Iterator[Progress]:
    """A progress display with count, rate and ETA; `enabled=False` gives a silent one (for library use).

    A step that fails takes its bars with it: its error is then the one line left on stderr (without this, a
    log or pipe would also get the bars' last state, which rich prints when they stop)."""
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
                        TimeRemainingColumn(), console=console, disable=not enabled)
    progress.start()
    try:
        yield progress
    except BaseException:
        console.quiet = True  # stopping draws nothing, not even the line break that ends a live display
        try:
            progress.stop()
        finally:
            console.quiet = False
        raise
    progress.stop()
