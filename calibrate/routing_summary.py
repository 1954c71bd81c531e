"""What a skewed routing changes, from `autoexperts bench --routing ...` results: where the crossovers move, and what
`auto` calibrated with the matching routing saves over `auto` calibrated uniform.

Each result read was measured on inputs drawn from its routing, and holds (`layer_sweep.compared_profile`) the picks
of the uniform calibration of the same layer read off the same timings. Per result:

- the crossovers (region boundaries) of the matching calibration's decision table and of the uniform one's;
- `auto / oracle`: `auto`'s own timing with the matching profile, over the oracle's (the fastest fixed backend per
  point), summed over the held-out counts;
- `matching picks / oracle` and `uniform picks / oracle`: the medians of the fixed backends each profile's table
  picks, summed, over the oracle's (the same timings, so their ratio is free of timing noise); their ratio is what
  calibrating with the matching routing saves.

Nothing is timed. Run it as `python calibrate/routing_summary.py RESULTS_DIR... --out FOLDER`; it writes
`summary.json` and `summary.md` there.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from autoexperts.cost_model import Status

logger = logging.getLogger(__name__)


def _crossovers(regions: list[dict]) -> list[str]:
    """`eager from 256` for each region after the first: where the table's choice changes."""
    return [f"{r['backend']} from {r['first']}" for r in regions[1:]]


def _table_text(regions: list[dict]) -> str:
    return ", ".join(f"{r['first']}–{'∞' if r['last'] is None else r['last']} {r['backend']}" for r in regions)


# Calibration counts at which the summary compares eager with grouped_mm under both routings.
RATIO_TOKENS = (16, 64, 256, 1024, 4096)


def _eager_over_grouped(measurements: list[dict]) -> dict[str, float]:
    """`eager / grouped_mm` of a calibration's medians at `RATIO_TOKENS` (where both were timed)."""
    medians = {(m["backend"], m["num_tokens"]): m.get("median_ms") for m in measurements if m["status"] == Status.OK}
    return {
        str(n): medians[("eager", n)] / medians[("grouped_mm", n)]
        for n in RATIO_TOKENS
        if medians.get(("eager", n)) and medians.get(("grouped_mm", n))
    }


def _profile_measurements(path: str, written_as: str | None, read_from: Path) -> list[dict]:
    """The measurements of the compared profile JSON at `path`; when the results were moved (the bench wrote its JSON
    as `written_as` and it is read from `read_from`), the profile is looked for at the same place relative to it.
    Empty when it cannot be found."""
    candidates = [Path(path)]
    if written_as is not None and Path(path).is_relative_to(Path(written_as).parent):
        candidates.insert(0, read_from.parent / Path(path).relative_to(Path(written_as).parent))
    try:
        found = next(candidate for candidate in candidates if candidate.is_file())
        return json.loads(found.read_text(encoding="utf-8"))["measurements"]
    except StopIteration:
        logger.warning("cannot find the compared profile %s; its eager / grouped_mm ratios are left out", path)
        return []
    except (OSError, ValueError, KeyError):
        logger.warning("cannot read the compared profile %s; its eager / grouped_mm ratios are left out", path)
        return []


