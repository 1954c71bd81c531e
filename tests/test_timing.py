"""Interleaved timing: every round runs the contenders in a new order, carry-over balanced, so that no contender's
timings come mostly after the same neighbour (the bias that made `auto` read fast right after the kernel it picks, and
1.06-1.10x its own kernel when it mostly followed `batched_mm` and `eager`)."""

import collections
import itertools

import pytest
import torch

from autoexperts.timing import interleaved_rounds, round_orders

NAMES = ["eager", "batched_mm", "grouped_mm", "auto"]


def _follows(names: list[str], repeats: int) -> collections.Counter:
    """How often each `(before, after)` pair occurs over the rounds, across their boundaries too."""
    sequence = [name for order in round_orders(names, repeats) for name in order]
    return collections.Counter(itertools.pairwise(sequence))


def test_every_contender_follows_every_other_over_the_rounds():
    orders = list(round_orders(NAMES, 40))
    followed = {(order[i - 1], order[i]) for order in orders for i in range(1, len(order))}
    assert followed == set(itertools.permutations(NAMES, 2))
    assert {order[0] for order in orders} == set(NAMES)  # and none always runs first
    assert all(sorted(order) == sorted(NAMES) for order in orders)  # each round runs each contender once


@pytest.mark.parametrize(
    "names",
    [
        ["batched_mm", "grouped_mm"],  # the two contenders of a crossover's refinement
        ["eager", "batched_mm", "grouped_mm"],  # a calibration sweep
        NAMES,  # the benchmark's contenders
        ["eager", "batched_mm", "grouped_mm", "sonicmoe", "deepgemm", "auto"],  # more registered backends
    ],
)
@pytest.mark.parametrize("repeats", [20, 50])  # the forward grid's fewest rounds; a sweep point's most
def test_every_contender_follows_every_contender_about_equally_often(names, repeats):
    follows = _follows(names, repeats)
    others = [follows[a, b] for a, b in itertools.permutations(names, 2)]
    selves = [follows[a, a] for a in names]  # only across a round's boundary
    assert max(others) - min(others) <= 2
    assert max(selves) - min(selves) <= 2


def test_auto_and_its_backend_follow_their_own_kernel_equally_often():
    # On the H200 a forward read ~6.5 ms after a call of the same kernel, ~7.2 ms after another: in 20 rounds auto
    # and grouped_mm (the kernel auto runs) must be warm equally often, or their medians compare two mixtures.
    follows = _follows(NAMES, 20)
    auto_warm = follows["auto", "auto"] + follows["grouped_mm", "auto"]
    backend_warm = follows["grouped_mm", "grouped_mm"] + follows["auto", "grouped_mm"]
    assert abs(auto_warm - backend_warm) <= 1


def test_round_orders_are_reproducible_per_seed():
    assert list(round_orders(NAMES, 10, seed=3)) == list(round_orders(NAMES, 10, seed=3))
    assert list(round_orders(NAMES, 10, seed=3)) != list(round_orders(NAMES, 10, seed=4))


def test_interleaved_rounds_runs_in_the_balanced_orders():
    ran: list[str] = []
    calls = {name: (lambda name=name: ran.append(name)) for name in NAMES}
    times = interleaved_rounds(calls, torch.device("cpu"), repeats=12)
    expected = [name for order in round_orders(NAMES, 12) for name in order]
    assert ran == expected
    assert len({tuple(ran[i : i + 4]) for i in range(0, len(ran), 4)}) > 1  # not one fixed order
    assert {name: len(samples) for name, samples in times.items()} == dict.fromkeys(NAMES, 12)
