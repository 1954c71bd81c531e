"""The benchmark's Markdown report, written from the results dictionary alone (the JSON holds every raw figure)."""

from __future__ import annotations

from pathlib import Path

from ..report import format_bytes
from .analysis import CONTENDERS, FIXED_BACKENDS, spans_crossovers


def _ms(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.3g} ms" if value < 1000 else f"{value / 1000:.3g} s"


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}×"


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{value:+.1%}"


def _memory(value: float | None) -> str:
    return "—" if value is None else format_bytes(value)


def _run_cell(run: dict) -> str:
    if run["median_ms"] is not None:
        return _ms(run["median_ms"])
    return f"{run['status']}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _headline(results: dict) -> list[str]:
    rows = []
    for figure in results.get("headline", []):
        value = figure["value"]
        note = f" ({figure['note']})" if figure.get("note") else ""
        rows.append([figure["name"] + note, "—" if value is None else f"{value:.3f}"])
    return _table(["figure", "measured"], rows) if rows else ["(no figure to report)"]


def _diagnosis(results: dict) -> list[str]:
    """Whether the layer sweep's regret comes from auto's choices or from timing noise (see `choice_regret`)."""
    sweep = results.get("layer_sweep")
    if not sweep or not sweep["summary"]["points"]:
        return []
    summary = sweep["summary"]
    worst_choice = summary["worst_choice_regret"]
    where = f" at {summary['worst_choice_regret_tokens']} tokens" if worst_choice else ""
    lines = [
        f"auto ran the oracle's backend at {summary['oracle_picks']} of {summary['points']} layer-sweep points; its "
        f"worst choice regret was {_percent(worst_choice)}{where}."
    ]
    worst = next(p for p in sweep["points"] if p["num_tokens"] == summary["worst_regret_tokens"])
    if worst["auto_backend"] == worst["oracle"]:
        lines.append(
            f"The worst measured regret ({_percent(worst['regret'])} at {worst['num_tokens']} tokens) came where auto "
            f"ran the oracle's own backend ({worst['oracle']}): it is the spread between two timings of one kernel on "
            "this machine, not a wrong choice."
        )
    if summary["oracle_picks"] == summary["points"]:
        lines.append(
            "Every choice was the oracle's, so any gap between auto's totals and the best here is timing noise."
        )
    return ["", " ".join(lines)]


def _sweep(sweep: dict) -> list[str]:
    rows = []
    for point in sweep["points"]:
        runs = point["runs"]
        rows.append(
            [str(point["num_tokens"])]
            + [_run_cell(runs[b]) for b in FIXED_BACKENDS]
            + [
                _run_cell(runs["auto"]),
                point["auto_backend"] or "—",
                point["oracle"] or "—",
                _percent(point["regret"]),
                _percent(point["choice_regret"]),
                _memory(runs["auto"]["peak_bytes"]),
            ]
        )
    summary = sweep["summary"]
    versus = summary["versus_fixed"]
    totals = ["**total**"] + [
        _ms(versus[b]["total_ms"]) + ("*" if versus[b]["points_missing"] else "") for b in FIXED_BACKENDS
    ]
    totals += [_ms(summary["auto_total_ms"]), "", _ms(summary["oracle_total_ms"]), "", "", ""]
    header = ["tokens", *FIXED_BACKENDS, "auto", "auto chose", "oracle", "regret", "choice regret", "auto peak mem"]
    lines = _table(header, [*rows, totals])
    lines += [
        "",
        f"auto / oracle over the sweep: **{_ratio(summary['auto_over_oracle'])}**; worst point regret "
        f"{_percent(summary['worst_regret'])} at {summary['worst_regret_tokens']} tokens (median "
        f"{_percent(summary['median_regret'])}); worst choice regret {_percent(summary['worst_choice_regret'])} at "
        f"{summary['worst_choice_regret_tokens']} tokens; auto picked the oracle at {summary['oracle_picks']} of "
        f"{summary['points']} points.",
        "",
        "auto against each fixed backend, over the points where that backend ran: "
        + "; ".join(f"{b} {_ratio(v['auto_ratio'])}" for b, v in versus.items())
        + ". `*` a total over fewer points: that backend was skipped (memory limit) or dropped as too slow at "
        "the others. *Regret* is auto's median over the oracle's minus 1; *choice regret* uses the median of "
        "the fixed backend auto chose, so it shows a wrong pick without the noise of a second timing.",
    ]
    return lines + _device_model_lines(sweep) + _compared_profile_lines(sweep)


