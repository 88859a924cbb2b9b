"""Capacity as an ablation axis: every projector family trained at matched trainable-parameter counts.

`ablate --capacity 2k,30k,400k,2M` gives each pooled projector family the value of its size knob (KNOBS in
vlmcache.align.config) whose model — image and text projector together — has the trainable-parameter count closest
to each target:

- linear: a rank-r bottleneck, for the ranks whose bottleneck has fewer parameters than the full Linear (a wider
  one has more and maps nothing more), or the full Linear itself;
- mlp: the hidden width, 1 to MAX_WIDTH;
- ndlinear: the single NdLinear layer (its size is fixed by the grids), or 2 to MAX_ND_LAYERS stacked layers
  through a square h×h hidden grid, h ≤ MAX_ND_SIDE (a compute bound, see there).

No knob value goes past MAX_PARAMETERS, the most a run trains. Counts are what a run reports
(AlignmentModel.projector_parameters, counted on the meta device), so the matched count is the trained count by
construction. A family whose closest count is more than TOLERANCE away from a target does not reach it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from fractions import Fraction

from vlmcache.align.config import KNOBS, MAX_WIDTH, TrainConfig
from vlmcache.align.model import MAX_PARAMETERS, model_parameters
from vlmcache.errors import VlmcacheError

TOLERANCE = Fraction(1, 4)  # a count within ±25% of the target reaches it (exact: compared as fractions)
WITHIN = f"±{float(TOLERANCE):.0%}"
MAX_ND_LAYERS = 4  # deeper plain stacks (no normalisation, no residual) are another architecture than the paper's
# Square hidden grids up to 64×64 (4,096 cells, 3.2× a 1,280-d input): NdLinear's parameters grow as h² but its
# compute as h³ per layer, so at 400k parameters (4 layers of 212×212) one cell of a full Flickr8k grid would take
# over an hour on a CPU. `--ndlinear-hidden` itself allows up to MAX_GRID_CELLS; the size search stops here.
MAX_ND_SIDE = 64
SUFFIXES = {"": 1, "k": 1_000, "m": 1_000_000}  # parameter counts are decimal: 2k = 2,000
# Each family's knob values, for the reason a target is out of its reach.
LIMITS = {"linear": "rank 1 up to the full Linear", "mlp": f"hidden width 1 to {MAX_WIDTH:,}",
          "ndlinear": f"one layer, or 2 to {MAX_ND_LAYERS} through a hidden grid of 1x1 to {MAX_ND_SIDE}x{MAX_ND_SIDE}"}
HINT = "give trainable-parameter counts, comma-separated, e.g. 2k,30k,400k,2M"


def parse_capacity(value: str | Sequence[int]) -> tuple[int, ...]:
    """'2k,30k,400k,2M' (or a list of integers, from TOML or Python) -> (2000, 30000, 400000, 2000000): each target
    once, smallest first. Anything else (empty, not a count, zero or negative, a fraction) is refused naming the
    option."""
    shown = (",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)) or "''"
    targets = set()
    for token in value if isinstance(value, list | tuple) else str(value).split(","):
        if isinstance(token, str) and not token.strip():
            continue  # '2k,,30k' or a trailing comma, as the other comma-separated options read them
        if isinstance(token, int) and not isinstance(token, bool):
            number = Fraction(token)
        else:
            match = re.fullmatch(r"\s*([+-]?\d+(?:\.\d+)?)\s*([km]?)\s*", str(token), re.ASCII | re.IGNORECASE)
            if match is None:
                raise VlmcacheError(f"--capacity {shown}: {str(token).strip()!r} is not a count; {HINT}")
            number = Fraction(match[1]) * SUFFIXES[match[2].lower()]
        if number <= 0 or number.denominator != 1:
            raise VlmcacheError(f"--capacity {shown}: {str(token).strip()} must be a positive whole number of parameters")
        targets.add(int(number))
    if not targets:
        raise VlmcacheError(f"--capacity {shown}: no values; {HINT}")
    return tuple(sorted(targets))


def reaches(parameters: int, target: int) -> bool:
    """Whether a model of `parameters` counts as `target`'s size (within TOLERANCE)."""
    return abs(parameters - target) <= TOLERANCE * target


def reachable(lowest: int, highest: int) -> tuple[int, int]:
    """The targets models of `lowest` to `highest` parameters can reach within TOLERANCE, as (first, last)."""
    return math.ceil(lowest / (1 + TOLERANCE)), math.floor(highest / (1 - TOLERANCE))


