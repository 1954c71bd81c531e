"""Readable text for profiles: the decision table and the predictions behind it."""

from __future__ import annotations

import math

from .layer import registered_backends
from .profile import Profile
from .table import DecisionTable, build_profile_table


def format_bytes(value: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.0f} B"


def _range(first: int, last: float) -> str:
    return f"{first} – {'∞' if math.isinf(last) else int(last)}"


def _aligned(rows: list[list[str]], right_aligned: int = 0) -> list[str]:
    """`rows` of cells as lines: every column as wide as its widest cell and two spaces from the next, so that no
    token count or prediction runs into its neighbour; the first `right_aligned` columns are right-aligned."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return [
        "  ".join(
            cell.rjust(width) if column < right_aligned else cell.ljust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]


def _measured(points: int | None, tokens: tuple[int, int] | None) -> str:
    """`72 points, 1–4096 tokens`: how much a profile measured."""
    if points is None:
        return "not a readable profile"
    if tokens is None:
        return f"{points} points"
    low, high = tokens
    return f"{points} points, {low} tokens" if low == high else f"{points} points, {low}–{high} tokens"


def describe_replacement(profile: Profile) -> str | None:
    """What saving `profile` replaced and where that is kept, in one line (`None` when it replaced nothing)."""
    replaced = profile.replaced
    if replaced is None:
        return None
    counts = [m.num_tokens for m in profile.measurements]
    now = _measured(len(counts), (min(counts), max(counts)) if counts else None)
    return (
        f"replaced the profile that was there ({_measured(replaced.points, replaced.tokens)}) with this one ({now}); "
        f"the replaced one is kept as {replaced.backup} and its .joblib: rename both back to restore it"
    )


def profile_table(profile: Profile, budget_bytes: float) -> DecisionTable:
    """The decision table `auto` builds from `profile` in this process under `budget_bytes`."""
    return build_profile_table(profile.spec, profile.cost_model, registered_backends(), budget_bytes)


def _model_source(source: str) -> str:
    if source == "joblib":
        return "fitted cost model from the .joblib"
    if source.startswith("refit: "):
        return f"refit from the JSON measurements ({source.removeprefix('refit: ')})"
    return "fitted in this process"


def describe_profile(profile: Profile, budget_bytes: float, budget_label: str) -> str:
    """The header, the decision table, and the predictions at every measured token count."""
    spec, meta = profile.spec, profile.metadata
    versions = meta.get("versions", {})
    sweep = meta.get("sweep", {})
    model = meta.get("model", {})
    lines = [
        f"profile   {profile.json_path}",
        f"device    {profile.device_name} ({spec.device_type}), {spec.dtype}, compile mode {profile.compile_mode}",
        f"experts   {spec.experts_class}: {spec.num_experts} experts, hidden_dim {spec.hidden_dim}, "
        f"intermediate_dim {spec.intermediate_dim}, top_k {spec.top_k}"
        + (f" (model {model.get('name')})" if model.get("name") else ""),
        f"measured  {meta.get('created', '?')} with torch {versions.get('torch', '?')}, "
        f"transformers {versions.get('transformers', '?')}"
        + (f", in {sweep['wall_seconds']:.1f} s" if "wall_seconds" in sweep else ""),
        f"budget    {format_bytes(budget_bytes)} ({budget_label})",
        f"model     {_model_source(profile.model_source)}",
    ]
    if profile.stale:
        lines.append(f"STALE     measured with {', '.join(profile.stale)}: recalibrate to refresh it")
    lines.append("")
    table = profile_table(profile, budget_bytes)
    regions = [[_range(r.first, r.last), r.backend, r.source] for r in table.regions]
    lines += _aligned([["tokens", "backend", "source"], *regions])

    backends = [b for b in profile.cost_model.backends if b in table.curves]
    lines += ["", "predicted latency / peak memory at the measured token counts (* = chosen)"]
    rows = [["tokens", *backends]]
    for num_tokens in sorted({m.num_tokens for m in profile.measurements}):
        chosen = table.region_for(num_tokens).backend
        predictions = table.predictions(num_tokens)
        row = [str(num_tokens)]
        for backend in backends:
            p = predictions[backend]
            text = f"{p.latency_ms:.3g} ms / {format_bytes(p.peak_bytes)}" if p.feasible else "infeasible"
            row.append(("*" if backend == chosen else " ") + text)
        rows.append(row)
    lines += _aligned(rows, right_aligned=1)
    return "\n".join(lines)
