"""How much a per-shape calibration loses by measuring only where the device model predicts crossovers.

For each exact-shape profile measured on the full default grid, the profile is fitted again on the subset of its own
measurements that `calibrate` would take with a device model at hand (`calibration.adaptive`), and both tables
choose at every count of the full grid. A choice costs the measured median there (`analysis.pick_ms`: a backend the
sweep dropped as slow costs `cost_model.SLOW_FACTOR` times the fastest). The sparse table saw only its subset, so
most grid counts are held out from it; the full table saw them all, which favours it.

Run it as `python calibrate/sparse_calibration_check.py --device-model JSON --profiles DIR`.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from autoexperts.bench.analysis import pick_ms
from autoexperts.calibration.adaptive import crossover_tokens
from autoexperts.cost_model import CostModel, Status
from autoexperts.device_profile import load_device_profile
from autoexperts.profile import load_profile
from autoexperts.selection import device_model_table, runnable_backends
from autoexperts.store import profile_files
from autoexperts.table import build_profile_table

from checks import measured_by_tokens, write_result


def _total(table, measured: dict[int, dict[str, tuple[str, float | None]]]) -> tuple[float, float]:
    """The measured total of `table`'s choices over `measured` (`measured_by_tokens`), and the oracle's."""
    chosen = sum(pick_ms(points, table.region_for(n).backend) for n, points in measured.items())
    oracle = sum(min(ms for s, ms in points.values() if s == Status.OK and ms) for points in measured.values())
    return chosen, oracle


def check_profile(profile, device_profile, budget: float) -> dict:
    """The full and the sparse calibration of one profile, judged on its full grid."""
    spec = profile.spec
    measured_backends = {m.backend for m in profile.measurements}
    candidates = [
        b for b in runnable_backends(sorted(measured_backends), profile.compile_mode, spec.device_type)
    ]  # fmt: skip
    grid = sorted({m.num_tokens for m in profile.measurements})
    sparse_tokens = crossover_tokens(device_model_table(spec, device_profile.model.for_spec(spec), candidates, budget))
    sparse_tokens = [n for n in sparse_tokens if n in grid]
    subset = [m for m in profile.measurements if m.num_tokens in sparse_tokens]
    measured = measured_by_tokens(profile.measurements)
    full_table = build_profile_table(spec, CostModel.fit(profile.measurements), candidates, budget)
    sparse_table = build_profile_table(spec, CostModel.fit(subset), candidates, budget)
    full, oracle = _total(full_table, measured)
    sparse, _ = _total(sparse_table, measured)
    return {
        "profile": profile.json_path.name,
        "grid_points": len(grid),
        "sparse_points": len(sparse_tokens),
        "sparse_tokens": sparse_tokens,
        "full_over_oracle": full / oracle,
        "sparse_over_oracle": sparse / oracle,
    }


def run(device_model_path: Path, profiles_dir: Path) -> dict:
    device_profile = load_device_profile(device_model_path)
    budget = device_profile.metadata["sweep"]["memory_limit_bytes"]
    rows = []
    for path in profile_files([profiles_dir]):
        profile = load_profile(path)
        key = (profile.device_name, profile.spec.dtype, profile.compile_mode)
        if key == (device_profile.device_name, device_profile.dtype, device_profile.compile_mode):
            rows.append(check_profile(profile, device_profile, budget))
    if not rows:
        raise SystemExit(f"no profile of {device_profile.device_name}, {device_profile.dtype} under {profiles_dir}")
    rows.sort(key=lambda r: r["profile"])
    return {
        "device_model": str(device_model_path),
        "points_ratio": sum(r["grid_points"] for r in rows) / sum(r["sparse_points"] for r in rows),
        "median_full_over_oracle": statistics.median(r["full_over_oracle"] for r in rows),
        "median_sparse_over_oracle": statistics.median(r["sparse_over_oracle"] for r in rows),
        "worst_sparse_over_oracle": max(r["sparse_over_oracle"] for r in rows),
        "profiles": rows,
    }


def markdown(result: dict) -> str:
    lines = [
        f"Sparse calibration with `{result['device_model']}`: {result['points_ratio']:.2f}× fewer points; "
        f"median over the oracle {result['median_sparse_over_oracle']:.3f} sparse, "
        f"{result['median_full_over_oracle']:.3f} full grid (worst sparse {result['worst_sparse_over_oracle']:.3f})",
        "",
        "| profile | grid points | sparse points | full / oracle | sparse / oracle | sparse counts |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["profiles"]:
        lines.append(
            f"| {r['profile']} | {r['grid_points']} | {r['sparse_points']} | {r['full_over_oracle']:.3f} | "
            f"{r['sparse_over_oracle']:.3f} | {', '.join(map(str, r['sparse_tokens']))} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device-model", type=Path, required=True, help="the device model's JSON")
    parser.add_argument("--profiles", type=Path, required=True, help="a folder of full-grid exact-shape profiles")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here (and Markdown beside it)")
    args = parser.parse_args(argv)
    result = run(args.device_model, args.profiles)
    write_result(result, markdown(result), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