def summarise(result: dict, path: Path) -> dict | None:
    """The figures of the bench result `result`, read from `path` (`None` when it has no uniform calibration to
    compare with)."""
    sweep = result.get("layer_sweep") or {}
    compared = sweep.get("compared_profile")
    if compared is None:
        return None
    summary = sweep["summary"]
    totals = compared["totals"]
    layer = result["layer"]
    return {
        "model": Path(result["model"]["name"]).name,  # a preset's name, or a local config folder's own name
        "shape": f"E={layer['num_experts']}, H={layer['hidden_dim']}, I={layer['intermediate_dim']}, "
        f"k={layer['top_k']}",
        "dtype": result["dtype"],
        "routing": result["routing"]["text"],
        "points": summary["points"],
        "tokens": [p["num_tokens"] for p in sweep["points"]],
        "matching_table": _table_text(result["calibration"]["regions"]),
        "uniform_table": _table_text(compared["regions"]),
        "matching_crossovers": _crossovers(result["calibration"]["regions"]),
        "uniform_crossovers": _crossovers(compared["regions"]),
        "auto_over_oracle": summary["auto_over_oracle"],
        "matching_picks_over_oracle": totals["profile"]["over_oracle"],
        "uniform_picks_over_oracle": totals["compared"]["over_oracle"],
        "uniform_over_matching": totals["compared"]["total_ms"] / totals["profile"]["total_ms"],
        "matching_oracle_picks": totals["profile"]["oracle_picks"],
        "uniform_oracle_picks": totals["compared"]["oracle_picks"],
        "differing_picks": [
            {"tokens": p["num_tokens"], "matching": p["auto_backend"], "uniform": u, "oracle": p["oracle"]}
            for p, u in zip(sweep["points"], compared["picks"], strict=True)
            if p["auto_backend"] != u
        ],
        "eager_over_grouped_mm": {
            "uniform": _eager_over_grouped(
                _profile_measurements(compared["path"], result.get("files", {}).get("json"), path)
            ),
            "matching": _eager_over_grouped(result["calibration"]["measurements"]),
        },
        "calibration_seconds": result["calibration"].get("wall_seconds"),
        "source": path.name,
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "# Routing: auto calibrated with the matching routing against auto calibrated uniform",
        "",
        "Layer sweep on inputs drawn from the routing (held-out token counts). `auto / oracle`: auto's own timing "
        "with the matching profile. `matching` and `uniform picks / oracle`: the medians of the fixed backends each "
        "calibration's table picks, read off the same timings. `uniform / matching`: what calibrating with the "
        "matching routing saves (above 1: the uniform calibration costs more).",
        "",
        "| model (layer) | routing | auto / oracle | matching picks / oracle | uniform picks / oracle "
        "| uniform / matching | oracle picks (matching, uniform) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} ({row['shape']}) | {row['routing']} | {row['auto_over_oracle']:.3f} "
            f"| {row['matching_picks_over_oracle']:.3f} | {row['uniform_picks_over_oracle']:.3f} "
            f"| {row['uniform_over_matching']:.3f} | {row['matching_oracle_picks']}, {row['uniform_oracle_picks']} "
            f"of {row['points']} |"
        )
    lines += ["", "## Where the crossovers move", ""]
    lines += ["| model | routing | uniform calibration | matching calibration |", "|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['model']} | {row['routing']} | {row['uniform_table']} | {row['matching_table']} |")
    lines += ["", "`eager / grouped_mm` in each calibration (below 1: eager is faster):", ""]
    lines += ["| model | routing | calibrated | " + " | ".join(f"{n} tokens" for n in RATIO_TOKENS) + " |"]
    lines.append("|---|---|---|" + "---|" * len(RATIO_TOKENS))
    for row in rows:
        for which, ratios in row["eager_over_grouped_mm"].items():
            cells = " | ".join(f"{ratios[str(n)]:.2f}" if str(n) in ratios else "—" for n in RATIO_TOKENS)
            label = "uniform" if which == "uniform" else row["routing"]
            lines.append(f"| {row['model']} | {row['routing']} | {label} | {cells} |")
    lines += ["", "## Where the two calibrations pick differently", ""]
    for row in rows:
        picks = "; ".join(
            f"{d['tokens']}: {d['matching']} (uniform {d['uniform']}, oracle {d['oracle']})"
            for d in row["differing_picks"]
        )
        lines.append(f"- {row['model']}, {row['routing']}: {picks or 'none'}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="bench result JSON files or folders holding them")
    parser.add_argument("--out", type=Path, required=True, help="folder for summary.json and summary.md")
    args = parser.parse_args(argv)
    files = sorted(f for p in args.results for f in ([p] if p.is_file() else p.rglob("*-routing-*.json")))
    rows = []
    for path in files:
        row = summarise(json.loads(path.read_text(encoding="utf-8")), path)
        if row is None:
            logger.warning("%s holds no uniform calibration to compare with; left out", path)
            continue
        rows.append(row)
    if not rows:
        print("no bench --routing results with a uniform calibration to compare with", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    (args.out / "summary.md").write_text(markdown(rows), encoding="utf-8")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