def _regions_text(regions: list[dict]) -> str:
    return ", ".join(f"{r['first']}–{'∞' if r['last'] is None else r['last']} {r['backend']}" for r in regions)


def _compared_profile_lines(sweep: dict) -> list[str]:
    """`auto` with another profile of the layer (another routing's calibration) beside `auto` with this run's."""
    compared = sweep.get("compared_profile")
    if not compared:
        return []
    choosers = (
        ("profile", "auto with this run's profile (its picks)"),
        ("compared", f"auto with the profile calibrated {compared['routing']['text']}"),
    )
    return [
        "",
        f"**Another calibration of this layer** (`{compared['path']}`, routing {compared['routing']['text']}) gives "
        f"{_regions_text(compared['regions'])}. Both choosers' totals are read off the fixed backends' medians above:",
        "",
        *_chooser_table(compared, choosers),
    ]


def _chooser_table(compared: dict, choosers) -> list[str]:
    """Each `(name, label)` chooser's total, its ratio to the oracle and its oracle picks, from `compared`."""
    totals = compared["totals"]
    rows = [
        [
            label,
            _ms(totals[name]["total_ms"]),
            _ratio(totals[name]["over_oracle"]),
            f"{totals[name]['oracle_picks']} of {len(compared['picks'])}",
        ]
        for name, label in choosers
    ]
    return _table(["chooser", "total", "/ oracle", "oracle picks"], rows)


def _device_model_lines(sweep: dict) -> list[str]:
    """`auto` with the device model beside `auto` with the exact profile, when the benchmark found a device model."""
    compared = sweep.get("device_model")
    if not compared:
        return []
    choosers = (("profile", "auto with the exact profile"), ("device_model", "auto with the device model"))
    return [
        "",
        f"**Without the exact profile**: the device model ({compared['form']} form, `{compared['path']}`) gives "
        f"{_regions_text(compared['regions'])}. Both choosers' totals below are read off the fixed backends' medians "
        "above (a pick that was not timed there counts 8× the oracle when dropped as slow):",
        "",
        *_chooser_table(compared, choosers),
    ]


def _contender_rows(point: dict, extra=None) -> list[list[str]]:
    best = point["oracle_ms"]
    rows = []
    for name in CONTENDERS:
        run = point["runs"].get(name)
        if run is None:
            continue
        if run["median_ms"] is None:
            rows.append([name, run["status"], "", "", "", run.get("note") or ""])
            continue
        ratio = _ratio(run["median_ms"] / best) if best else "—"
        label = f"{name} → {point['auto_backend']}" if name == "auto" and point["auto_backend"] else name
        row = [label, _ms(run["mean_ms"]), _ms(run["median_ms"]), _ms(run["p90_ms"]), _memory(run["peak_bytes"]), ratio]
        rows.append(row + (extra(name) if extra else []))
    return rows


def _forward(results: dict) -> list[str]:
    lines = []
    for point in results["forward"]:
        lines += ["", f"**{point['label']}** ({point['num_tokens']} tokens)", ""]
        header = ["Implementation", "Mean", "Median", "P90 latency", "Peak Mem", "vs best fixed"]
        lines += _table(header, _contender_rows(point))
    return lines


def _generation(results: dict) -> list[str]:
    generation = results["generation"]
    new_tokens = generation["new_tokens"]
    default = generation["runs"].get("grouped_mm", {}).get("median_ms")

    def extra(name: str) -> list[str]:
        median = generation["runs"][name]["median_ms"]
        per_token = _ms(median / new_tokens)
        versus_default = _ratio(median / default) if default else "—"
        same = generation["same_tokens_as_eager"].get(name)
        return [per_token, versus_default, {True: "yes", False: "no", None: "—"}[same]]

    header = ["Implementation", "Mean", "Median", "P90 latency", "Peak Mem", "vs best fixed", "per new token",
              "vs default (grouped_mm)", "same tokens as eager"]  # fmt: skip
    device_type = results["machine"]["device_type"]
    switch = (
        "On this GPU Transformers' default switches grouped_mm to batched_mm for the decode steps."
        if device_type == "cuda"
        else "On CPU Transformers keeps grouped_mm for decoding (its switch to batched_mm applies on GPUs only)."
    )
    decisions = ", ".join(f"{b}: {n}" for b, n in generation["auto_decisions"].items())
    return [
        f"`{generation['label']}`: greedy, {new_tokens} new tokens, median of the timed rounds. {switch}",
        f"auto's choices in one call (per layer): {decisions}.",
        "",
        *_table(header, _contender_rows(generation, extra)),
    ]


def _range(first: int, last: int | None) -> str:
    return str(first) if first == last else f"{first}–{'∞' if last is None else last}"


