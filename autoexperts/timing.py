"""Timing primitives shared by calibration and the benchmark: one timed call, and interleaved rounds of several.

Interleaved rounds run the contenders in a new order every round (a seeded shuffle): whoever runs right after the
same kernel finds its code and data still warm and reads fast, so a fixed order (A B C, A B C, ...) biases every
contender by the one it follows. A seeded shuffle keeps runs reproducible.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch

from .device import synchronize

# The seed of the round orders; any fixed value keeps the orders the same from run to run.
ROUND_ORDER_SEED = 0


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


def round_orders(names: Sequence[str], repeats: int, seed: int = ROUND_ORDER_SEED) -> Iterator[list[str]]:
    """The order of `names` in each of `repeats` rounds: a seeded shuffle per round, so that no contender always
    follows the same neighbour (and none always runs first, right after the previous round's last)."""
    generator = random.Random(seed)
    order = list(names)
    for _ in range(repeats):
        generator.shuffle(order)
        yield list(order)


def interleaved_rounds(
    calls: Mapping[str, Callable[[], object]], device: torch.device, repeats: int, seed: int = ROUND_ORDER_SEED
) -> dict:
    """Times `repeats` rounds of every call, each round in a new seeded order (see `round_orders`), so drifts in
    the machine's speed hit all alike and no call always runs after the same one.

    Returns:
        `dict[str, list[float]]`: each call's times in milliseconds, in round order.
    """
    times: dict[str, list[float]] = {name: [] for name in calls}
    for order in round_orders(list(calls), repeats, seed):
        for name in order:
            times[name].append(timed_call_ms(calls[name], device))
    synchronize(device)
    return times


def repeats_for(round_ms: float, seconds: float, min_repeats: int, max_repeats: int) -> int:
    """How many rounds of `round_ms` fit in `seconds`, clipped to `[min_repeats, max_repeats]`."""
    fitting = int(seconds * 1e3 / max(round_ms, 1e-3))
    return max(min_repeats, min(max_repeats, fitting))
