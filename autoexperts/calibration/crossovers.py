"""Each crossover placed within one grid step: after the sweep, the counts between the two grid counts where the
fitted table switches backend are measured, the two contenders alone, interleaved, with more repeats.

The default grid steps by 1.33-1.5x (8, 12, 16, ...) and the cost model interpolates between its counts in log-log
space. Where the two backends' latencies are not smooth there, the switch lands a step off: on an H200 at 5-14
tokens both `batched_mm` and `grouped_mm` are bound by the host's launches and within noise of each other, and the
profiles picked `grouped_mm` at 10 tokens on qwen3 (+31.8 %) and at 14 on qwen1.5 (+7.7 %). So, after the sweep:

1. The cost model is fitted and its table built (latency only: no budget); every switch between two backends that
   were both timed at the measured counts on either side of it gives a bracket `(low, high)`.
2. The counts strictly inside each bracket are measured, `a` and `b` alone, in carry-over balanced interleaved rounds
   (`timing.round_orders`), with `TIME_FACTOR` times the sweep's time per point and at least `MIN_ROUNDS` rounds:
   all of them when there are at most `INTERIOR_COUNTS`, else that many spaced evenly in log space.
3. The table is fitted again with them; a switch whose bracket still holds unmeasured counts is refined again, at most
   `MAX_STEPS` times. On the default grid one step measures every count between two grid counts up to 16 tokens;
   above, three steps narrow a bracket to about a twentieth of a grid step.

The refinement starts no new count once it has taken its budget: `TIME_SHARE` of the sweep's own wall time, at least
`MIN_SECONDS`. The points it measures join the profile's measurements (`Measurement`s like the sweep's, peak memory
included), so the fitted cost model and the table use them as any other.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import dataclass, field, replace

import torch

from ..cost_model import CostModel, Measurement, Status
from ..table import build_profile_table
from .experts_layer import ExpertsLayer, routed_inputs
from .interrupts import raise_if_interrupted, remember_interrupts
from .sweep import SweepOptions, _measure_point, sweep_functions

logger = logging.getLogger(__name__)

# Counts measured inside a bracket per step: all of them when there are at most this many.
INTERIOR_COUNTS = 3
MAX_STEPS = 3
# A refined count gets this many times the sweep's time per point (two contenders instead of all), and at least
# `MIN_ROUNDS` (even: with two contenders, balanced orders alternate AB, BA) and at most `MAX_ROUNDS` rounds.
TIME_FACTOR = 2.0
MIN_ROUNDS = 6
MAX_ROUNDS = 100
# The refinement's budget: this share of the sweep's own wall time, at least `MIN_SECONDS`.
TIME_SHARE = 0.1
MIN_SECONDS = 1.0


@dataclass(frozen=True)
class Bracket:
    """A switch from `before` to `after` somewhere in `low < n <= high`, both backends timed at `low` and `high`."""

    low: int
    high: int
    before: str
    after: str


@dataclass
class Refinement:
    """What the refinement measured: all points (the sweep's and the new ones, sorted) and what it cost."""

    points: list[Measurement]
    counts: list[int] = field(default_factory=list)  # the token counts it measured
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"tokens": self.counts, "wall_seconds": round(self.seconds, 2)}


def refinement_budget(sweep_seconds: float) -> float:
    """The seconds the refinement may take after a sweep that took `sweep_seconds`."""
    return max(MIN_SECONDS, TIME_SHARE * sweep_seconds)


