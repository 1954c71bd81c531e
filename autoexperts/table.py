"""Decision tables: token-count ranges mapped to a backend, built once per layer spec and memory budget.

From a profile (or any cost model), in two steps:

1. **Pointwise**: at every token count the fastest candidate whose predicted peak memory fits the budget and that did
   not fail there in calibration; a choice is kept for larger counts while it stays within `TIE_TOLERANCE` (2 %) of
   the fastest. When no candidate fits, the one with the smallest predicted memory runs (source `"over_budget"`).
2. **No noise islands**: a region takes a neighbour's backend when its predicted saving over that backend, over the
   whole region, is below the noise tolerance:

       1 - sum(chosen(n) / neighbour(n) / n) / sum(1 / n)

   the mean of the predicted latency ratio over the region's token counts `n`, each weighted by `1 / n` so that every
   scale of counts (1–2, 2–4, ..., 512–1024) weighs alike (the counts are decided one by one, so an octave holds
   as many counts as it spans). A ratio, not a sum of latencies: summed latencies let the largest counts decide
   alone (they cost the most), and a region from 1 to 4000 tokens that halves every decode-sized call would merge
   away for a 2 % loss at 4000.
   - The tolerance is the larger of `NOISE_TOLERANCE` (3 %) and the cost model's own `noise()`, when it has one (for
     a profile, the spread of its repeated timings), at most `MAX_NOISE_TOLERANCE` (10 %).
   - A neighbour qualifies only when its backend is feasible and fits the budget at every count of the region.
     `"over_budget"` regions never merge and are never merged into, so no merge crosses one.
   - Of two qualifying neighbours, the region is compared with the one costing less over it (its saving is smaller).
   - The smallest saving in the table merges first; merging repeats until every region saves at least the tolerance
     over each neighbour it could merge into.
   Every region costs a compiled graph under `torch.compile`, and a saving within noise is no saving.

Beyond the largest measured count every latency grows in proportion to the tokens, so only the token counts where a
memory line leaves the budget or a backend fails are evaluated there; each stands for the counts up to the next (and
counts once in the sums above: the latency ratios between backends are fixed there).

Without a profile, `autoexperts.selection.fallback_table` gives the documented fallback rule (no merging: it has no
predictions).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import numpy as np

from .cost_model import CostModel
from .layer import LayerSpec

# A backend stays chosen for larger token counts while its predicted latency is within this share of the fastest's.
TIE_TOLERANCE = 0.02
# A region whose predicted saving over a neighbour's backend, summed over the region, is below this share merges into
# that neighbour (the floor: a cost model reporting a larger `noise()` raises it) ...
NOISE_TOLERANCE = 0.03
# ... up to this share, however noisy its timings: the spread of single timings is not the error of their medians,
# and a profile timed on a loaded machine (spreads of 50 % and more) would otherwise merge its whole table into one
# backend, possibly the slowest.
MAX_NOISE_TOLERANCE = 0.10


class Source:
    """Where a decision came from (`Decision.source`, `Region.source`)."""

    PROFILE = "profile"  # a calibrated profile of the layer's shape
    DEVICE_MODEL = "device_model"  # no profile: the device model's predictions for the shape
    FALLBACK = "fallback"  # nothing calibrated: the documented fixed rule
    OVER_BUDGET = "over_budget"  # no candidate fits the memory budget: the least memory-hungry one
    RUNTIME_FALLBACK = "runtime_fallback"  # the chosen backend raised for the call; this one ran in its place


@dataclass(frozen=True)
class Region:
    """Token counts `first..last` (inclusive; `last` may be `inf`) run `backend`."""

    first: int
    last: float
    backend: str
    source: str  # a `Source`


@dataclass(frozen=True)
class Prediction:
    """A backend's predicted cost for one call: latency in milliseconds and transient peak memory in bytes."""

    latency_ms: float
    peak_bytes: float
    feasible: bool = True


@dataclass(frozen=True)
class _CandidateCurve:
    """A candidate's predictions, tabulated at table build so that no estimator runs at dispatch time."""

    latency_ms: np.ndarray  # (limit,) predicted latency at 1..limit tokens
    memory_line: tuple[float, float]  # (bytes at zero tokens, bytes per token)
    infeasible_from: float

    def at(self, num_tokens: int) -> Prediction:
        tokens = max(num_tokens, 1)
        limit = len(self.latency_ms)
        latency = self.latency_ms[tokens - 1] if tokens <= limit else self.latency_ms[-1] * tokens / limit
        intercept, per_token = self.memory_line
        return Prediction(float(latency), max(intercept + per_token * tokens, 0.0), tokens < self.infeasible_from)


