"""A Markdown table of per-rank profiles: for each calibrated layer (whole, or one rank's under tensor or expert
parallelism), its decision table and what each fixed backend costs against the fastest over the measured counts.

Run: python calibrate/per_rank_summary.py PROFILE_FOLDER > SUMMARY.md
"""

from __future__ import annotations

import sys
from pathlib import Path

from autoexperts.cost_model import Status
from autoexperts.dispatch import memory_budget_bytes
from autoexperts.profile import load_profile
from autoexperts.report import describe_parallel, profile_table

from checks import measured_by_tokens

BACKENDS = ("eager", "batched_mm", "grouped_mm")


def _row(json_path: Path) -> list[str]:
    profile = load_profile(json_path, trusted=False)
    spec, parallel = profile.spec, profile.metadata.get("parallel") or {}
    table = profile_table(profile, memory_budget_bytes(profile_device(profile)))
    regions = ", ".join(
        f"{r.first}–{r.last if r.last != float('inf') else '∞'} {r.backend}"
        for r in table.regions
        if r.source == "profile"
    )
    by_tokens = measured_by_tokens(profile.measurements)
    # Over the counts where every backend was timed: each fixed backend's total against the fastest's.
    common = [p for p in by_tokens.values() if all(p.get(b, ("", None))[0] == Status.OK for b in BACKENDS)]
    oracle = sum(min(p[b][1] for b in BACKENDS) for p in common)
    ratios = " / ".join(f"{sum(p[b][1] for p in common) / oracle:.2f}" for b in BACKENDS) if common else "—"
    counts = f"{min(by_tokens)}–{max(by_tokens)}" if by_tokens else "—"
    layer = f"E={spec.num_experts}, I={spec.intermediate_dim}, k={spec.top_k}"
    return [
        describe_parallel(spec, parallel) if parallel else "one device: the whole layer",
        layer,
        regions,
        f"{ratios} (over {len(common)} counts of {counts} where all three ran)",
    ]


def profile_device(profile):
    import torch

    return torch.device(profile.spec.device_type)


def main(folder: str) -> None:
    rows = [_row(path) for path in sorted(Path(folder).rglob("*.json")) if not path.name.endswith(".previous.json")]
    print("| layout | rank's layer | decision table | eager / batched_mm / grouped_mm vs the fastest |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
