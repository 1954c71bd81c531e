"""The issue's targets, checked against one benchmark run's figures (each with the value that met or missed it)."""

from __future__ import annotations

from .analysis import FIXED_BACKENDS

# (CPU, CUDA) thresholds.
WORST_REGRET = {"cpu": 0.10, "cuda": 0.03}
CALIBRATION_SECONDS = {"cpu": 180.0, "cuda": 60.0}
AUTO_OVER_ORACLE = 1.03
OVERHEAD_US = 2.0
GENERATE_VS_BEST_FIXED = 0.95
GENERATE_VS_DEFAULT = 0.97


def _target(name: str, value: float | None, limit: float, strict: bool = False, note: str | None = None) -> dict:
    met = None if value is None else (value < limit if strict else value <= limit)
    return {"name": name, "value": value, "limit": limit, "comparison": "<" if strict else "<=", "met": met,
            "note": note}  # fmt: skip


def _generation_targets(generation: dict, budget: float) -> list[dict]:
    runs = generation["runs"]
    medians = {name: run["median_ms"] for name, run in runs.items() if run["median_ms"] is not None}
    fixed = [medians[b] for b in FIXED_BACKENDS if b in medians]
    auto = medians.get("auto")
    targets = []
    if auto is not None and fixed:
        targets.append(_target("generate(): auto / best fixed backend", auto / min(fixed), GENERATE_VS_BEST_FIXED))
    if auto is not None and "grouped_mm" in medians:
        ratio = auto / medians["grouped_mm"]
        targets.append(_target("generate(): auto / Transformers' default", ratio, GENERATE_VS_DEFAULT))
    auto_peak, default_peak = runs.get("auto", {}).get("peak_bytes"), runs.get("grouped_mm", {}).get("peak_bytes")
    if auto_peak is not None and default_peak is not None:
        excess = (auto_peak - default_peak) / budget
        note = "peak memory above the default's, as a share of the budget"
        targets.append(_target("generate(): (auto peak - default peak) / budget", excess, 1.0, note=note))
    return targets


def evaluate_targets(results: dict) -> list[dict]:
    """Every target that this run's figures can decide, for the run's device type."""
    device_type = "cuda" if results["machine"]["device_type"] == "cuda" else "cpu"
    targets = []
    summary = results.get("layer_sweep", {}).get("summary")
    if summary:
        targets.append(_target("layer sweep: auto total / oracle total", summary["auto_over_oracle"], AUTO_OVER_ORACLE))
        for backend, versus in summary["versus_fixed"].items():
            missing = versus["points_missing"]
            note = f"over the {summary['points'] - missing} points where {backend} ran" if missing else None
            targets.append(_target(f"layer sweep: auto total / {backend} total", versus["auto_ratio"], 1.0, True, note))
        targets.append(_target("layer sweep: worst point regret", summary["worst_regret"], WORST_REGRET[device_type]))
    if device_type == "cuda" and "generation" in results:
        targets += _generation_targets(results["generation"], results["budget_bytes"])
    if "overhead" in results:
        targets.append(_target("dispatch overhead per call (µs)", results["overhead"]["auto_path_us"], OVERHEAD_US))
    seconds = results.get("calibration", {}).get("wall_seconds")
    if seconds is not None:
        targets.append(_target("calibration wall time (s)", seconds, CALIBRATION_SECONDS[device_type]))
    return targets
