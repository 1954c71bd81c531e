"""The device model's matmul-rate probe against matmuls timed directly, and against the probe it replaced.

The device model plans each design shape's token counts from the device's matmul rate. The old probe timed 512 x 512
matmuls with a synchronize after each and read 9.66 TFLOP/s on an H200 (about 1 % of its bf16 rate); the new one
(`design.matmul_flops_per_second`) times one warmed-up batch of compute-bound matmuls. This script prints, in one
process and interleaved over `--rounds` rounds: the new probe, the old one, and the median rate of single matmuls of
each `--sizes` timed directly (CUDA events on GPU), each with its ratio to the largest size's direct rate.

    python calibrate/matmul_probe_check.py [--device cuda] [--dtype bfloat16] [--sizes 2048,8192,16384] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from autoexperts.calibration.design import PROBE_SIZES, matmul_flops_per_second
from autoexperts.calibration.run import resolve_device, resolve_dtype
from autoexperts.device import device_name
from autoexperts.freshness import library_versions
from autoexperts.timing import timed_call_ms

OLD_PROBE_SIZE = 512
DIRECT_CALLS = 5


def old_probe(device: torch.device, dtype: torch.dtype, seconds: float = 0.2) -> float:
    """The probe as it was: 512 x 512 matmuls, a synchronize after each, for about `seconds`."""
    a = torch.randn(OLD_PROBE_SIZE, OLD_PROBE_SIZE, device=device).to(dtype)
    b = torch.randn(OLD_PROBE_SIZE, OLD_PROBE_SIZE, device=device).to(dtype)
    torch.mm(a, b)
    calls, started = 0, time.perf_counter()
    while True:
        torch.mm(a, b)
        calls += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - started
        if elapsed >= seconds and calls >= 3:
            break
    return 2.0 * OLD_PROBE_SIZE**3 * calls / elapsed


def direct_rate(device: torch.device, dtype: torch.dtype, size: int) -> float:
    """The median rate of `DIRECT_CALLS` single matmuls of side `size`, each timed on its own after a warm-up."""
    a = torch.randn(size, size, device=device).to(dtype)  # (size, size)
    b = torch.randn(size, size, device=device).to(dtype)  # (size, size)
    torch.mm(a, b)
    times_ms = [timed_call_ms(lambda: torch.mm(a, b), device) for _ in range(DIRECT_CALLS)]
    return 2.0 * size**3 / (statistics.median(times_ms) / 1e3)


def measure(device: torch.device, dtype: torch.dtype, sizes: list[int], rounds: int) -> dict:
    """Every contender once per round, `rounds` rounds; medians in FLOP/s."""
    contenders = {
        "probe": lambda: matmul_flops_per_second(device, dtype),
        "old probe": lambda: old_probe(device, dtype),
    }
    contenders |= {f"direct {n}": (lambda n=n: direct_rate(device, dtype, n)) for n in sizes}
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, rate in contenders.items():
            samples[name].append(rate())
    medians = {name: statistics.median(values) for name, values in samples.items()}
    reference = medians[f"direct {max(sizes)}"]
    return {
        "device": device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "versions": {k: v for k, v in library_versions().items() if k in ("torch", "transformers")},
        "probe_size": PROBE_SIZES.get(device.type, PROBE_SIZES["cpu"]),
        "rounds": rounds,
        "flops_per_second": medians,
        "over_largest_direct": {name: value / reference for name, value in medians.items()},
        "samples": samples,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--sizes", default=None, help="comma-separated sides of the directly timed matmuls")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write the result as JSON here")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    default_sizes = "4096,8192,16384" if device.type == "cuda" else "512,1024,2048"
    sizes = [int(n) for n in (args.sizes or default_sizes).split(",")]
    result = measure(device, dtype, sizes, args.rounds)
    for name, rate in result["flops_per_second"].items():
        ratio = result["over_largest_direct"][name]
        print(f"{name:<14}{rate / 1e12:10.3f} TFLOP/s  {ratio:6.3f}x the largest direct matmul's")
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
