"""The crossover refinement: on a synthetic near-tie that the grid's interpolation misplaces, the switch lands where
the latencies cross, measured with the two contenders alone, interleaved, and within its time budget."""

import itertools
import math
import time

import pytest
import torch

from autoexperts.calibration.crossovers import interior_counts, refine_crossovers
from autoexperts.calibration.experts_layer import build_experts_layer
from autoexperts.calibration.model_source import resolve_model
from autoexperts.calibration.run import calibrate
from autoexperts.calibration.sweep import SweepOptions, run_sweep
from autoexperts.table import build_profile_table
from tests.test_calibration import _wrap_backend

BACKENDS = ["eager", "batched_mm", "grouped_mm"]
GRID = [1, 2, 3, 4, 6, 8, 12, 16]
# batched_mm is cheap up to 9 tokens and dear from 10 on (a launch-bound kernel changing regime); grouped_mm is flat
# between the two; eager is far slower than both. The latencies cross between 9 and 10 tokens, inside the grid step
# 8 -> 12, and so far apart that noise cannot move the crossover (the table needs a 2 % lead to switch).
SWITCH = 10
BATCHED_LOW_MS, BATCHED_HIGH_MS, GROUPED_MS, EAGER_MS = 2.0, 12.0, 6.0, 30.0


def _latency_ms(backend: str, num_tokens: int) -> float:
    if backend == "batched_mm":
        return BATCHED_LOW_MS if num_tokens < SWITCH else BATCHED_HIGH_MS
    return GROUPED_MS if backend == "grouped_mm" else EAGER_MS


@pytest.fixture
def near_tie(monkeypatch):
    """Every backend sleeps its synthetic latency instead of computing; returns the `(backend, tokens)` calls."""
    calls: list[tuple[str, int]] = []
    for backend in BACKENDS:

        def sleep_instead(forward, module, hidden_states, *args, backend=backend):
            calls.append((backend, hidden_states.shape[0]))
            time.sleep(_latency_ms(backend, hidden_states.shape[0]) / 1e3)
            return hidden_states

        _wrap_backend(monkeypatch, backend, sleep_instead)
    return calls


@pytest.mark.parametrize(
    ("refine", "first_grouped_mm"),
    [
        (True, SWITCH),  # 9, 10 and 11 measured: the switch where the latencies cross
        (False, SWITCH + 1),  # the grid alone: interpolating 8 -> 12 in log-log space puts it one count late
    ],
)
def test_a_crossover_lands_where_the_latencies_cross(near_tie, tmp_path, refine, first_grouped_mm):
    profile = calibrate(
        model="small-moe", device="cpu", tokens=GRID, backends=BACKENDS, out=tmp_path, progress=False,
        seconds_per_point=0.05, refine=refine,
    )  # fmt: skip
    table = build_profile_table(profile.spec, profile.cost_model, BACKENDS, math.inf)
    assert [(r.first, r.backend) for r in table.regions] == [(1, "batched_mm"), (first_grouped_mm, "grouped_mm")]
    refined = profile.metadata["sweep"].get("refined")
    assert (refined["tokens"] if refine else None) == ([9, 10, 11] if refine else None)


def test_the_two_contenders_alone_run_interleaved_at_the_refined_counts(near_tie, tmp_path):
    calibrate(model="small-moe", device="cpu", tokens=GRID, backends=BACKENDS, out=tmp_path, progress=False,
              seconds_per_point=0.05, refine=True)  # fmt: skip
    for num_tokens in (9, 10, 11):
        ran = [backend for backend, n in near_tie if n == num_tokens]
        assert set(ran) == {"batched_mm", "grouped_mm"}  # not eager, which loses by far
        rounds = ran[4:]  # after each contender's warm-up and peak-memory calls
        assert len(rounds) >= 2 * 6  # more rounds than the sweep's 3
        assert max(len(list(run)) for _, run in itertools.groupby(rounds)) <= 2  # AB BA AB ...: interleaved


def test_the_refinement_starts_no_count_past_its_budget(near_tie):
    layer = build_experts_layer(resolve_model("small-moe").config, torch.device("cpu"), torch.float32)
    options = SweepOptions(tokens=GRID, backends=BACKENDS, seconds_per_point=0.05, progress=False)
    points = run_sweep(layer, torch.device("cpu"), torch.float32, options)
    refinement = refine_crossovers(layer, torch.device("cpu"), torch.float32, points, options, budget_seconds=0.0)
    assert refinement.counts == [] and refinement.points == points


@pytest.mark.parametrize(
    ("low", "high", "expected"),
    [
        (8, 12, [9, 10, 11]),  # a grid step of at most 3 counts inside: all of them
        (4, 6, [5]),
        (16, 24, [18, 20, 22]),  # more: 3 spaced evenly in log space
        (16, 256, [32, 64, 128]),  # a device model's sparse counts
        (1024, 1536, [1133, 1254, 1388]),
    ],
)
def test_interior_counts(low, high, expected):
    assert interior_counts(low, high) == expected
