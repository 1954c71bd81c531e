"""Micro-benchmark: what `auto` adds to an experts call once its decision is cached (CPU).

Two figures, both medians over interleaved rounds in one process:
- the lookup alone (`dispatch_entry`: module state, table and token-count look-ups);
- the whole `auto_experts_forward` path with the chosen backend swapped for a no-op, minus a direct no-op call;
- `auto_experts_forward` minus a direct call of the backend it chose, on the small preset's layer at 1 token
  (the noisiest: the difference of two much larger times).

Run: python calibrate/bench_dispatch.py
"""

from __future__ import annotations

import statistics
import time

import torch

import autoexperts
from autoexperts.calibration.experts_layer import build_experts_layer, routed_inputs
from autoexperts.calibration.model_source import resolve_model
from autoexperts.dispatch import dispatch_entry

ROUNDS = 30
CALLS_PER_ROUND = 1000


def _per_call_us(fn) -> float:
    start = time.perf_counter()
    for _ in range(CALLS_PER_ROUND):
        fn()
    return (time.perf_counter() - start) / CALLS_PER_ROUND * 1e6


def main() -> None:
    torch.set_num_threads(1)
    device = torch.device("cpu")
    layer = build_experts_layer(resolve_model("small-moe").config, device, torch.float32)
    module = layer.module
    hidden_states, top_k_index, top_k_weights = routed_inputs(layer.spec, 1, device, torch.float32)
    backend, decision = dispatch_entry(module, hidden_states, top_k_index)  # first call builds the table

    def lookup():
        return dispatch_entry(module, hidden_states, top_k_index)

    def auto():
        return autoexperts.auto_experts_forward(module, hidden_states, top_k_index, top_k_weights)

    def direct():
        return backend(module, hidden_states, top_k_index, top_k_weights)

    def noop(module, hidden_states, top_k_index, top_k_weights):
        return hidden_states

    dispatch = module.__dict__["_autoexperts_state"].dispatch
    (layer_dispatch,) = dispatch.values()

    def auto_noop():
        layer_dispatch.by_tokens[1] = (noop, decision)
        return autoexperts.auto_experts_forward(module, hidden_states, top_k_index, top_k_weights)

    def direct_noop():
        layer_dispatch.by_tokens[1] = (noop, decision)
        return noop(module, hidden_states, top_k_index, top_k_weights)

    samples = {"lookup": [], "auto_noop": [], "direct_noop": [], "auto": [], "direct": []}
    with torch.inference_mode():
        contenders = {"lookup": lookup, "auto_noop": auto_noop, "direct_noop": direct_noop}
        for fn in contenders.values():  # warm-up
            _per_call_us(fn)
        for _ in range(ROUNDS):  # interleaved rounds
            for name, fn in contenders.items():
                samples[name].append(_per_call_us(fn))
        layer_dispatch.by_tokens[1] = (backend, decision)
        for _ in range(ROUNDS // 3):
            samples["auto"].append(_per_call_us(auto))
            samples["direct"].append(_per_call_us(direct))
    medians = {name: statistics.median(values) for name, values in samples.items()}
    overhead = statistics.median(a - d for a, d in zip(samples["auto"], samples["direct"], strict=True))
    path = statistics.median(a - d for a, d in zip(samples["auto_noop"], samples["direct_noop"], strict=True))
    print(f"layer: {layer.spec.describe()}, 1 token, chosen backend {decision.backend} ({decision.source})")
    print(f"lookup alone (dispatch_entry):       {medians['lookup']:.2f} us/call")
    print(f"auto path, no-op backend, minus no-op: {path:.2f} us/call")
    print(f"auto_experts_forward:                {medians['auto']:.2f} us/call")
    print(f"direct {decision.backend + ':':<30}{medians['direct']:.2f} us/call")
    print(f"auto overhead (median round diff): {overhead:.2f} us/call ({overhead / medians['direct']:.1%} of the call)")


if __name__ == "__main__":
    main()
