"""Timing primitives shared by calibration and the benchmark: one timed call, and interleaved rounds of several.

Interleaved rounds run every contender once per round, in an order that changes from round to round: whoever runs
right after the same kernel finds its code and data still warm and reads fast, so a fixed order (A B C, A B C, ...)
biases every contender by the one it follows. A seeded shuffle per round is not enough either: over a few rounds it
leaves some contenders mostly after a cheap neighbour and others mostly after an expensive one. On an H200, a
2-layer forward read ~6.5 ms after a call of the same kernel and ~7.2 ms after `batched_mm` or `eager`, and in 3
shuffled rounds `auto` followed those twice, the backend it ran once, so `auto` read 1.06-1.10x its own kernel. The
orders are therefore *carry-over balanced*: each round's order is the one, of all orders, whose transitions (a
contender right after another, across the rounds' boundaries too) have occurred least so far, ties broken by a seeded
shuffle; of a few such schedules (seeded), the most even is kept. Every contender then follows every contender about
equally often, and any two contenders follow themselves or each other equally often (within one round).
"""

from __future__ import annotations

import collections
import functools
import itertools
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch

from .device import synchronize

# The seed of the round orders; any fixed value keeps the orders the same from run to run.
ROUND_ORDER_SEED = 0
# Up to this many contenders every order is considered each round (6! = 720); beyond, this many random ones.
ENUMERATED_CONTENDERS = 6
SAMPLED_ORDERS = 720
# Schedules built per call (each from its own seeded tie-breaks); the most even one is kept.
SCHEDULES_TRIED = 8


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
    """The order of `names` in each of `repeats` rounds, carry-over balanced (see the module docstring): each round
    runs every name once, and over the rounds every name follows every name (itself included, across a round's
    boundary) about equally often, so no contender's timings come mostly after a cheap or an expensive neighbour.
    Reproducible per `seed`."""
    for order in _balanced_schedule(tuple(names), repeats, seed):
        yield list(order)


@functools.lru_cache(maxsize=256)
def _balanced_schedule(names: tuple[str, ...], repeats: int, seed: int) -> tuple[tuple[str, ...], ...]:
    """The most even of `SCHEDULES_TRIED` greedy schedules (see `_unevenness`)."""
    schedules = [
        _greedy_schedule(names, repeats, random.Random(seed * SCHEDULES_TRIED + attempt))
        for attempt in range(SCHEDULES_TRIED)
    ]
    return min(schedules, key=lambda schedule: _unevenness(names, schedule))


def _greedy_schedule(names: tuple[str, ...], repeats: int, generator: random.Random) -> tuple[tuple[str, ...], ...]:
    """Round by round, the order whose transitions have occurred least so far (ties: `generator`'s shuffle)."""
    enumerated = list(itertools.permutations(names)) if len(names) <= ENUMERATED_CONTENDERS else []
    follows: collections.Counter = collections.Counter()  # (before, after) -> times so far
    schedule, previous = [], None
    for _ in range(repeats):
        pool = enumerated or [tuple(generator.sample(names, len(names))) for _ in range(SAMPLED_ORDERS)]
        generator.shuffle(pool)
        order = min(pool, key=lambda candidate: sum(follows[pair] for pair in _transitions(previous, candidate)))
        follows.update(_transitions(previous, order))
        schedule.append(order)
        previous = order[-1]
    return tuple(schedule)


def _transitions(previous: str | None, order: Sequence[str]) -> list[tuple[str, str]]:
    """The `(before, after)` pairs a round in `order` adds, after a round that ended with `previous`."""
    pairs = list(itertools.pairwise(order))
    return pairs if previous is None else [(previous, order[0]), *pairs]


def _unevenness(names: tuple[str, ...], schedule: tuple[tuple[str, ...], ...]) -> tuple[int, int, int]:
    """How unevenly `schedule` lets contenders follow each other, worst first: the largest difference, between two
    contenders `a` and `b`, in how often each follows itself or the other (two contenders that run the same kernel,
    as `auto` and its pick, are then as often warm); then the spread of the counts of `a`-after-`b` pairs, and of
    `a`-after-`a` pairs."""
    follows = collections.Counter(itertools.pairwise(name for order in schedule for name in order))
    warm = max(
        (
            abs(follows[a, a] + follows[b, a] - follows[b, b] - follows[a, b])
            for a, b in itertools.permutations(names, 2)
        ),
        default=0,
    )
    others = [follows[pair] for pair in itertools.permutations(names, 2)] or [0]
    selves = [follows[a, a] for a in names]
    return warm, max(others) - min(others), max(selves) - min(selves)


def interleaved_rounds(
    calls: Mapping[str, Callable[[], object]], device: torch.device, repeats: int, seed: int = ROUND_ORDER_SEED
) -> dict:
    """Times `repeats` rounds of every call, in carry-over balanced orders (see `round_orders`), so drifts in the
    machine's speed hit all alike and every call follows every other about equally often.

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