@dataclass(frozen=True)
class Ladder:
    """Knob values along which the parameter count never falls: index low..high -> the options it sets."""

    knob: Callable[[int], dict]
    low: int
    high: int


@dataclass(frozen=True)
class Sized:
    """A family's closest model to one target: the knob options it sets and its trainable-parameter count."""

    target: int
    knob: dict
    parameters: int

    @property
    def reached(self) -> bool:
        return reaches(self.parameters, self.target)


def _first_at_least(count: Callable[[int], int], low: int, high: int, target: int) -> int:
    """The smallest index in low..high whose count is ≥ target (high + 1 if none), for a count that never falls."""
    while low <= high:
        middle = (low + high) // 2
        if count(middle) < target:
            low = middle + 1
        else:
            high = middle - 1
    return low


class Sizer:
    """The size knob of one projector family of one grid cell (its config, its input widths): the model's count at
    any knob value (memoised), the ladders of knob values to search, and the closest model to a target."""

    def __init__(self, config: TrainConfig, image_dim: int, text_dim: int):
        if config.projector not in KNOBS:
            raise ValueError(f"{config.projector} has no size knob")
        self.config, self.dims, self.counts = config, (image_dim, text_dim), {}
        # Each ladder stops before the models training refuses as too large (MAX_PARAMETERS; wide inputs reach it).
        self.ladders = [replace(ladder, high=_first_at_least(lambda index, ladder=ladder: self._at(ladder, index),
                                                             ladder.low, ladder.high, MAX_PARAMETERS + 1) - 1)
                        for ladder in self._ladders()]
        # A ladder may be empty: e.g. when no rank has fewer parameters than the full Linear.
        self.ladders = [ladder for ladder in self.ladders if ladder.low <= ladder.high]
        if not self.ladders:
            raise VlmcacheError(f"--capacity: every {config.projector} on these {image_dim}-d and {text_dim}-d inputs "
                                f"has more than {MAX_PARAMETERS:,} parameters")

    def count(self, knob: dict) -> int:
        """Trainable parameters of the model with these knob options."""
        key = tuple(sorted(knob.items()))
        if key not in self.counts:
            self.counts[key] = model_parameters(replace(self.config, **knob), *self.dims)
        return self.counts[key]

    def _ladders(self) -> list[Ladder]:
        family = self.config.projector
        if family == "mlp":
            return [Ladder(lambda width: {"mlp_hidden": width}, 1, MAX_WIDTH)]
        if family == "ndlinear":
            return [Ladder(lambda _: {"ndlinear_layers": 1, "ndlinear_hidden": None}, 0, 0),
                    *(Ladder(lambda side, layers=layers: {"ndlinear_layers": layers, "ndlinear_hidden": (side, side)},
                             1, MAX_ND_SIDE) for layers in range(2, MAX_ND_LAYERS + 1))]
        full = self.count({"rank": None})
        widest = _first_at_least(lambda rank: self.count({"rank": rank}), 1, MAX_WIDTH, full) - 1
        return [Ladder(lambda rank: {"rank": rank}, 1, widest), Ladder(lambda _: {"rank": None}, 0, 0)]

    def _at(self, ladder: Ladder, index: int) -> int:
        return self.count(ladder.knob(index))

    def span(self) -> tuple[int, int]:
        """The fewest and the most parameters this family has here."""
        return (min(self._at(ladder, ladder.low) for ladder in self.ladders),
                max(self._at(ladder, ladder.high) for ladder in self.ladders))

    def closest(self, target: int) -> Sized:
        """The knob whose count is closest to `target`; on a tie the earlier ladder (fewer layers, a bottleneck
        before the full Linear), then the smaller value: the same choice every time."""
        best: tuple[int, dict] | None = None
        for ladder in self.ladders:
            above = _first_at_least(lambda index, ladder=ladder: self._at(ladder, index), ladder.low, ladder.high,
                                    target)
            for index in sorted({max(above - 1, ladder.low), min(above, ladder.high)}):
                distance = abs(self._at(ladder, index) - target)
                if best is None or distance < best[0]:
                    best = distance, ladder.knob(index)
        assert best is not None  # __init__ kept at least one ladder
        return Sized(target, best[1], self.count(best[1]))
