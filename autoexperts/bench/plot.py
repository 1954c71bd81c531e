"""The benchmark's plots: latency against token count per backend, log–log, with the range `auto` gives each backend
shaded; and, for the serve part, the steps' sizes by `auto`'s backend beside each contender's wall time. matplotlib is
an optional extra (`pip install autoexperts[plot]`); without it no plot is written.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from ..cost_model import Status
from .analysis import FIXED_BACKENDS
from .report import model_label

logger = logging.getLogger(__name__)

COLORS = {"eager": "tab:green", "batched_mm": "tab:orange", "grouped_mm": "tab:blue", "auto": "black"}


def _pyplot():
    """matplotlib's pyplot on the Agg backend, or None (logged) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'autoexperts[plot]'); no plot written")
        return None
    return plt


def _title(results: dict) -> str:
    """The model, its experts layer's shape, the dtype and the device, in one line."""
    layer = results["layer"]
    return (
        f"{model_label(results)}: E={layer['num_experts']} H={layer['hidden_dim']} I={layer['intermediate_dim']} "
        f"k={layer['top_k']}, {results['dtype']}, {results['machine']['device']}"
    )


def write_plot(results: dict, path: Path) -> bool:
    """Writes the PNG; returns False (and logs why) when matplotlib is missing or there is nothing to plot."""
    plt = _pyplot()
    if plt is None:
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
    axes.set_title(_title(results), fontsize=9)
    axes.grid(True, which="both", alpha=0.2)
    axes.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return True


def write_serve_plot(results: dict, path: Path) -> bool:
    """Writes the serve part's PNG: the trace's steps per power-of-two size bucket, split by the backend `auto` ran
    there, with its crossovers marked; beside it each contender's median wall time. Returns False (and logs why)
    when matplotlib is missing or the part did not run."""
    serve = results.get("serve")
    if not serve or "skipped" in serve or not serve["steps"]["histogram"]:
        return False
    plt = _pyplot()
    if plt is None:
        return False
    figure, (steps_axes, times_axes) = plt.subplots(1, 2, figsize=(11, 4.5), dpi=120, width_ratios=(3, 2))
    # Every power-of-two bucket from the smallest step's to the largest's, empty ones included, so that the x axis
    # is log2(tokens): bar i holds [2^(k0+i), 2^(k0+i+1)) and a count n sits at log2(n) - k0 - 0.5.
    counted = {b["first"]: b for b in serve["steps"]["histogram"]}
    low, high = (int(math.log2(first)) for first in (min(counted), max(counted)))
    firsts = [2**k for k in range(low, high + 1)]
    calls = {b["first"]: b["calls"] for b in serve["auto_backends"]}
    layers = max(serve["experts_layers"], 1)
    positions = list(range(len(firsts)))
    bottom = [0.0] * len(firsts)
    for backend in sorted({name for c in calls.values() for name in c}):
        heights = [calls.get(first, {}).get(backend, 0) / layers for first in firsts]
        steps_axes.bar(positions, heights, bottom=bottom, color=COLORS.get(backend, "grey"), label=f"auto → {backend}")
        bottom = [below + height for below, height in zip(bottom, heights, strict=True)]
    steps_axes.set_xticks(positions, [f"{f}–{2 * f - 1}" if f > 1 else "1" for f in firsts], rotation=45, fontsize=7)
    for crossover in serve["crossovers"]:
        x = math.log2(crossover["tokens"]) - low - 0.5
        if -0.5 <= x <= len(firsts) - 0.5:
            steps_axes.axvline(x, color="black", linestyle="--", linewidth=1)
            steps_axes.annotate(
                f"{crossover['from']} → {crossover['to']} at {crossover['tokens']}", (x, max(bottom)), fontsize=7,
                rotation=90, va="top", ha="right",
            )  # fmt: skip
    steps_axes.set_xlabel("tokens per step")
    steps_axes.set_ylabel("steps")
    steps_axes.set_title(f"{serve['steps']['count']} continuous-batching steps, by auto's backend", fontsize=9)
    steps_axes.legend(fontsize=7)
    contenders = [(n, r) for n, r in serve["contenders"].items() if r["median_ms"] is not None]
    names = [f"default → {r['same_as']}" if r.get("same_as") else n for n, r in contenders]
    colors = [COLORS.get(r.get("same_as") or n, "grey") for n, r in contenders]
    times_axes.barh(names, [r["median_ms"] / 1e3 for _, r in contenders], color=colors)
    times_axes.invert_yaxis()
    times_axes.set_xlabel("median wall time per serving of the trace (s)")
    times_axes.set_title(f"{serve['trace']['requests']} requests, {serve['trace']['generated_tokens']} new tokens",
                         fontsize=9)  # fmt: skip
    figure.suptitle(_title(results), fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return True