def _serve(serve: dict, plot: str | None = None) -> list[str]:
    """The serve part: the trace, how continuous batching ran it, each contender, and the steps' sizes and backends."""
    if "skipped" in serve:
        return [f"Skipped: {serve['skipped']}."]
    trace, batching, steps = serve["trace"], serve["continuous_batching"], serve["steps"]
    tune = serve["tune"]
    contenders = serve["contenders"]
    max_batch_tokens = batching["max_batch_tokens"]
    step_bound = "Transformers' default" if max_batch_tokens is None else str(max_batch_tokens)
    regions = _regions_text(serve["auto_regions"])
    crossovers = "; ".join(f"{c['from']} → {c['to']} at {c['tokens']} tokens" for c in serve["crossovers"]) or "none"
    lines = [
        f"Trace: {trace['requests']} requests (seed {trace['seed']}), prompts of "
        f"{_range(*trace['prompt_lengths_range'])} tokens drawn log-uniform ({trace['prompt_tokens']} prompt tokens), "
        f"{_range(*trace['new_tokens_range'])} new tokens each ({trace['generated_tokens']} generated), greedy with "
        "no end-of-sequence token. Transformers' "
        f"continuous batching with max_batch_tokens {step_bound} and a KV cache of {batching['num_blocks']} blocks of "
        f"{batching['page_size']} tokens (set through its {batching['applied_through']}), every request queued before "
        f"its loop starts: {steps['count']} steps of 1 forward each, the same for every contender: "
        f"{'yes' if steps['same_for_every_contender'] else 'no'}.",
        "",
        f"auto was tuned in place (`autoexperts.tune`) on one serving of a separate warm-up trace of "
        f"{serve['warmup_trace']['requests']} requests (seed {serve['warmup_trace']['seed']}) in "
        f"**{tune['wall_seconds']:.1f} s** (the warm-up serving included); its table: {regions}; crossovers: "
        f"{crossovers}. The measured trace's {spans_crossovers(serve)}. Transformers' default here is "
        f"{serve['default_backend']}.",
        "",
    ]
    best = serve["best_fixed"]
    best_ms = contenders[best]["median_ms"] if best else None
    default_ms = contenders.get("default", {}).get("median_ms")
    rows = []
    for name, run in contenders.items():
        same = {True: "yes", False: "no", None: "—"}[serve["same_tokens_as_eager"].get(name)]
        label = f"default → {run['same_as']}" if name == "default" and run.get("same_as") else name
        if run["median_ms"] is None:
            rows.append([label, run["status"], "", "", "", "", "", "", "", same, run.get("note") or ""])
            continue
        tokens_per_second = run["tokens_per_second"]
        rows.append([
            label, _ms(run["median_ms"]), _ms(run["serving_median_ms"]), _ms(run["mean_ms"]), _ms(run["p90_ms"]),
            f"{tokens_per_second:.1f}" if tokens_per_second else "—", _memory(run["peak_bytes"]),
            _ratio(run["median_ms"] / best_ms) if best_ms else "—",
            _ratio(run["median_ms"] / default_ms) if default_ms else "—", same, run.get("note") or "",
        ])  # fmt: skip
    header = ["Implementation", "Median wall", "of which serving", "Mean", "P90", "tokens/s", "Peak Mem",
              "vs best fixed", "vs default", "same tokens as eager", "note"]  # fmt: skip
    lines += _table(header, rows)
    if "round_orders" in serve:  # recorded since the first committed run
        lines += [
            "",
            f"Round orders: {'; '.join(', '.join(order) for order in serve['round_orders'])}. Load average (1, 5, "
            f"15 min) at the part's start {serve['load_average_at_start']}, at its end {serve['load_average_at_end']} "
            "(the machine's other work slows whole servings).",
        ]
    lines += [
        "",
        f"auto / best fixed ({best or '—'}): **{_ratio(serve['auto_over_best_fixed'])}**; auto / Transformers' "
        f"default: **{_ratio(serve['auto_over_default'])}** (medians of the timed rounds of whole servings, each "
        "round in a new order after one untimed serving per contender; a whole serving, like one `generate_batch` "
        "call, also creates the KV cache and the loop's thread and stops them, while *of which serving* runs from the "
        "loop's start to the last request's result).",
    ]
    if serve.get("memory_note"):
        lines += ["", f"Peak memory: not measured ({serve['memory_note']})."]
    calls = {(b["first"], b["last"]): b["calls"] for b in serve["auto_backends"]}
    backends = sorted({backend for c in calls.values() for backend in c})
    rows = [
        [_range(b["first"], b["last"]), str(b["steps"]), str(b["tokens"])]
        + [str(calls.get((b["first"], b["last"]), {}).get(backend, 0)) for backend in backends]
        for b in steps["histogram"]
    ]
    lines += [
        "",
        f"Step sizes of the trace and auto's backends (experts calls: {serve['auto_decisions']}, one per step and "
        f"experts layer, {serve['experts_layers']} layers):",
        "",
        *_table(["step tokens", "steps", "tokens", *(f"auto → {b}" for b in backends)], rows),
    ]
    if plot:
        lines += ["", f"![steps by size and auto's backend; wall time per contender]({plot.rsplit('/', 1)[-1]})"]
    return lines