def brackets(layer: ExpertsLayer, points: list[Measurement], backends: list[str]) -> list[Bracket]:
    """The switches of the table fitted on `points` that have counts to measure between their measured sides."""
    model = CostModel.fit(points)
    candidates = [b for b in backends if b in model.backends]
    if len(candidates) < 2:
        return []
    table = build_profile_table(layer.spec, model, candidates, math.inf)
    timed: dict[str, set[int]] = {}
    for m in points:
        if m.status == Status.OK:
            timed.setdefault(m.backend, set()).add(m.num_tokens)
    found = []
    for previous, region in zip(table.regions, table.regions[1:], strict=False):
        both = sorted(timed.get(previous.backend, set()) & timed.get(region.backend, set()))
        low = max((n for n in both if n < region.first), default=None)
        high = min((n for n in both if n >= region.first), default=None)
        if previous.backend != region.backend and low is not None and high is not None and high - low > 1:
            found.append(Bracket(low, high, previous.backend, region.backend))
    return found


def interior_counts(low: int, high: int) -> list[int]:
    """The counts strictly between `low` and `high` to measure: all of them when at most `INTERIOR_COUNTS`, else that
    many spaced evenly in log space."""
    inside = high - low - 1
    if inside <= INTERIOR_COUNTS:
        return list(range(low + 1, high))
    ratio = high / low
    spaced = {round(low * ratio ** ((i + 1) / (INTERIOR_COUNTS + 1))) for i in range(INTERIOR_COUNTS)}
    return sorted(n for n in spaced if low < n < high)


def refine_crossovers(
    layer: ExpertsLayer,
    device: torch.device,
    dtype: torch.dtype,
    points: list[Measurement],
    options: SweepOptions,
    budget_seconds: float,
) -> Refinement:
    """Measures the counts around each crossover of the table fitted on `points` (see the module docstring).

    Args:
        points (`list[Measurement]`): the sweep's points.
        options (`SweepOptions`): the sweep's options (backends, time per point, compile mode, routing, seed).
        budget_seconds (`float`): no new count starts after this long (`refinement_budget`).

    Returns:
        `Refinement`: the sweep's points with the new ones, and what the refinement measured and took.
    """
    started = time.perf_counter()
    refined = Refinement(sorted(points, key=_order))
    functions, memory_functions = sweep_functions(options, type(layer.module), device)
    timing = replace(
        options, seconds_per_point=TIME_FACTOR * options.seconds_per_point, min_repeats=MIN_ROUNDS,
        max_repeats=MAX_ROUNDS,
    )  # fmt: skip
    given_up: set[Bracket] = set()  # a contender failed inside: the memory limit's edge, not a crossover
    with remember_interrupts():
        for _ in range(MAX_STEPS):
            found = [b for b in brackets(layer, refined.points, list(options.backends)) if b not in given_up]
            if not found:
                break
            for bracket in found:
                counts = interior_counts(bracket.low, bracket.high)
                logger.info("crossover %s -> %s between %d and %d tokens: measuring %s", bracket.before, bracket.after,
                            bracket.low, bracket.high, counts)  # fmt: skip
                for num_tokens in counts:
                    if time.perf_counter() - started >= budget_seconds:
                        logger.info("crossover refinement stops at its budget of %.1f s", budget_seconds)
                        refined.seconds = time.perf_counter() - started
                        return refined
                    pair = [bracket.before, bracket.after]
                    inputs = routed_inputs(layer.spec, num_tokens, device, dtype, options.seed, options.routing)
                    times, peaks, failures = _measure_point(
                        functions, memory_functions, layer.module, inputs, pair, device, timing
                    )
                    raise_if_interrupted()
                    if failures:
                        logger.info("crossover refinement at %d tokens: %s failed; not refined further",
                                    num_tokens, ", ".join(failures))  # fmt: skip
                        given_up.add(bracket)
                        break
                    new = [
                        Measurement(b, num_tokens, Status.OK, statistics.median(times[b]), peaks[b], tuple(times[b]))
                        for b in pair
                    ]
                    refined.points = sorted([*refined.points, *new], key=_order)
                    refined.counts.append(num_tokens)
    refined.seconds = time.perf_counter() - started
    return refined


def _order(m: Measurement) -> tuple[int, str]:
    return m.num_tokens, m.backend
