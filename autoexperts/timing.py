"""Timing primitives shared by calibration and the benchmark: one timed call, and interleaved rounds of several."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import torch

from .device import synchronize


def timed_call_ms(call: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call: CUDA events on GPU, a perf counter elsewhere."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))
    start_time = time.perf_counter()
    call()
    return (time.perf_counter() - start_time) * 1e3


def interleaved_rounds(calls: Mapping[str, Callable[[], object]], device: torch.device, repeats: int) -> dict:
    """Times `repeats` rounds of every call in turn (A B C A B C ...), so drifts in the machine's speed hit all alike.

    Returns:
        `dict[str, list[float]]`: each call's times in milliseconds, in round order.
    """
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            times[name].append(timed_call_ms(call, device))
    synchronize(device)
    return times


def repeats_for(round_ms: float, seconds: float, min_repeats: int, max_repeats: int) -> int:
    """How many rounds of `round_ms` fit in `seconds`, clipped to `[min_repeats, max_repeats]`."""
    fitting = int(seconds * 1e3 / max(round_ms, 1e-3))
    return max(min_repeats, min(max_repeats, fitting))
