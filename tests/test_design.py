"""The device model's design: the matmul-rate probe, and token counts that do not stop early on a low rate."""

import statistics

import pytest
import torch

from autoexperts.calibration.design import (
    MIN_PLANNED_TOKENS,
    DesignShape,
    build_design_layer,
    matmul_flops_per_second,
    more_tokens,
    token_counts,
)
from autoexperts.calibration.device_run import sweep_design_shape
from autoexperts.calibration.sweep import SweepOptions, default_token_grid
from autoexperts.cost_model import Measurement
from autoexperts.timing import timed_call_ms

CPU = torch.device("cpu")
DIRECT_SIZE = 2048  # twice the probe's side on CPU: compute-bound beyond doubt


def _direct_rate(size: int) -> float:
    """FLOP/s of single `size` x `size` float32 matmuls, each timed on its own (median of 3)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    return 2.0 * size**3 / (statistics.median(timed_call_ms(lambda: torch.mm(a, b), CPU) for _ in range(3)) / 1e3)


def test_matmul_probe_reads_the_rate_of_a_directly_timed_large_matmul():
    # Interleaved, so a machine whose load changes slows both alike. The old probe (a sync after each 512 x 512
    # matmul) read ~1 % of an H200's rate; a probe off by 2x either way would plan the sweeps as badly.
    probe, direct = [], []
    for _ in range(3):
        probe.append(matmul_flops_per_second(CPU, torch.float32, seconds=0.05))
        direct.append(_direct_rate(DIRECT_SIZE))
    assert 0.5 <= statistics.median(probe) / statistics.median(direct) <= 2.0


def _timed(backend: str, num_tokens: int, median_ms: float, status: str = "ok") -> Measurement:
    return Measurement(backend, num_tokens, status, median_ms if status == "ok" else None)


def _points(largest: int, eager_ms: float, grouped_ms: float, status: str = "ok") -> list[Measurement]:
    """Points of a sweep up to `largest` tokens with the given latencies (or `status`) at `largest`, 1 ms before."""
    points = [_timed(b, n, 1.0) for n in default_token_grid(largest)[:-1] for b in ("eager", "grouped_mm")]
    return [*points, _timed("eager", largest, eager_ms, status), _timed("grouped_mm", largest, grouped_ms, status)]


@pytest.mark.parametrize(
    ("points", "expected"),
    [
        # A rate read 100x too low stopped the plan at 128 tokens with 0.3 ms calls: on to the end of the grid.
        (_points(128, 0.9, 0.3), [n for n in default_token_grid(4096) if n > 128]),
        # The fastest call takes 60 ms at 1024 tokens: up to where it would take 100 ms (1706 tokens).
        (_points(1024, 60.0, 90.0), [1536]),
        # 99 ms: the next grid count, however close to 100 ms.
        (_points(1024, 99.0, 400.0), [1536]),
        # The fastest call takes 100 ms: done.
        (_points(1024, 100.0, 300.0), []),
        # The grid's end is measured: done, however short the calls.
        (_points(4096, 0.5, 0.4), []),
        # No backend ran at the largest count (both ran out of memory there): nothing to extrapolate from.
        (_points(256, 0.0, 0.0, status="oom"), []),
    ],
)
def test_more_tokens_goes_on_while_calls_are_short(points, expected):
    assert more_tokens(points, seconds_per_call=0.1, max_tokens=4096) == expected


def test_a_rate_read_far_too_low_still_sweeps_to_calls_of_the_length_aimed_at():
    shape = DesignShape(8, 64, 64, 2)
    plan = token_counts(shape, flops_per_second=1.0, seconds_per_call=0.05, max_tokens=256)
    assert plan == default_token_grid(MIN_PLANNED_TOKENS)  # what a near-zero rate plans
    layer = build_design_layer(shape, CPU, torch.float32)
    options = SweepOptions(tokens=plan, backends=["eager", "grouped_mm"], seconds_per_point=0.01, progress=False)
    points = sweep_design_shape(layer, CPU, torch.float32, options, seconds_per_call=0.05, max_tokens=256)
    largest = max(m.num_tokens for m in points)
    fastest_there = min(m.median_ms for m in points if m.num_tokens == largest and m.status == "ok")
    assert largest > MIN_PLANNED_TOKENS
    assert largest == 256 or fastest_there >= 50.0  # the grid's end, or calls as long as aimed at
    assert sorted({m.num_tokens for m in points}) == default_token_grid(largest)  # the grid, no count skipped