def model_label(results: dict) -> str:
    """The model's name for titles: a preset's or Hub id as given, a local config folder by its own name (not the
    absolute path of the machine that ran it)."""
    model = results["model"]
    return Path(model["name"]).name if model.get("kind") == "local" else model["name"]


def markdown_report(results: dict) -> str:
    """The report: the headline figures, then each part's tables, then the decision table and the plot."""
    machine, versions, layer = results["machine"], results["versions"], results["layer"]
    calibration = results["calibration"]
    title = f"{model_label(results)} on {machine['device']} ({results['dtype']}, compile {results['compile_mode']})"
    lines = [
        f"# autoexperts bench: {title}",
        "",
        f"- machine: {machine['device']} ({machine['device_type']}; CPU {machine['cpu']}, {machine['cpu_count']} "
        f"cores, {machine['torch_threads']} torch threads); torch {versions['torch']}, transformers "
        f"{versions['transformers']}, autoexperts {versions['autoexperts']}; {results['created']}",
        f"- experts layer: {layer['experts_class']}, {layer['num_experts']} experts, hidden_dim {layer['hidden_dim']}, "
        f"intermediate_dim {layer['intermediate_dim']}, top_k {layer['top_k']}",
        f"- routing of the layer sweep's inputs: {results.get('routing', {}).get('description', 'uniform')}",
        f"- memory budget {_memory(results['budget_bytes'])}; fixed backends predicted above "
        f"{_memory(results['memory_limit_bytes'])} are not run",
    ]
    if results.get("command"):
        lines.append(f"- command: `{results['command']}`")
    lines += ["", "## Summary", "", *_headline(results), *_diagnosis(results)]
    if "layer_sweep" in results:
        lines += [
            "",
            "## 1. Layer sweep at token counts not in the calibration grid",
            "",
            *_sweep(results["layer_sweep"]),
        ]
    if "forward" in results:
        bench = results["model_bench"]
        lines += ["", f"## 2. Model forward ({bench['layers']} layers, vocabulary {bench['vocab_size']}, no KV cache)"]
        lines += _forward(results)
    if "generation" in results:
        lines += ["", "## 3. generate()", "", *_generation(results)]
    if "overhead" in results:
        overhead = results["overhead"]
        lines += [
            "",
            "## 4. Dispatch overhead (cached decision)",
            "",
            f"- whole auto path with a no-op backend, minus a direct no-op call: **{overhead['auto_path_us']:.2f} µs**",
            f"- the lookup alone: {overhead['lookup_us']:.2f} µs",
            f"- auto minus a direct {overhead['backend']} call at 1 token ({overhead['direct_call_us']:.1f} µs per "
            f"call): {overhead['auto_minus_direct_us']:.2f} µs (difference of two noisy times)",
        ]
    lines += ["", "## 5. Calibration", ""]
    if calibration.get("wall_seconds") is not None:
        lines.append(
            f"`autoexperts calibrate` took **{calibration['wall_seconds']:.1f} s** wall (the sweep itself "
            f"{calibration['sweep_seconds']:.1f} s) over {len(calibration['grid'])} token counts."
        )
    else:
        lines.append(f"Reused the profile {calibration['profile']} (calibration not timed).")
    lines += ["", "Decision table auto built from it (under this run's budget):", ""]
    rows = [
        [f"{r['first']} – {'∞' if r['last'] is None else r['last']}", r["backend"], r["source"]]
        for r in calibration["regions"]
    ]
    lines += _table(["tokens", "backend", "source"], rows)
    plot = results.get("files", {}).get("plot")
    if plot:
        name = plot.rsplit("/", 1)[-1]
        lines += ["", f"![latency against token count]({name})"]
    if "serve" in results:
        plot = results.get("files", {}).get("serve")
        lines += ["", "## 6. Continuous batching", "", *_serve(results["serve"], plot)]
    return "\n".join(lines) + "\n"
