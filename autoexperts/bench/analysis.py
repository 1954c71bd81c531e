"""The arithmetic behind the benchmark's verdicts: per-contender statistics, the oracle, regret and sweep totals.

A *contender* is one fixed backend (`eager`, `batched_mm`, `grouped_mm`) or `auto`. At each point the *oracle* is the
fastest fixed backend by median, and `auto`'s *regret* is `auto / oracle - 1`: what `auto` lost against a choice made
with hindsight. The *choice regret* uses the median of the fixed backend `auto` picked instead of `auto`'s own timing,
which separates a wrong pick from the noise between two timings of the same kernel.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from ..cost_model import SLOW_FACTOR, Status
from ..layer import AUTO, DEFAULT_BACKENDS, GROUPED_MM

FIXED_BACKENDS = tuple(DEFAULT_BACKENDS)
CONTENDERS = (*FIXED_BACKENDS, AUTO)
# What Transformers runs when no experts implementation is asked for (on GPUs it switches to batched_mm to decode).
TRANSFORMERS_DEFAULT = GROUPED_MM


@dataclass
class ContenderRun:
    """One contender at one point: its timings in ms and peak memory, or why it was not timed.

    `status` is `"ok"`, `"skipped"` (predicted to exceed the memory limit), `"slow"` (dropped after being far slower
    than the fastest contender) or `"error"`.
    """

    samples_ms: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    status: str = Status.OK
    note: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == Status.OK and bool(self.samples_ms)

    @property
    def median_ms(self) -> float | None:
        return statistics.median(self.samples_ms) if self.ok else None

    @property
    def mean_ms(self) -> float | None:
        return statistics.fmean(self.samples_ms) if self.ok else None

    @property
    def p90_ms(self) -> float | None:
        return float(np.percentile(self.samples_ms, 90)) if self.ok else None

    def to_json(self) -> dict:
        return {
            "status": self.status,
            "note": self.note,
            "median_ms": self.median_ms,
            "mean_ms": self.mean_ms,
            "p90_ms": self.p90_ms,
            "peak_bytes": self.peak_bytes,
            "samples_ms": self.samples_ms,
        }


@dataclass
class PointResult:
    """Every contender at one point (a token count, or a model input shape) and the backend `auto` chose there."""

    label: str
    num_tokens: int
    runs: dict[str, ContenderRun]
    auto_backend: str | None = None

    def median(self, contender: str) -> float | None:
        run = self.runs.get(contender)
        return run.median_ms if run is not None else None

    def oracle(self) -> tuple[str, float] | None:
        """The fastest fixed backend by median, and its median (None when no fixed backend ran)."""
        timed = [(self.median(b), b) for b in FIXED_BACKENDS if self.median(b) is not None]
        if not timed:
            return None
        best_ms, best = min(timed)
        return best, best_ms

    def regret(self) -> float | None:
        """`auto / oracle - 1` from `auto`'s own timing."""
        oracle, auto_ms = self.oracle(), self.median(AUTO)
        return None if oracle is None or auto_ms is None else auto_ms / oracle[1] - 1

    def choice_regret(self) -> float | None:
        """`chosen / oracle - 1` from the timing of the fixed backend that `auto` chose."""
        oracle = self.oracle()
        chosen_ms = self.median(self.auto_backend) if self.auto_backend else None
        return None if oracle is None or chosen_ms is None else chosen_ms / oracle[1] - 1

    def to_json(self) -> dict:
        oracle = self.oracle()
        return {
            "label": self.label,
            "num_tokens": self.num_tokens,
            "auto_backend": self.auto_backend,
            "oracle": oracle[0] if oracle else None,
            "oracle_ms": oracle[1] if oracle else None,
            "regret": self.regret(),
            "choice_regret": self.choice_regret(),
            "runs": {name: run.to_json() for name, run in self.runs.items()},
        }


