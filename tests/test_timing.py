"""Interleaved timing: every round runs the contenders in a new (seeded) order, so none always follows the same
neighbour, the bias that made `auto` read fast right after the kernel it picks."""

import itertools

import torch

from autoexperts.timing import interleaved_rounds, round_orders

NAMES = ["eager", "batched_mm", "grouped_mm", "auto"]


def test_every_contender_follows_every_other_over_the_rounds():
    orders = list(round_orders(NAMES, 40))
    followed = {(order[i - 1], order[i]) for order in orders for i in range(1, len(order))}
    assert followed == set(itertools.permutations(NAMES, 2))
    assert {order[0] for order in orders} == set(NAMES)  # and none always runs first
    assert all(sorted(order) == sorted(NAMES) for order in orders)  # each round runs each contender once


def test_round_orders_are_reproducible_per_seed():
    assert list(round_orders(NAMES, 10, seed=3)) == list(round_orders(NAMES, 10, seed=3))
    assert list(round_orders(NAMES, 10, seed=3)) != list(round_orders(NAMES, 10, seed=4))


def test_interleaved_rounds_runs_in_the_shuffled_orders():
    ran: list[str] = []
    calls = {name: (lambda name=name: ran.append(name)) for name in NAMES}
    times = interleaved_rounds(calls, torch.device("cpu"), repeats=12)
    expected = [name for order in round_orders(NAMES, 12) for name in order]
    assert ran == expected
    assert len({tuple(ran[i : i + 4]) for i in range(0, len(ran), 4)}) > 1  # not one fixed order
    assert {name: len(samples) for name, samples in times.items()} == dict.fromkeys(NAMES, 12)
