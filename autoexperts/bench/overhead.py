"""Part 4 of the benchmark: what `auto` adds to an experts call once its decision is cached.

Medians over interleaved rounds of many calls each:
- `lookup_us`: the lookup alone (`dispatch_entry`: module state, table and token-count look-ups);
- `auto_path_us`: the whole `auto_experts_forward` path with the chosen backend swapped for a no-op, minus a direct
  call of the same no-op (the figure to quote: it holds everything `auto` adds and no kernel noise);
- `auto_minus_direct_us`: `auto_experts_forward` minus a direct call of the backend it chose, at one token (the
  difference of two much larger, noisier times).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from ..calibration.experts_layer import ExpertsLayer, routed_inputs
from ..dispatch import auto_experts_forward, dispatch_entry
from ..timing import round_orders


def _per_call_us(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def interleaved_per_call_us(contenders: dict[str, Callable[[], object]], rounds: int, calls: int) -> dict[str, list]:
    """Each contender's microseconds per call, one sample per round of `calls` calls, in carry-over balanced orders
    after one warm-up batch each."""
    for fn in contenders.values():  # warm-up
        _per_call_us(fn, calls)
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for order in round_orders(list(contenders), rounds):
        for name in order:
            samples[name].append(_per_call_us(contenders[name], calls))
    return samples


def measure_dispatch_overhead(
    layer: ExpertsLayer, device: torch.device, dtype: torch.dtype, rounds: int = 30, calls: int = 1000
) -> dict:
    """Measures the three figures of the module docstring on `layer` at one token (its table must be buildable)."""
    module = layer.module
    hidden_states, top_k_index, top_k_weights = routed_inputs(layer.spec, 1, device, dtype)
    with torch.inference_mode():
        entry = dispatch_entry(module, hidden_states, top_k_index)  # builds and caches the decision
        backend, decision = entry.forward, entry.decision
        layer_dispatch = next(d for d in module.__dict__["_autoexperts_state"].dispatch.values() if 1 in d.by_tokens)

        def noop(module, hidden_states, top_k_index, top_k_weights):
            return hidden_states

        def lookup():
            return dispatch_entry(module, hidden_states, top_k_index)

        def auto_noop():
            return auto_experts_forward(module, hidden_states, top_k_index, top_k_weights)

        def direct_noop():
            return noop(module, hidden_states, top_k_index, top_k_weights)

        layer_dispatch.by_tokens[1] = entry._replace(forward=noop)
        try:
            path = interleaved_per_call_us({"lookup": lookup, "auto": auto_noop, "direct": direct_noop}, rounds, calls)
        finally:
            layer_dispatch.by_tokens[1] = entry

        def auto():
            return auto_experts_forward(module, hidden_states, top_k_index, top_k_weights)

        def direct():
            return backend(module, hidden_states, top_k_index, top_k_weights)

        kernel_calls = max(calls // 50, 10)
        full = interleaved_per_call_us({"auto": auto, "direct": direct}, max(rounds // 2, 5), kernel_calls)
    paired = [a - d for a, d in zip(path["auto"], path["direct"], strict=True)]
    full_paired = [a - d for a, d in zip(full["auto"], full["direct"], strict=True)]
    return {
        "backend": decision.backend,
        "num_tokens": 1,
        "lookup_us": statistics.median(path["lookup"]),
        "auto_path_us": statistics.median(paired),
        "direct_call_us": statistics.median(full["direct"]),
        "auto_minus_direct_us": statistics.median(full_paired),
    }
