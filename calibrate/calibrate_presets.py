"""Calibrates several presets in one process, each as `autoexperts calibrate --model PRESET` would: the GPU suite's way
to measure a new GPU's profiles without paying Python's, Transformers' and CUDA's start-up once per preset (12-14 s of
each 20-27 s command on the H200).

Prints, per preset, the tool's own wall time, the decision table and what the crossover refinement measured; a preset
that fails is reported and the next one goes on. Writes a JSON summary (`--summary`). The crossovers are refined
(`calibration.crossovers`) also where `--tokens` gives the counts (a dry run's short grid).

    python calibrate/calibrate_presets.py --device cuda --dtype bfloat16 --out DIR [--presets a,b] [--full-grid]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

from autoexperts.calibration.run import calibrate, resolve_device
from autoexperts.dispatch import memory_budget_bytes
from autoexperts.presets import DEFAULT_PRESET, PRESETS
from autoexperts.report import profile_table


def calibrate_one(preset: str, args: argparse.Namespace, device: torch.device) -> dict:
    """One preset's calibration and what it gave (or its error)."""
    started = time.perf_counter()
    try:
        profile = calibrate(
            model=preset, device=str(device), dtype=args.dtype, out=args.out, progress=False, tokens=args.tokens,
            seconds_per_point=args.seconds_per_point, full_grid=args.full_grid, refine=True, compile_mode=args.compile,
        )  # fmt: skip
    except Exception as error:  # the next preset still runs
        return {"preset": preset, "error": f"{type(error).__name__}: {error}", "seconds": time.perf_counter() - started}
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    table = profile_table(profile, memory_budget_bytes(device))
    sweep = profile.metadata["sweep"]
    return {
        "preset": preset,
        "profile": str(profile.json_path),
        "wall_seconds": sweep["wall_seconds"],
        "seconds": time.perf_counter() - started,
        "points": len(profile.measurements),
        "table": [[r.first, r.last, r.backend] for r in table.regions],
        "refined": sweep.get("refined"),
    }


def _line(result: dict) -> str:
    if "error" in result:
        return f"{result['preset']}: FAILED after {result['seconds']:.1f} s: {result['error']}"
    regions = ", ".join(f"{first}+ {backend}" for first, _, backend in result["table"])
    refined = result["refined"] or {}
    return (
        f"{result['preset']}: {result['wall_seconds']:.1f} s by the tool ({result['seconds']:.1f} s here), "
        f"{result['points']} points; table {regions}; refined counts {refined.get('tokens')} in "
        f"{refined.get('wall_seconds')} s"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default=",".join(p for p in PRESETS if p != DEFAULT_PRESET))
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--summary", type=Path, help="the JSON summary's path (default: <out>/presets-summary.json)")
    parser.add_argument("--seconds-per-point", type=float, default=0.6)
    parser.add_argument("--full-grid", action="store_true", help="the default grid even where a device model is found")
    parser.add_argument(
        "--tokens", type=lambda text: [int(n) for n in text.split(",")], help="counts instead of a grid"
    )
    parser.add_argument("--compile", default="none", help="the torch.compile mode to calibrate (default: none)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    summary = args.summary or args.out / "presets-summary.json"
    results = []
    for preset in args.presets.split(","):
        result = calibrate_one(preset, args, device)
        results.append(result)
        summary.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
        print(_line(result), flush=True)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
