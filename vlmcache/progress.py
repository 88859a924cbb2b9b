"""Rich progress bars shared by the long-running steps (extract, ablate, export).

The bars are drawn live on stderr and leave nothing there: stderr is where a failure's one line goes, and a
bar's last frame above it (rich prints one when stderr is not a terminal) made that two lines. A step that
finishes prints its last frame on stdout instead, with the command's other results; one that fails prints none.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

console = Console(stderr=True)
results = Console()  # stdout


class RateColumn(ProgressColumn):
    """Items per second, from rich's own speed estimate; the unit comes from the task's `unit` field."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "it")
        return Text(f"{speed:,.1f} {unit}/s" if speed else f"- {unit}/s", style="progress.data.speed")


class StepProgress(Progress):
    """A rich Progress drawn live only on an interactive stderr, erased from it when it stops, and reprinted
    on stdout (its last frame) when the step succeeded; see the module docstring."""

    def __init__(self, *columns: ProgressColumn | str, enabled: bool = True):
        # Off a terminal nothing is drawn: rich would end with the last frame and a blank line on stderr.
        super().__init__(*columns, console=console, transient=True, disable=not (enabled and console.is_interactive))
        self.enabled = enabled

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        super().__exit__(exc_type, exc_value, traceback)
        if exc_type is None and self.enabled and self.tasks:
            results.print(self.get_renderable())


def make_progress(enabled: bool = True) -> Progress:
    """A progress display with count, rate and ETA; `enabled=False` gives a silent one (for library use)."""
    return StepProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
                        TimeRemainingColumn(), enabled=enabled)
