"""Decision tables: token-count ranges mapped to a backend, built once per layer spec and memory budget.

From a profile: at every token count the fastest candidate whose predicted peak memory fits the budget and that did
not fail there in calibration; a choice is kept for larger counts while it stays within `TIE_TOLERANCE` (2 %) of the
fastest, so near-ties do not split the table into noise-driven regions. When no candidate fits, the one with the
smallest predicted memory runs (source `"over_budget"`).

Without a profile, `autoexperts.selection.fallback_table` gives the documented fallback rule.
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


@dataclass(frozen=True)
class Region:
    """Token counts `first..last` (inclusive; `last` may be `inf`) run `backend`."""

    first: int
    last: float
    backend: str
    source: str


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


def build_profile_table(
    spec: LayerSpec, cost_model: CostModel, candidates: list[str], budget_bytes: float
) -> DecisionTable:
    """The table a profile's cost model gives for `candidates` under `budget_bytes`.

    Token counts up to the largest measured one are decided one by one; beyond it every latency grows in proportion
    to the tokens, so the ranking is fixed and only the budget cut-offs of the memory lines can change the choice.
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
    fastest = _sticky_fastest(np.where(fits, latency, np.inf))
    smallest = np.where(feasible, memory, np.inf).argmin(axis=0)
    any_fits = fits.any(axis=0)

    choices = [
        (int(n), candidates[fastest[i]], "profile") if any_fits[i] else (int(n), candidates[smallest[i]], "over_budget")
        for i, n in enumerate(tokens)
    ]
    curves = {
        backend: _CandidateCurve(
            latency[i, :limit], cost_model.memory_line(backend), cost_model.infeasible_from(backend)
        )
        for i, backend in enumerate(candidates)
    }
    return DecisionTable(spec, _compress(choices), budget_bytes, curves)
