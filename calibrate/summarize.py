"""Writes `calibrate/results/README.md`, one row per benchmark run found under the results folder; with `--render`,
also renders each run's Markdown report again from its JSON (so that changes to the report apply to earlier runs).

Run: python calibrate/summarize.py [RESULTS_FOLDER] [--render]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from autoexperts.bench.analysis import FIXED_BACKENDS
from autoexperts.bench.report import markdown_report, model_label


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _parts(results: dict) -> str:
    """What one run measured (the GPU suite runs one part per command): e.g. `sweep, overhead` or `generate b8`."""
    parts = [name for key, name in _PARTS if key in results]
    if "generation" in results:
        parts[parts.index("generate")] = f"generate b{results['options']['batch']}"
    return ", ".join(parts)


_PARTS = (
    ("layer_sweep", "sweep"),
    ("forward", "forward"),
    ("generation", "generate"),
    ("overhead", "overhead"),
    ("serve", "serve"),
)


def _row(results: dict, folder: Path, json_path: Path) -> str:
    summary = results.get("layer_sweep", {}).get("summary", {})
    versus = summary.get("versus_fixed", {})
    generation = results.get("generation", {}).get("runs", {})
    medians = {name: run["median_ms"] for name, run in generation.items() if run["median_ms"] is not None}
    best_fixed = min((medians[b] for b in FIXED_BACKENDS if b in medians), default=None)
    auto = medians.get("auto")
    report = json_path.with_suffix(".md").relative_to(folder)
    cells = [
        f"[{model_label(results)}]({report})",
        results["machine"]["device"],
        results["dtype"],
        results["compile_mode"],
        _parts(results),
        _ratio(summary.get("auto_over_oracle")),
        " / ".join(
            _ratio(versus.get(b, {}).get("auto_ratio")) + ("*" if versus.get(b, {}).get("points_missing") else "")
            for b in FIXED_BACKENDS
        ),
        "—" if summary.get("worst_regret") is None else f"{summary['worst_regret']:+.1%}",
        _ratio(auto / best_fixed if auto and best_fixed else None),
        _ratio(auto / medians["grouped_mm"] if auto and "grouped_mm" in medians else None),
        "—" if "overhead" not in results else f"{results['overhead']['auto_path_us']:.2f}",
        " / ".join(_ratio(results.get("serve", {}).get(key)) for key in ("auto_over_best_fixed", "auto_over_default")),
        "—" if results["calibration"].get("wall_seconds") is None else f"{results['calibration']['wall_seconds']:.0f}",
    ]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    arguments = [a for a in sys.argv[1:] if a != "--render"]
    render = "--render" in sys.argv[1:]
    folder = Path(arguments[0] if arguments else Path(__file__).parent / "results")
    runs = []
    for json_path in sorted(folder.glob("**/*.json")):
        results = json.loads(json_path.read_text(encoding="utf-8"))
        if isinstance(results, dict) and results.get("kind") == "autoexperts-bench":
            runs.append(_row(results, folder, json_path))
            if render:
                json_path.with_suffix(".md").write_text(markdown_report(results), encoding="utf-8")
    header = [
        "model",
        "device",
        "dtype",
        "compile",
        "parts",
        "layer sweep: auto / oracle",
        "auto / " + " / ".join(FIXED_BACKENDS),
        "worst point regret",
        "generate(): auto / best fixed",
        "generate(): auto / default",
        "dispatch µs",
        "serve: auto / best fixed / default",
        "calibrate s",
    ]
    lines = [
        "# Benchmark results",
        "",
        "One row per `autoexperts bench` run (each links its report; JSON and plot beside it). Ratios below 1 mean",
        "auto was faster; `*`: over the points where that backend ran (elsewhere it was over the memory limit or",
        "dropped as 8x slower than the fastest). Written by `python calibrate/summarize.py`.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *runs,
    ]
    (folder / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
