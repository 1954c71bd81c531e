"""This project's acceptance targets, held against `autoexperts bench` result files: met or missed, with the value.

The package reports its figures (`autoexperts.bench.analysis.headline_figures`); the thresholds they are judged by
are this project's, so they live here, beside the results, and not in the wheel.

    python calibrate/targets.py calibrate/results/amd-epyc/olmoe-1b-7b-float32-none.json [more results ...]

Prints, per file, one line per target (`met`, `MISSED`, or `n/a` where the run cannot tell). Exit status 0 whatever
the verdicts (a miss is a finding, not an error); 2 for a file that is not a bench result.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from autoexperts.bench.analysis import TRANSFORMERS_DEFAULT, headline_figures
from autoexperts.layer import AUTO

# name (or name prefix) -> ((CPU limit, CUDA limit), strictly below?)
LIMITS = {
    "layer sweep: auto total / oracle total": ((1.03, 1.03), False),
    "layer sweep: auto total / ": ((1.0, 1.0), True),  # each fixed backend: auto must be faster in total
    "layer sweep: worst point regret": ((0.10, 0.03), False),
    "model forward: auto / the backend it ran, worst cell": ((1.02, 1.02), False),
    "generate(): auto / best fixed backend": ((None, 0.95), False),
    "generate(): auto / Transformers' default": ((None, 0.97), False),
    # continuous batching on a trace whose step sizes span the layer's crossover (`--parts serve`), auto tuned in place
    "serve: auto / best fixed backend": ((1.02, 1.02), False),
    "serve: auto / Transformers' default": ((0.97, 0.97), False),
    "dispatch overhead per call (µs)": ((2.0, 2.0), False),
    "calibration wall time (s)": ((180.0, 60.0), False),
}
# generate(): auto's peak memory may exceed the default's by at most this share of the memory budget (CUDA).
GENERATE_PEAK_EXCESS_OF_BUDGET = 1.0


def _limit(name: str, device_type: str) -> tuple[float | None, bool]:
    column = 1 if device_type == "cuda" else 0
    for key in sorted(LIMITS, key=len, reverse=True):  # the most specific name first
        if name == key or (key.endswith(" / ") and name.startswith(key)):
            limits, strict = LIMITS[key]
            return limits[column], strict
    return None, False


def _verdict(name: str, value: float | None, limit: float, strict: bool, note: str | None = None) -> dict:
    met = None if value is None else (value < limit if strict else value <= limit)
    return {"name": name, "value": value, "limit": limit, "comparison": "<" if strict else "<=", "met": met,
            "note": note}  # fmt: skip


def evaluate_targets(results: dict) -> list[dict]:
    """Every target this run's figures can decide, for the run's device type (the `generate()` targets are for
    GPUs, where Transformers' default switches backends to decode)."""
    device_type = "cuda" if results["machine"]["device_type"] == "cuda" else "cpu"
    verdicts = []
    for figure in headline_figures(results):
        limit, strict = _limit(figure["name"], device_type)
        if limit is not None:
            verdicts.append(_verdict(figure["name"], figure["value"], limit, strict, figure["note"]))
    runs = results.get("generation", {}).get("runs", {})
    auto_peak = runs.get(AUTO, {}).get("peak_bytes")
    default_peak = runs.get(TRANSFORMERS_DEFAULT, {}).get("peak_bytes")
    if device_type == "cuda" and auto_peak is not None and default_peak is not None:
        excess = (auto_peak - default_peak) / results["budget_bytes"]
        note = "peak memory above the default's, as a share of the budget"
        verdicts.append(
            _verdict("generate(): (auto peak - default peak) / budget", excess, GENERATE_PEAK_EXCESS_OF_BUDGET, False,
                     note)
        )  # fmt: skip
    return verdicts


def format_verdicts(verdicts: list[dict]) -> list[str]:
    lines = []
    for target in verdicts:
        verdict = {True: "met", False: "MISSED", None: "n/a"}[target["met"]]
        value = "-" if target["value"] is None else f"{target['value']:.3f}"
        note = f" [{target['note']}]" if target.get("note") else ""
        lines.append(f"{verdict:<7}{target['name']}: {value} ({target['comparison']} {target['limit']:g}){note}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="autoexperts bench result JSON files")
    args = parser.parse_args(argv)
    for index, path in enumerate(args.results):
        try:
            results = json.loads(path.read_text(encoding="utf-8"))
            if results.get("kind") != "autoexperts-bench":
                raise ValueError("not an autoexperts bench result")
            verdicts = evaluate_targets(results)
        except (OSError, ValueError, KeyError, TypeError) as error:
            print(f"targets.py: error: {path}: {error}", file=sys.stderr)
            return 2
        print(("\n" if index else "") + str(path))
        print("\n".join(format_verdicts(verdicts)) or "(no target applies)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
