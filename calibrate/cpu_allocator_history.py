"""On CPU, under glibc's default allocator settings, what a grouped_mm call costs depends on what ran before it.

For one experts layer, every token count is timed in four patterns of two calls repeated (grouped_mm after
grouped_mm, eager after grouped_mm, ...), with the page faults each call takes (`ru_minflt`, as MiB of 4 KiB pages):
a call whose tensors land on pages glibc gave back to the kernel after an earlier call faults them in again. The counts
run once ascending and once descending in one process, so each count also follows another history. Run it under
each allocator setting (set before Python starts) and compare:

    script=calibrate/cpu_allocator_history.py
    python $script bfloat16                                                              # glibc's defaults
    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296 python $script bfloat16     # pinned
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 python $script bfloat16        # jemalloc's defaults
    LD_PRELOAD=... MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1 python $script bfloat16   # jemalloc keeping pages

Two warm-up rounds per pattern, then seven; medians.
"""

import functools
import resource
import statistics
import sys
import time

import torch

from autoexperts.allocator import allocator_settings, regime
from autoexperts.calibration.design import TRANSPOSED_BIAS, DesignShape, build_design_layer
from autoexperts.calibration.experts_layer import routed_inputs
from autoexperts.layer import backend_forward

SHAPE = DesignShape(32, 720, 720, 4, TRANSPOSED_BIAS)  # the device-model check's scaled gpt-oss-20b
TOKENS = (887, 1254, 1774, 2508)
# G: grouped_mm, E: eager; each pattern repeats, and its last call is the one reported (it follows the first).
PATTERNS = {
    "GG": "grouped after grouped",
    "EG": "grouped after eager",
    "GE": "eager after grouped",
    "EE": "eager after eager",
}
BACKENDS = {"G": "grouped_mm", "E": "eager"}
PAGE_MIB = resource.getpagesize() / 2**20


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main(dtype_name: str = "bfloat16", rounds: int = 7) -> None:
    dtype, cpu = getattr(torch, dtype_name), torch.device("cpu")
    layer = build_design_layer(SHAPE, cpu, dtype)
    settings = regime(allocator_settings())
    print(f"allocator: {settings}; {dtype_name}; E={SHAPE.num_experts} H={SHAPE.hidden_dim} "
          f"I={SHAPE.intermediate_dim} k={SHAPE.top_k}, transposed with bias", flush=True)  # fmt: skip
    for label, order in (("ascending", TOKENS), ("descending", TOKENS[::-1])):
        for num_tokens in order:
            inputs = routed_inputs(layer.spec, num_tokens, cpu, dtype)
            calls = {
                key: functools.partial(backend_forward(name, type(layer.module)), layer.module, *inputs)
                for key, name in BACKENDS.items()
            }
            cells = []
            with torch.inference_mode():
                for pattern in PATTERNS:
                    times = {key: [] for key in pattern}
                    pages = {key: [] for key in pattern}
                    for _ in range(2):
                        for key in pattern:
                            calls[key]()
                    for _ in range(rounds):
                        for key in pattern:
                            before, start = faults(), time.perf_counter()
                            calls[key]()
                            times[key].append((time.perf_counter() - start) * 1e3)
                            pages[key].append(faults() - before)
                    shown = pattern[-1]
                    cells.append(
                        f"{PATTERNS[pattern]} {statistics.median(times[shown]):6.1f} ms "
                        f"{statistics.median(pages[shown]) * PAGE_MIB:5.1f} MiB"
                    )
            print(f"{label:10s} {num_tokens:5d} tokens  " + "  |  ".join(cells), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:2])