def sweep_summary(points: list[PointResult]) -> dict:
    """Totals over a sweep: `auto` against the oracle and against each fixed backend, and the worst regrets.

    A fixed backend that was not timed at some points (memory limit, dropped as slow) is compared with `auto` over
    the points where it ran; `points_missing` says how many it missed.
    """
    scored = [p for p in points if p.oracle() is not None and p.median(AUTO) is not None]
    auto_total = sum(p.median(AUTO) for p in scored)
    oracle_total = sum(p.oracle()[1] for p in scored)
    versus: dict[str, dict] = {}
    for backend in FIXED_BACKENDS:
        ran = [p for p in scored if p.median(backend) is not None]
        backend_total = sum(p.median(backend) for p in ran)
        auto_on_same = sum(p.median(AUTO) for p in ran)
        versus[backend] = {
            "total_ms": backend_total if ran else None,
            "auto_total_ms_same_points": auto_on_same if ran else None,
            "auto_ratio": auto_on_same / backend_total if ran else None,
            "points_missing": len(scored) - len(ran),
        }
    regrets = [(p.regret(), p.num_tokens) for p in scored]
    choice_regrets = [(p.choice_regret(), p.num_tokens) for p in scored if p.choice_regret() is not None]
    worst, worst_tokens = max(regrets) if regrets else (None, None)
    worst_choice, worst_choice_tokens = max(choice_regrets) if choice_regrets else (None, None)
    return {
        "points": len(scored),
        "auto_total_ms": auto_total,
        "oracle_total_ms": oracle_total,
        "auto_over_oracle": auto_total / oracle_total if scored else None,
        "versus_fixed": versus,
        "worst_regret": worst,
        "worst_regret_tokens": worst_tokens,
        "median_regret": statistics.median(r for r, _ in regrets) if regrets else None,
        "worst_choice_regret": worst_choice,
        "worst_choice_regret_tokens": worst_choice_tokens,
        "oracle_picks": sum(1 for p in scored if p.auto_backend == p.oracle()[0]),
    }


def pick_ms(measured: Mapping[str, tuple[str, float | None]], pick: str) -> float:
    """What picking `pick` costs at one point whose backends measured `backend -> (status, median ms)`: its median
    when it was timed, `cost_model.SLOW_FACTOR` times the fastest when it had been dropped as slow, else infinity
    (over the memory limit, failed, or not measured)."""
    status, median = measured.get(pick, ("missing", None))
    if status == Status.OK and median:
        return median
    if status != Status.SLOW:
        return math.inf
    return SLOW_FACTOR * min(ms for s, ms in measured.values() if s == Status.OK and ms)


def choice_totals(points: list[PointResult], choices: dict[str, list[str]]) -> dict:
    """Each named chooser's total over a sweep, from the measured medians of the fixed backends it picked
    (`pick_ms`).

    `choices` maps a chooser (e.g. `"profile"`, `"device_model"`) to its backend at each point of `points`. Both are
    read off the same timings, so their ratio is free of the noise between two timings of one kernel.

    Returns:
        `{chooser: {"total_ms", "over_oracle", "oracle_picks", "untimed_picks"}}` over the points with an oracle.
    """
    scored = [(i, p) for i, p in enumerate(points) if p.oracle() is not None]
    oracle_total = sum(p.oracle()[1] for _, p in scored)
    totals = {}
    for name, picks in choices.items():
        total, hits, untimed = 0.0, 0, 0
        for i, point in scored:
            measured = {b: (point.runs[b].status, point.median(b)) for b in FIXED_BACKENDS if b in point.runs}
            total += pick_ms(measured, picks[i])
            untimed += point.median(picks[i]) is None
            hits += picks[i] == point.oracle()[0]
        totals[name] = {
            "total_ms": total,
            "over_oracle": total / oracle_total if scored else None,
            "oracle_picks": hits,
            "untimed_picks": untimed,
        }
    return totals


def _auto_over_own_backend(points: list[dict]) -> list[tuple[float, str]]:
    """`(auto's median / the median of the backend it ran, label)` at every forward point where both were timed: what
    `auto` costs beyond its kernel in a whole model (its lookup, and nothing else when the timing is fair)."""
    ratios = []
    for point in points:
        auto, own = point["runs"].get(AUTO, {}), point["runs"].get(point.get("auto_backend") or "", {})
        if auto.get("median_ms") and own.get("median_ms"):
            ratios.append((auto["median_ms"] / own["median_ms"], point["label"]))
    return ratios


