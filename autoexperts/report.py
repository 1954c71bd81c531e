"""Readable text for profiles: the decision table and the predictions behind it."""

from __future__ import annotations

import math

from .allocator import settings_text
from .layer import registered_backends
from .profile import Profile
from .table import DecisionTable, Source, build_profile_table


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


# What the budget line says for a file of another machine's device (its free memory is not this machine's to read).
NO_BUDGET = "none applied: another machine's device"


def _budget_text(budget_bytes: float | None, budget_label: str | None) -> str:
    return NO_BUDGET if budget_bytes is None else f"{format_bytes(budget_bytes)} ({budget_label})"


def profile_table(profile: Profile, budget_bytes: float) -> DecisionTable:
    """The decision table `auto` builds from `profile` in this process under `budget_bytes`."""
    return build_profile_table(profile.spec, profile.cost_model, registered_backends(), budget_bytes)


def _model_source(source: str) -> str:
    if source == "joblib":
        return "fitted cost model from the .joblib"
    if source.startswith("refit: "):
        return f"refit from the JSON measurements ({source.removeprefix('refit: ')})"
    return "fitted in this process"


def describe_parallel(spec, parallel: dict) -> str:
    """One line on the distributed layout a profile's layer was calibrated for."""
    sizes = f"tp_size {parallel.get('tp_size', 1)}, ep_size {parallel.get('ep_size', 1)}"
    implementation = parallel.get("ep_implementation")
    if spec.expert_shards > 1:
        rank = f"one rank's {spec.num_experts} of {spec.num_experts * spec.expert_shards} experts on every route, "
        return f"{sizes} ({implementation}): {rank}the others' as sentinel ids"
    if implementation == "all_to_all":
        return f"{sizes} (all_to_all): one rank's experts, handed its own (token, expert) pairs at top-1"
    return f"{sizes}: one rank's experts layer"


def _routing(record) -> str:
    """The routing a profile was measured with, in words (profiles from before routings were recorded: uniform)."""
    from .calibration.routing import Routing

    try:
        return Routing.from_json(record).describe()
    except (KeyError, TypeError, ValueError) as error:
        return f"unreadable ({type(error).__name__}: {error})"


def describe_profile(profile: Profile, budget_bytes: float | None, budget_label: str | None) -> str:
    """The header, the decision table, and the predictions at every measured token count (`budget_bytes` `None`:
    no memory budget applies, as for a profile of another machine's device)."""
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
        f"budget    {_budget_text(budget_bytes, budget_label)}",
        f"model     {_model_source(profile.model_source)}",
    ]
    parallel = meta.get("parallel") or {}
    if parallel:
        lines.append(f"parallel  {describe_parallel(spec, parallel)}")
    lines.append(f"routing   {_routing(sweep.get('routing'))}")
    allocator = meta.get("device", {}).get("allocator_settings")
    if allocator:
        lines.append("allocator " + settings_text(allocator))
    if sweep.get("tokens_chosen_by", "default grid") != "default grid":
        lines.append(f"tokens    {len(sweep['tokens'])} counts around the crossovers of {sweep['tokens_chosen_by']}")
    if profile.stale:
        lines.append(f"STALE     measured with {', '.join(profile.stale)}: recalibrate to refresh it")
    lines.append("")
    table = profile_table(profile, math.inf if budget_bytes is None else budget_bytes)
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


def describe_device_profile(profile, budget_bytes: float | None, budget_label: str | None) -> str:
    """A device model: what it was measured on, each form's leave-one-shape-out result, and the decision table it
    predicts for every design shape.

    Args:
        profile (`DeviceProfile`): the device model (see `autoexperts.device_profile`).
    """
    from .selection import device_model_table

    meta = profile.metadata
    versions = meta.get("versions", {})
    sweep = meta.get("sweep", {})
    points = sum(len(s.measurements) for s in profile.shapes)
    lines = [
        f"device model  {profile.json_path}",
        f"device        {profile.device_name} ({profile.device_type}), {profile.dtype}, "
        f"compile mode {profile.compile_mode}",
        f"measured      {meta.get('created', '?')} with torch {versions.get('torch', '?')}, transformers "
        f"{versions.get('transformers', '?')}: {len(profile.shapes)} shapes, {points} points"
        + (f", in {sweep['wall_seconds']:.1f} s" if "wall_seconds" in sweep else ""),
        f"budget        {_budget_text(budget_bytes, budget_label)}",
        f"model         {_model_source(profile.model_source)}",
    ]
    allocator = meta.get("device", {}).get("allocator_settings")
    if allocator:
        lines.append("allocator     " + settings_text(allocator))
    stale = profile.stale_reasons()
    if stale:
        lines.append(f"STALE         measured with {', '.join(stale)}: recalibrate to refresh it")
    lines += [
        f"form          {profile.model.form} (lowest leave-one-shape-out regret)",
        f"margin        {profile.model.margin():.1%} predicted saving over the fallback rule's choice before "
        "overriding it (the latency-ratio error)",
        f"noise         {profile.model.noise():.1%} spread of repeated timings (regions saving less merge)",
        "",
        "leave one shape out (auto's measured total / the oracle's, per held-out design shape)",
    ]
    rows = [["form", "shapes", "median", "worst", "median |log error|", "of ratios"]]
    for result in profile.model.loso:
        if not result.get("shapes"):
            continue
        rows.append(
            [
                result["form"] + (" *" if result["form"] == profile.model.form else ""),
                str(result["shapes"]),
                f"{result['median_regret']:.3f}",
                f"{result['worst_regret']:.3f}",
                f"{result['median_abs_log_error']:.3f}",
                f"{result.get('median_abs_log_ratio_error', math.nan):.3f}",
            ]
        )
    lines += _aligned(rows)
    lines += ["", "predicted tables of the design shapes"]
    rows = [["experts", "hidden", "intermediate", "top_k", "layout", "table"]]
    for shape in profile.shapes:
        spec = shape.spec
        budget = math.inf if budget_bytes is None else budget_bytes
        table = device_model_table(spec, profile.model.for_spec(spec), registered_backends(), budget)
        layout = ("gated" if spec.has_gate else "ungated") + (", transposed + bias" if spec.is_transposed else "")
        regions = ", ".join(
            f"{_range(r.first, r.last)} {r.backend}" + (" (over budget)" if r.source == Source.OVER_BUDGET else "")
            for r in table.regions
        )
        rows.append(
            [str(spec.num_experts), str(spec.hidden_dim), str(spec.intermediate_dim), str(spec.top_k), layout, regions]
        )
    lines += _aligned(rows, right_aligned=4)
    return "\n".join(lines)
