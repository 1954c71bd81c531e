"""The benchmark's plot: latency against token count per backend, log–log, with the range `auto` gives each backend
shaded. matplotlib is an optional extra (`pip install autoexperts[plot]`); without it no plot is written.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..cost_model import Status
from .analysis import FIXED_BACKENDS

logger = logging.getLogger(__name__)

COLORS = {"eager": "tab:green", "batched_mm": "tab:orange", "grouped_mm": "tab:blue", "auto": "black"}


def write_plot(results: dict, path: Path) -> bool:
    """Writes the PNG; returns False (and logs why) when matplotlib is missing or there is nothing to plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'autoexperts[plot]'); no plot written")
        return False
    calibration = results.get("calibration", {})
    sweep = results.get("layer_sweep", {}).get("points", [])
    if not calibration.get("measurements") and not sweep:
        return False

    figure, axes = plt.subplots(figsize=(8, 5), dpi=120)
    for backend in FIXED_BACKENDS:
        measured = [
            m for m in calibration.get("measurements", []) if m["backend"] == backend and m["status"] == Status.OK
        ]
        if measured:
            axes.plot(
                [m["num_tokens"] for m in measured], [m["median_ms"] for m in measured], "-", color=COLORS[backend],
                alpha=0.6, linewidth=1.2, label=f"{backend} (calibration)",
            )  # fmt: skip
        held_out = [p for p in sweep if p["runs"][backend]["median_ms"] is not None]
        if held_out:
            axes.plot(
                [p["num_tokens"] for p in held_out], [p["runs"][backend]["median_ms"] for p in held_out], "o",
                color=COLORS[backend], markersize=4, label=f"{backend} (held-out)",
            )  # fmt: skip
    auto = [p for p in sweep if p["runs"]["auto"]["median_ms"] is not None]
    if auto:
        axes.plot(
            [p["num_tokens"] for p in auto], [p["runs"]["auto"]["median_ms"] for p in auto], "x", color="black",
            markersize=7, label="auto (held-out)",
        )  # fmt: skip
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    right = max([m["num_tokens"] for m in calibration.get("measurements", [])] + [p["num_tokens"] for p in sweep])
    shaded = set()
    for region in calibration.get("regions", []):
        last = right * 1.2 if region["last"] is None else min(region["last"] + 0.5, right * 1.2)
        first = max(region["first"] - 0.5, 0.8)
        if first >= last:
            continue
        label = None if region["backend"] in shaded else f"auto → {region['backend']}"
        shaded.add(region["backend"])
        axes.axvspan(first, last, color=COLORS.get(region["backend"], "grey"), alpha=0.1, label=label)
    axes.set_xlim(0.8, right * 1.2)
    axes.set_xlabel("tokens per experts call")
    axes.set_ylabel("latency (ms)")
    layer = results["layer"]
    axes.set_title(
        f"{results['model']['name']}: E={layer['num_experts']} H={layer['hidden_dim']} I={layer['intermediate_dim']} "
        f"k={layer['top_k']}, {results['dtype']}, {results['machine']['device']}",
        fontsize=9,
    )
    axes.grid(True, which="both", alpha=0.2)
    axes.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return True
