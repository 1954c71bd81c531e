"""What `record_routing` costs a forward: never recorded, after a recording ended, and while recording.

Three copies of one model with the same weights run the same input in interleaved rounds (a new seeded order every
round, a warm-up first): one never recorded, one whose `record_routing` block has ended (its hooks removed: this
must cost nothing), and one inside an open `record_routing` block. Reported: medians and their ratios to the
never-recorded copy, per token count.

Run it as `python calibrate/capture_overhead.py [--model small-moe] [--tokens 1,128] [--rounds 200]
[--out FILE]`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import warnings
from pathlib import Path

import torch

from autoexperts.bench.model_bench import build_bench_model
from autoexperts.calibration.model_source import resolve_model
from autoexperts.capture import record_routing
from autoexperts.device import cpu_model_name
from autoexperts.errors import ProfileWarning
from autoexperts.freshness import library_versions
from autoexperts.timing import interleaved_rounds


def measure(model_name: str, token_counts: list[int], rounds: int, implementation: str = "auto") -> dict:
    """Medians (ms) of a forward of each copy at each count, and their ratios to the never-recorded copy."""
    device = torch.device("cpu")
    never = build_bench_model(resolve_model(model_name).config, device, torch.float32)
    never.set_experts_implementation(implementation)
    after, recording = copy.deepcopy(never), copy.deepcopy(never)
    with record_routing(after), torch.no_grad():  # a recording that has ended
        after(input_ids=torch.zeros(1, 4, dtype=torch.long))
    results = {}
    with contextlib.ExitStack() as stack:
        stack.enter_context(record_routing(recording))
        for num_tokens in token_counts:
            input_ids = torch.randint(0, 1024, (1, num_tokens), generator=torch.Generator().manual_seed(num_tokens))

            def forward(model, input_ids=input_ids):
                with torch.no_grad():
                    return model(input_ids=input_ids).logits

            calls = {
                "never": lambda: forward(never),
                "after": lambda: forward(after),
                "recording": lambda: forward(recording),
            }
            for call in calls.values():  # warm-up
                call()
            times = interleaved_rounds(calls, device, rounds)
            medians = {name: statistics.median(samples) for name, samples in times.items()}
            results[str(num_tokens)] = {
                "median_ms": medians,
                "after_over_never": medians["after"] / medians["never"],
                "recording_over_never": medians["recording"] / medians["never"],
            }
    return {
        "model": model_name,
        "implementation": implementation,
        "rounds": rounds,
        "cpu": cpu_model_name(),
        "torch_threads": torch.get_num_threads(),
        "versions": library_versions(),
        "points": results,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small-moe")
    parser.add_argument("--tokens", default="1,128", help="comma-separated token counts (batch 1)")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore", ProfileWarning)  # no profile is needed: the fallback rule decides alike for all
    result = measure(args.model, [int(n) for n in args.tokens.split(",")], args.rounds)
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
