"""eager and grouped_mm on this CPU at 887-2508 tokens, under the allocator settings this process was started with.

glibc serves allocations above its mmap threshold (dynamic, from 128 KiB up to 32 MiB) with fresh pages from the
kernel, and returns freed memory at the top of its heap past the trim threshold: a call whose activations are tens of
MB then faults in fresh pages every time. Run it twice, with the default settings and with both thresholds raised
(set before Python starts), and compare:

    python calibrate/cpu_allocator_check.py bfloat16
    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296 python calibrate/cpu_allocator_check.py bfloat16

Interleaved rounds in a seeded new order each round, after two warm-up calls; medians.
"""

import functools
import os
import statistics
import sys

import torch

from autoexperts.calibration.design import GATED, TRANSPOSED_BIAS, DesignShape, build_design_layer
from autoexperts.calibration.experts_layer import routed_inputs
from autoexperts.layer import backend_forward
from autoexperts.timing import round_orders, timed_call_ms

BACKENDS = ("eager", "grouped_mm")
SHAPES = {  # the device-model check's scaled gpt-oss-20b (its worst case in bfloat16) and small-moe
    "gpt-oss-20b 1/4": DesignShape(32, 720, 720, 4, TRANSPOSED_BIAS),
    "small-moe": DesignShape(16, 512, 256, 4, GATED),
}


def main(dtype_name: str = "bfloat16", rounds: int = 7) -> None:
    dtype, cpu = getattr(torch, dtype_name), torch.device("cpu")
    settings = os.environ.get("MALLOC_MMAP_THRESHOLD_", "default")
    for label, shape in SHAPES.items():
        layer = build_design_layer(shape, cpu, dtype)
        for num_tokens in (887, 1254, 1774, 2508):
            inputs = routed_inputs(layer.spec, num_tokens, cpu, dtype)
            calls = {
                b: functools.partial(backend_forward(b, type(layer.module)), layer.module, *inputs) for b in BACKENDS
            }
            times = {b: [] for b in BACKENDS}
            with torch.inference_mode():
                for call in calls.values():
                    call(), call()
                for order in round_orders(list(BACKENDS), rounds):
                    for backend in order:
                        times[backend].append(timed_call_ms(calls[backend], cpu))
            eager, grouped = (statistics.median(times[b]) for b in BACKENDS)
            print(
                f"mmap threshold {settings:>10}  {label:16s} {num_tokens:5d} tokens  eager {eager:6.1f} ms  "
                f"grouped_mm {grouped:6.1f} ms  eager/grouped_mm {eager / grouped:.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main(*sys.argv[1:2])