def headline_figures(results: dict) -> list[dict]:
    """The figures a run is judged by, each `{"name", "value", "note"}` (`value` `None` where the run cannot tell):
    the layer sweep's totals and worst regret, the model forward's `auto` against the backend it ran, `generate()` and
    continuous batching against the fixed backends, the dispatch overhead and the calibration's wall time.
    `autoexperts bench` prints them; `calibrate/targets.py` holds them to the project's targets."""
    figures = []

    def add(name: str, value: float | None, note: str | None = None) -> None:
        figures.append({"name": name, "value": value, "note": note})

    summary = results.get("layer_sweep", {}).get("summary")
    if summary:
        add("layer sweep: auto total / oracle total", summary["auto_over_oracle"])
        for backend, versus in summary["versus_fixed"].items():
            missing = versus["points_missing"]
            note = f"over the {summary['points'] - missing} points where {backend} ran" if missing else None
            add(f"layer sweep: auto total / {backend} total", versus["auto_ratio"], note)
        add("layer sweep: worst point regret", summary["worst_regret"])
    own = _auto_over_own_backend(results.get("forward", []))
    if own:
        worst, label = max(own)
        add("model forward: auto / the backend it ran, worst cell", worst, f"at {label}, of {len(own)} cells")
    generation = results.get("generation")
    if generation:
        runs = generation["runs"]
        medians = {name: run["median_ms"] for name, run in runs.items() if run["median_ms"] is not None}
        fixed = [medians[b] for b in FIXED_BACKENDS if b in medians]
        auto = medians.get(AUTO)
        if auto is not None and fixed:
            add("generate(): auto / best fixed backend", auto / min(fixed))
        if auto is not None and TRANSFORMERS_DEFAULT in medians:
            add("generate(): auto / Transformers' default", auto / medians[TRANSFORMERS_DEFAULT])
        auto_peak = runs.get(AUTO, {}).get("peak_bytes")
        default_peak = runs.get(TRANSFORMERS_DEFAULT, {}).get("peak_bytes")
        if auto_peak is not None and default_peak:
            add("generate(): auto peak memory / Transformers' default's", auto_peak / default_peak)
    serve = results.get("serve")
    if serve and "skipped" not in serve:
        _serve_figures(serve, add)
    if "overhead" in results:
        add("dispatch overhead per call (µs)", results["overhead"]["auto_path_us"])
    seconds = results.get("calibration", {}).get("wall_seconds")
    if seconds is not None:
        add("calibration wall time (s)", seconds)
    return figures


def spans_crossovers(serve: dict) -> str:
    """Which crossovers of `auto`'s table the serve trace's step sizes span (some steps below, some at or above), in
    words."""
    crossovers = [c["tokens"] for c in serve["crossovers"]]
    steps = serve["steps"]["sizes"]
    if not crossovers:
        return "auto's table has no crossover"
    if not steps:
        return "no step was recorded"
    spanned = [n for n in crossovers if min(steps) < n <= max(steps)]
    others = [n for n in crossovers if n not in spanned]
    words = f"steps of {min(steps)}–{max(steps)} tokens "
    if not spanned:
        return words + f"span no crossover of auto's table (at {', '.join(map(str, others))})"
    words += f"span the crossover(s) at {', '.join(map(str, spanned))}"
    return words + (f", not those at {', '.join(map(str, others))}" if others else "")


def _serve_figures(serve: dict, add) -> None:
    """The serve part's figures: `auto` tuned in place against the best fixed backend and Transformers' default."""
    span = spans_crossovers(serve)
    best = serve["best_fixed"]
    add("serve: auto / best fixed backend", serve["auto_over_best_fixed"], f"{best}; {span}" if best else span)
    default = serve["contenders"].get("default", {})
    ran = ", ".join(default.get("dispatched") or {}) or serve["default_backend"]
    add("serve: auto / Transformers' default", serve["auto_over_default"], f"default ran {ran}; {span}")
    add("serve: tune in place wall time (s)", serve["tune"]["wall_seconds"])