class DecisionTable:
    """Token-count regions of one layer spec, with the predictions that chose them (empty for a fallback table)."""

    def __init__(
        self,
        spec: LayerSpec,
        regions: list[Region],
        budget_bytes: float,
        curves: dict[str, _CandidateCurve] | None = None,
    ):
        self.spec = spec
        self.regions = regions
        self.budget_bytes = budget_bytes
        self.curves = curves or {}
        self._firsts = [region.first for region in regions]

    def region_for(self, num_tokens: int) -> Region:
        index = bisect.bisect_right(self._firsts, num_tokens) - 1
        return self.regions[max(index, 0)]

    def predictions(self, num_tokens: int) -> dict[str, Prediction]:
        """Each candidate's predicted cost at `num_tokens`: array look-ups and one multiply, no estimator call."""
        return {backend: curve.at(num_tokens) for backend, curve in self.curves.items()}


def _compress(choices: list[tuple[int, str, str]]) -> list[Region]:
    """Merges consecutive `(first token count, backend, source)` points into regions."""
    regions: list[Region] = []
    for first, backend, source in choices:
        if regions and regions[-1].backend == backend and regions[-1].source == source:
            continue
        if regions:
            regions[-1] = Region(regions[-1].first, first - 1, regions[-1].backend, regions[-1].source)
        regions.append(Region(first, math.inf, backend, source))
    return regions


def _sticky_fastest(latency: np.ndarray) -> np.ndarray:
    """Per token count, the fastest candidate, except that the previous choice stays while it is within
    `TIE_TOLERANCE` of the fastest: near-ties flip with measurement noise, and every region costs a compiled graph.

    Args:
        latency (`np.ndarray`): `(num_candidates, num_points)`, `inf` where a candidate may not run.
    """
    best = latency.argmin(axis=0)
    chosen = best.copy()
    for i in range(1, latency.shape[1]):
        previous = chosen[i - 1]
        if np.isfinite(latency[previous, i]) and latency[previous, i] <= (1 + TIE_TOLERANCE) * latency[best[i], i]:
            chosen[i] = previous
    return chosen


def noise_tolerance(cost_model) -> float:
    """The saving below which a region merges into its neighbour: `NOISE_TOLERANCE`, or the cost model's own relative
    noise estimate (an optional `noise()` method or `noise` number) when that is larger, at most
    `MAX_NOISE_TOLERANCE`."""
    noise = getattr(cost_model, "noise", None)
    estimate = float((noise() if callable(noise) else noise) or 0.0)
    if not math.isfinite(estimate):
        return NOISE_TOLERANCE
    return min(max(NOISE_TOLERANCE, estimate), MAX_NOISE_TOLERANCE)


def _merge_islands(
    choice: np.ndarray, tokens: np.ndarray, latency: np.ndarray, fits: np.ndarray, tolerance: float
) -> np.ndarray:
    """`choice` with every region whose saving over a neighbour is below `tolerance` merged into it (see the module
    docstring), the smallest saving first.

    Args:
        choice (`np.ndarray`): `(num_points,)` candidate index per point, `-1` where none fits (over budget).
        tokens (`np.ndarray`): `(num_points,)` the token count of each point.
        latency (`np.ndarray`): `(num_candidates, num_points)` predicted latency.
        fits (`np.ndarray`): `(num_candidates, num_points)` whether a candidate is feasible and within the budget.
    """
    choice = choice.copy()
    num_candidates = latency.shape[0]
    weights = 1.0 / tokens  # (num_points,)
    weight_sums = np.concatenate([[0.0], np.cumsum(weights)])  # prefix sums: sums over [start, stop) are differences
    # ratio_sums[a, b]: prefix sums of latency[a] / latency[b] / n where both fit (elsewhere b cannot take the region).
    both = fits[:, None, :] & fits[None, :, :]  # (num_candidates, num_candidates, num_points)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(both, latency[:, None, :] / latency[None, :, :], 0.0) * weights
    ratio_sums = np.concatenate([np.zeros((num_candidates, num_candidates, 1)), np.cumsum(ratios, axis=2)], axis=2)
    misfits = np.concatenate([np.zeros((num_candidates, 1)), np.cumsum(~fits, axis=1)], axis=1)
    while True:
        starts = np.flatnonzero(np.diff(choice, prepend=-2))  # (num_regions,) first point of each region
        stops = np.append(starts[1:], len(choice))
        backends = choice[starts]
        best = None  # (saving, region, backend it merges into)
        for region, (start, stop, backend) in enumerate(zip(starts, stops, backends, strict=True)):
            if backend < 0:
                continue
            weight = weight_sums[stop] - weight_sums[start]
            for side in (region - 1, region + 1):
                other = backends[side] if 0 <= side < len(starts) else -1
                if other < 0 or misfits[other, stop] - misfits[other, start] > 0:
                    continue
                # The cheaper neighbour gives the smaller saving, so comparing savings prefers it.
                saving = 1.0 - (ratio_sums[backend, other, stop] - ratio_sums[backend, other, start]) / weight
                if best is None or saving < best[0]:
                    best = (saving, region, other)
        if best is None or best[0] >= tolerance:
            return choice
        _, region, other = best
        choice[starts[region] : stops[region]] = other


