"""What `auto` does per cached experts call beyond the lookup, piece by piece, and where a profiler sees the time.

One experts layer of `--model`'s shape at one token, its decision cached and its backend swapped for a no-op (so no
kernel's noise enters). Timed in one process, in carry-over balanced interleaved rounds of `--calls` calls each
(medians, µs per call):

- `auto path`: `auto_experts_forward` as Transformers calls it; `direct`: the no-op backend called directly;
- `lookup`: `dispatch_entry` alone (module state, table and token-count look-ups);
- the checks `auto_experts_forward` makes before the lookup: `torch.compiler.is_compiling()`,
  `torch._C._current_graph_task_id()` (a gradient checkpoint's recomputation), `active_hooks()`;
- `empty`: a call of a function that does nothing (what a Python call costs here).

Then a cProfile of `--profiled-calls` cached calls, top functions by own time.

    python calibrate/per_call_cost.py [--model qwen1.5-moe-a2.7b] [--device cpu] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import warnings
from pathlib import Path

import torch

import autoexperts
from autoexperts.bench.overhead import interleaved_per_call_us
from autoexperts.calibration.experts_layer import build_experts_layer, routed_inputs
from autoexperts.calibration.model_source import resolve_model
from autoexperts.calibration.run import resolve_device, resolve_dtype
from autoexperts.decisions import active_hooks
from autoexperts.device import cpu_model_name, device_name
from autoexperts.dispatch import auto_experts_forward, dispatch_entry
from autoexperts.freshness import library_versions

PROFILE_ROWS = 12


def measure(model: str, device: torch.device, dtype: torch.dtype, rounds: int, calls: int, profiled: int) -> dict:
    """The medians of every piece (µs per call) and the cProfile text (see the module docstring)."""
    warnings.simplefilter("ignore", autoexperts.ProfileWarning)
    layer = build_experts_layer(resolve_model(model).config, device, dtype)
    module = layer.module
    hidden_states, top_k_index, top_k_weights = routed_inputs(layer.spec, 1, device, dtype)
    entry = dispatch_entry(module, hidden_states, top_k_index)  # builds and caches the decision
    cached = next(d for d in module.__dict__["_autoexperts_state"].dispatch.values() if 1 in d.by_tokens)

    def noop(module, hidden_states, top_k_index, top_k_weights):
        return hidden_states

    cached.by_tokens[1] = entry._replace(forward=noop)
    graph_task_id = torch._C._current_graph_task_id
    pieces = {
        "auto path": lambda: auto_experts_forward(module, hidden_states, top_k_index, top_k_weights),
        "direct": lambda: noop(module, hidden_states, top_k_index, top_k_weights),
        "lookup": lambda: dispatch_entry(module, hidden_states, top_k_index),
        "is_compiling()": torch.compiler.is_compiling,
        "graph task id": graph_task_id,
        "active_hooks()": active_hooks,
        "empty": lambda: None,
    }
    try:
        with torch.inference_mode():
            samples = interleaved_per_call_us(pieces, rounds, calls)
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(profiled):
                auto_experts_forward(module, hidden_states, top_k_index, top_k_weights)
            profiler.disable()
    finally:
        cached.by_tokens[1] = entry
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(PROFILE_ROWS)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    paired = statistics.median(a - d for a, d in zip(samples["auto path"], samples["direct"], strict=True))
    return {
        "model": model,
        "device": device_name(device),
        "host": cpu_model_name(),
        "versions": {k: v for k, v in library_versions().items() if k in ("torch", "transformers")},
        "backend": entry.decision.backend,
        "medians_us": medians,
        "auto_minus_direct_us": paired,
        "beyond_lookup_us": paired - medians["lookup"],
        "cprofile": text.getvalue(),
    }


def markdown(result: dict, command: str) -> str:
    rows = [f"| {name} | {value:.3f} |" for name, value in result["medians_us"].items()]
    return "\n".join(
        [
            f"# auto's per-call cost: {result['model']} on {result['device']} (host {result['host']})",
            "",
            f"`{command}`; torch {result['versions']['torch']}, transformers {result['versions']['transformers']}; "
            f"the cached decision is `{result['backend']}`, replaced by a no-op for the timing.",
            "",
            "| piece | µs per call (median) |",
            "|---|---|",
            *rows,
            f"| auto path − direct (paired) | {result['auto_minus_direct_us']:.3f} |",
            f"| beyond the lookup | {result['beyond_lookup_us']:.3f} |",
            "",
            "cProfile of the cached calls, by own time:",
            "",
            "```",
            result["cprofile"].strip(),
            "```",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen1.5-moe-a2.7b")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--profiled-calls", type=int, default=200000)
    parser.add_argument("--out", type=Path, help="also write the Markdown here")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    result = measure(args.model, device, dtype, args.rounds, args.calls, args.profiled_calls)
    text = markdown(result, "python calibrate/per_call_cost.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(text)
    if args.out is not None:
        args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