def _margin(cost_model) -> float:
    margin = getattr(cost_model, "margin", None)
    value = float((margin() if callable(margin) else margin) or 0.0)
    return value if math.isfinite(value) and value > 0 else 0.0


def _favour_default(
    latency: np.ndarray, tokens: np.ndarray, candidates: list[str], default: DecisionTable, margin: float
) -> np.ndarray:
    """`latency` `(num_candidates, num_points)` with the `default` table's backend's latency divided by
    `1 + margin` at each point: the latency the choice is made on (pointwise and when merging islands alike)."""
    effective = latency.copy()
    for region in default.regions:
        if region.backend in candidates:
            inside = (tokens >= region.first) & (tokens <= region.last)
            effective[candidates.index(region.backend), inside] /= 1.0 + margin
    return effective


def build_profile_table(
    spec: LayerSpec,
    cost_model: CostModel,
    candidates: list[str],
    budget_bytes: float,
    source: str = Source.PROFILE,
    default: DecisionTable | None = None,
) -> DecisionTable:
    """The table a cost model gives for `candidates` under `budget_bytes`; its regions' source is `source`
    (`"profile"`, or `"device_model"` for a device model's view of the shape), `"over_budget"` where nothing fits.

    Token counts up to the largest measured one are decided one by one; beyond it every latency grows in proportion
    to the tokens, so the ranking is fixed and only the budget cut-offs of the memory lines can change the choice.
    Regions whose saving is within noise then merge into a neighbour (see the module docstring).

    `cost_model` needs `backends`, `max_tokens`, `infeasible_from`, `latency_ms`, `peak_bytes`, `memory_line` and,
    optionally, `noise` and `margin` (a `CostModel`, or anything else that predicts the same way).

    With a `default` table (the fallback rule's, for a device model's predictions), the choice (pointwise and when
    merging) is made as if its backend were `1 + cost_model.margin()` times faster than predicted: predictions for a
    shape never measured override the default only where they save more than their own error.
    """
    candidates = [b for b in candidates if b in cost_model.backends]
    if not candidates:
        raise ValueError("the profile measured none of the candidate backends")
    limit = max(cost_model.max_tokens(b) for b in candidates)
    # Token counts where the choice may change beyond `limit`: just past each backend's budget cut-off or failure.
    cutoffs = set()
    for backend in candidates:
        intercept, per_token = cost_model.memory_line(backend)
        if per_token > 0 and math.isfinite(budget_bytes):
            cutoffs.add(math.floor((budget_bytes - intercept) / per_token) + 1)
        if limit < cost_model.infeasible_from(backend) < math.inf:
            cutoffs.add(int(cost_model.infeasible_from(backend)))
    tokens = np.concatenate(
        [np.arange(1, limit + 1), np.array(sorted(c for c in cutoffs if c > limit), dtype=np.int64)]
    )

    latency = np.stack([cost_model.latency_ms(b, tokens) for b in candidates])  # (num_candidates, num_points)
    memory = np.stack([cost_model.peak_bytes(b, tokens) for b in candidates])
    feasible = np.stack([tokens < cost_model.infeasible_from(b) for b in candidates])
    fits = feasible & (memory <= budget_bytes)
    any_fits = fits.any(axis=0)
    # The latency the choice is made on: the predictions, the default's backend favoured by the margin.
    effective = (
        latency if default is None else _favour_default(latency, tokens, candidates, default, _margin(cost_model))
    )
    pointwise = np.where(any_fits, _sticky_fastest(np.where(fits, effective, np.inf)), -1)
    fastest = _merge_islands(pointwise, tokens, effective, fits, noise_tolerance(cost_model))
    smallest = np.where(feasible, memory, np.inf).argmin(axis=0)

    choices = [
        (int(n), candidates[fastest[i]], source)
        if any_fits[i]
        else (int(n), candidates[smallest[i]], Source.OVER_BUDGET)
        for i, n in enumerate(tokens)
    ]
    curves = {
        backend: _CandidateCurve(
            latency[i, :limit], cost_model.memory_line(backend), cost_model.infeasible_from(backend)
        )
        for i, backend in enumerate(candidates)
    }
    return DecisionTable(spec, _compress(choices), budget_bytes, curves)
