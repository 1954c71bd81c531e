"""`run_benchmark()`: calibrate, then time `auto` against every fixed backend, and write JSON, Markdown and a plot.

The parts, all in this one process except the calibration (timed as the command a user runs): calibration cost,
layer sweep at held-out token counts, model forwards, `generate()`, dispatch overhead, and (asked for by name)
Transformers' continuous batching on a request trace, with `auto` tuned in place.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import json
import logging
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import dispatch, settings
from ..calibration.experts_layer import build_experts_layer
from ..calibration.model_source import ModelSource, resolve_model
from ..calibration.routing import Routing
from ..calibration.run import SWEEP_MEMORY_FRACTION, resolve_device, resolve_dtype, runnable_for_shape
from ..choices import BENCH_PARTS, CALIBRATION_MODES, DEFAULT_BENCH_PARTS, NONE
from ..device import cpu_model_name, device_name, device_slug, free_memory_bytes
from ..dispatch import decision_table
from ..errors import UsageError
from ..freshness import library_versions
from ..profile import Profile, find_profile
from ..report import profile_table
from ..store import search_dirs
from .analysis import FIXED_BACKENDS, choice_totals, headline_figures, sweep_summary
from .layer_sweep import MemoryGuard, TimingOptions, held_out_tokens, run_layer_sweep
from .model_bench import FORWARD_MIN_ROUNDS, build_bench_model, forward_points, run_forward_points, run_generation
from .overhead import measure_dispatch_overhead
from .serve import ServeSetup, TraceSpec, run_serve

logger = logging.getLogger(__name__)


@dataclass
class BenchOptions:
    """What to benchmark and how long to spend on it (the `autoexperts bench` options)."""

    model: str | None = None
    device: str | None = None
    dtype: str | None = None
    compile_mode: str = NONE
    out: Path = Path("autoexperts-bench")
    profile_dir: Path | None = None  # reuse the profiles there instead of calibrating (no calibration cost then)
    sweep_tokens: list[int] | None = None  # default: held out from the calibration grid
    parts: tuple[str, ...] = DEFAULT_BENCH_PARTS
    layers: int = 2
    vocab_size: int = 1024
    long_prefill: int = 2048
    batch: int = 1
    prompt_length: int = 128
    new_tokens: int = 32
    generate_rounds: int = 3  # timed rounds per contender of generate() and of the serve part
    forward_rounds: int = FORWARD_MIN_ROUNDS  # the fewest interleaved rounds per forward point
    # The serve part's request trace and the most tokens one continuous-batching step may take (None: Transformers'
    # default).
    requests: int = 64
    serve_prompt_lengths: tuple[int, int] = (16, 1024)
    serve_new_tokens: tuple[int, int] = (16, 128)
    max_batch_tokens: int | None = None
    seconds_per_point: float = 1.0
    calibration_seconds_per_point: float = 0.6
    progress: bool = True
    # On CPU, glibc's allocator thresholds are pinned in this process (`--pin-allocator`), and so in its calibration.
    pin_allocator: bool = False
    # The distribution the calibration and the layer sweep draw experts from (default: uniform).
    routing: Routing | None = None
    # A folder whose profile for the layer has its picks read off the same sweep timings (default, with a routing
    # other than uniform: the uniform calibration's folder beside this one).
    compare_profile_dir: Path | None = None


@contextlib.contextmanager
def _reading_profiles_from(folder: Path):
    """Points `auto` at `folder` for the benchmark (its tables are rebuilt on entry and exit)."""
    previous = os.environ.get(settings.PROFILE_DIR_ENV)
    os.environ[settings.PROFILE_DIR_ENV] = str(folder)
    dispatch.reset()
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(settings.PROFILE_DIR_ENV, None)
        else:
            os.environ[settings.PROFILE_DIR_ENV] = previous
        dispatch.reset()


def _calibrate(options: BenchOptions, device: torch.device, dtype: torch.dtype, folder: Path) -> float:
    """Runs `autoexperts calibrate` as a user would (its progress bar on stderr) and returns its wall time."""
    command = [
        sys.executable, "-m", "autoexperts", "calibrate", "--model", options.model or "small-moe",
        "--device", str(device), "--dtype", str(dtype).removeprefix("torch."), "--out", str(folder),
        "--seconds-per-point", str(options.calibration_seconds_per_point),
    ]  # fmt: skip
    if options.compile_mode != NONE:
        command += ["--compile", options.compile_mode]
    if options.routing is not None and not options.routing.is_uniform:
        command += ["--routing", options.routing.text()]
    if not options.progress:
        command.append("--no-progress")
    if options.pin_allocator:  # as this process: the crossovers measured there must hold here
        command.append("--pin-allocator")
    logger.info("calibrating: %s", " ".join(command))
    started = time.perf_counter()
    completed = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    elapsed = time.perf_counter() - started
    if completed.returncode != 0:
        raise UsageError(f"calibration failed (exit status {completed.returncode}); its error is above")
    return elapsed


def _model_label(source: ModelSource) -> str:
    """A file-name-safe model name: the preset, the Hub id with `--` for `/`, or a local folder's own name."""
    if source.kind == "local":
        path = Path(source.name)
        return path.parent.name if path.name == "config.json" else path.name
    return source.name.replace("/", "--")


def _machine(device: torch.device) -> dict:
    machine = {
        "device": device_name(device),
        "device_type": device.type,
        "cpu": cpu_model_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        machine |= {"gpu_memory_bytes": properties.total_memory, "cuda": torch.version.cuda}
    return machine


# Every contender at every decision region is a graph of its own: room for all of them, so that no point falls
# back to uncompiled code after Dynamo's default limit of 8 recompilations.
_BENCH_RECOMPILE_LIMIT = 64


def _compile_wrapper(mode: str):
    """`fn -> compiled fn` for experts calls in `mode` (identity for `"none"`), with dynamic token counts."""
    if mode == NONE:
        return lambda fn: fn
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, _BENCH_RECOMPILE_LIMIT)

    def wrap(fn):
        compiled = torch.compile(fn, dynamic=True, mode=None if mode == "default" else mode)

        def call(module, hidden_states, top_k_index, top_k_weights):
            # Only the token count varies, as inside a compiled model (hidden_dim and top_k are fixed there).
            for tensor in (hidden_states, top_k_index, top_k_weights):
                torch._dynamo.mark_static(tensor, 1)
            return compiled(module, hidden_states, top_k_index, top_k_weights)

        return call

    return wrap


def _compiled_model(model: torch.nn.Module, mode: str):
    if mode == NONE:
        return model
    return torch.compile(model, dynamic=True, mode=None if mode == "default" else mode)


def run_benchmark(options: BenchOptions) -> dict:
    """Runs the benchmark (see the module docstring) and writes `<out>/<device>/<model>-<dtype>-<compile>.{json,md,
    png}`; returns the results (as written to the JSON), with the written paths under `"files"`.
    """
    if options.compile_mode not in CALIBRATION_MODES:
        raise UsageError(f"unknown compile mode {options.compile_mode!r}: use {', '.join(CALIBRATION_MODES)}")
    unknown = set(options.parts) - set(BENCH_PARTS)
    if unknown:
        raise UsageError(f"unknown benchmark part(s) {', '.join(sorted(unknown))}: use {', '.join(BENCH_PARTS)}")
    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    source = resolve_model(options.model)
    routing = options.routing or Routing()
    folder = Path(options.out).expanduser() / device_slug(device_name(device))
    stem = f"{_model_label(source)}-{str(dtype).removeprefix('torch.')}-{options.compile_mode}"
    if not routing.is_uniform:
        stem += f"-routing-{routing.slug()}"
    folder.mkdir(parents=True, exist_ok=True)

    if not routing.is_uniform:  # a routing file without a layer of this shape stops here, before calibrating
        spec = build_experts_layer(source.config, torch.device("meta"), dtype).spec
        routing = routing.for_shape(spec.num_experts, spec.top_k)
    calibration: dict = {}
    # Calibrated profiles stay with the machine's results, in the layout of the shipped profiles/ folder; one folder
    # per routing, since a profile is identified by its layer (the latest calibration of a layer replaces the last).
    uniform_profiles = folder / "profiles"
    routed_profiles = uniform_profiles if routing.is_uniform else folder / f"profiles-routing-{routing.slug()}"
    profile_dir = Path(options.profile_dir).expanduser() if options.profile_dir else routed_profiles
    if options.profile_dir is None:
        calibration["wall_seconds"] = _calibrate(options, device, dtype, profile_dir)

    results: dict = {
        "kind": "autoexperts-bench",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["autoexperts", *sys.argv[1:]]) if sys.argv[1:2] == ["bench"] else None,
        "model": source.describe(),
        "dtype": str(dtype).removeprefix("torch."),
        "compile_mode": options.compile_mode,
        "machine": _machine(device),
        "versions": library_versions(),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()},
    }
    timing = TimingOptions(seconds_per_point=options.seconds_per_point)
    wrap = _compile_wrapper(options.compile_mode)
    with _reading_profiles_from(profile_dir):
        layer = build_experts_layer(source.config, device, dtype)
        profile = find_profile(layer.spec, device_name(device), options.compile_mode, [profile_dir])
        if profile is None:
            raise UsageError(f"no profile for {layer.spec.describe()} ({options.compile_mode}) in {profile_dir}")
        profile_routing = Routing.from_json(profile.metadata.get("sweep", {}).get("routing"))
        if profile_routing.text() != routing.text():
            logger.warning("the profile %s was measured with routing %s, the benchmark draws %s",
                           profile.json_path, profile_routing.text(), routing.text())  # fmt: skip
        results["routing"] = routing.to_json()
        budget = dispatch.memory_budget_bytes(device)
        memory_limit = SWEEP_MEMORY_FRACTION * free_memory_bytes(device)
        calibration |= _calibration_record(profile, budget)
        results |= {"layer": layer.spec.shape_fields(), "calibration": calibration, "budget_bytes": budget}
        results["memory_limit_bytes"] = memory_limit
        guard = MemoryGuard(profile.cost_model, memory_limit, layer.spec.expert_bytes, layer.spec.top_k)

        sweep_tokens = options.sweep_tokens or held_out_tokens(profile.metadata["sweep"]["tokens"])
        points = forward_points(options.long_prefill)
        steps = len(sweep_tokens) * ("sweep" in options.parts) + len(points) * ("forward" in options.parts)
        steps += ("generate" in options.parts) + ("overhead" in options.parts) + ("serve" in options.parts)
        with tqdm(total=steps, disable=not options.progress, desc="benchmark", unit="step") as bar:
            if "overhead" in options.parts:
                bar.set_postfix_str("dispatch overhead")
                results["overhead"] = measure_dispatch_overhead(layer, device, dtype)
                bar.update()
            if "sweep" in options.parts:
                bar.set_postfix_str("layer sweep")
                sweep = run_layer_sweep(
                    layer, device, dtype, sweep_tokens, guard, timing, wrap, bar.update,
                    options.compile_mode, routing,
                )  # fmt: skip
                results["layer_sweep"] = {
                    "points": [p.to_json() for p in sweep],
                    "summary": sweep_summary(sweep),
                }
                compared = _device_model_comparison(layer, device, options.compile_mode, profile_dir, sweep)
                if compared is not None:
                    results["layer_sweep"]["device_model"] = compared
                compare_dir = options.compare_profile_dir or (None if routing.is_uniform else uniform_profiles)
                other = _profile_comparison(layer, device, options.compile_mode, profile, compare_dir, sweep)
                if other is not None:
                    results["layer_sweep"]["compared_profile"] = other
            table = decision_table(layer.module, device, layer.spec.top_k, options.compile_mode)
            del layer
            gc.collect()
            if {"forward", "generate", "serve"} & set(options.parts):
                model = build_bench_model(source.config, device, dtype, options.layers, options.vocab_size)
                results["model_bench"] = {"layers": options.layers, "vocab_size": options.vocab_size}
                if "forward" in options.parts:
                    bar.set_postfix_str("model forward")
                    runner = _compiled_model(model, options.compile_mode)
                    forward_timing = replace(
                        timing,
                        min_repeats=options.forward_rounds,
                        max_repeats=max(timing.max_repeats, options.forward_rounds),
                    )
                    forward = run_forward_points(
                        model, points, device, guard, forward_timing, bar.update, call=runner,
                        choice_for=lambda n: table.region_for(n).backend,
                    )  # fmt: skip
                    results["forward"] = [p.to_json() for p in forward]
                if "generate" in options.parts:
                    bar.set_postfix_str("generate()")
                    generation = run_generation(
                        model, device, options.batch, options.prompt_length, options.new_tokens,
                        options.generate_rounds, guard,
                    )  # fmt: skip
                    results["generation"] = generation.to_json()
                    bar.update()
                if "serve" in options.parts:
                    bar.set_postfix_str("continuous batching")
                    results["serve"] = _serve(options, model, device, folder, guard)
                    bar.update()
                del model
                gc.collect()
    results["headline"] = headline_figures(results)
    results["files"] = _write(results, folder, stem, profile)
    return results


def _serve(options: BenchOptions, model, device: torch.device, folder: Path, guard: MemoryGuard) -> dict:
    """The serve part, with `auto` tuned into `<folder>/profiles-serve-tuned`: a folder of its own, so that the
    profile this run calibrated (or reused) stays as the report's calibration section describes it."""
    if options.compile_mode != NONE:
        reason = "continuous batching is benchmarked uncompiled only"
        logger.warning("serve part skipped: %s", reason)
        return {"skipped": reason}
    spec = TraceSpec(options.requests, tuple(options.serve_prompt_lengths), tuple(options.serve_new_tokens))
    setup = ServeSetup(
        max_batch_tokens=options.max_batch_tokens,
        rounds=options.generate_rounds,
        guard=guard,
        tune_folder=folder / "profiles-serve-tuned",
        tune_seconds_per_point=options.calibration_seconds_per_point,
        progress=options.progress,
        reading_profiles_from=_reading_profiles_from,
    )
    return run_serve(model, device, spec, setup)


def _device_model_comparison(layer, device: torch.device, compile_mode: str, profile_dir: Path, sweep) -> dict | None:
    """`auto` with the device model beside `auto` with the exact profile on the layer sweep: the backend the device
    model's table picks at each point and both choosers' totals from the same measured medians (`None` when no device
    model of this device, dtype and mode is found in `profile_dir` or the usual profile folders)."""
    from ..device_profile import find_device_profile
    from ..selection import device_model_table, runnable_backends

    spec = layer.spec
    found = find_device_profile(device_name(device), spec.dtype, compile_mode, [profile_dir, *search_dirs()])
    if found is None:
        return None
    # The backends auto may run here and the budget of the exact profile's table: the two differ only in predictions.
    candidates = runnable_for_shape(spec, runnable_backends(list(FIXED_BACKENDS), compile_mode, device.type))
    budget = decision_table(layer.module, device, spec.top_k, compile_mode).budget_bytes
    predicted = device_model_table(spec, found.model.for_spec(spec), candidates, budget)
    picks = [predicted.region_for(p.num_tokens).backend for p in sweep]
    totals = choice_totals(sweep, {"device_model": picks, "profile": [p.auto_backend for p in sweep]})
    return {
        "path": str(found.json_path),
        "form": found.model.form,
        "picks": picks,
        "regions": [
            {"first": r.first, "last": None if r.last == float("inf") else int(r.last), "backend": r.backend}
            for r in predicted.regions
        ],
        "totals": totals,
    }


def _profile_comparison(layer, device, compile_mode: str, profile: Profile, folder: Path | None, sweep) -> dict | None:
    """`auto` with another profile of the same layer (e.g. one calibrated with another routing) beside `auto` with
    the benchmark's own: the backend the other profile's table picks at each point and both choosers' totals, read off
    the same measured medians (`None` without a folder, or without a profile of the layer there)."""
    if folder is None:
        return None
    other = find_profile(layer.spec, device_name(device), compile_mode, [folder])
    if other is None or other.json_path.resolve() == profile.json_path.resolve():
        logger.info("no other profile of %s in %s to compare with", layer.spec.describe(), folder)
        return None
    budget = decision_table(layer.module, device, layer.spec.top_k, compile_mode).budget_bytes
    table = profile_table(other, budget)
    picks = [table.region_for(p.num_tokens).backend for p in sweep]
    totals = choice_totals(sweep, {"profile": [p.auto_backend for p in sweep], "compared": picks})
    return {
        "path": str(other.json_path),
        "routing": Routing.from_json(other.metadata.get("sweep", {}).get("routing")).to_json(),
        "picks": picks,
        "regions": _regions(table),
        "totals": totals,
    }


def _regions(table) -> list[dict]:
    return [
        {"first": r.first, "last": None if r.last == float("inf") else int(r.last), "backend": r.backend,
         "source": r.source}
        for r in table.regions
    ]  # fmt: skip


def _calibration_record(profile: Profile, budget: float) -> dict:
    table = profile_table(profile, budget)
    return {
        "profile": str(profile.json_path),
        "routing": profile.metadata.get("sweep", {}).get("routing"),
        "sweep_seconds": profile.metadata.get("sweep", {}).get("wall_seconds"),
        "grid": profile.metadata.get("sweep", {}).get("tokens"),
        "regions": _regions(table),
        "measurements": [m.to_json() for m in profile.measurements],
    }


def _write(results: dict, folder: Path, stem: str, profile: Profile) -> dict:
    from .plot import write_plot, write_serve_plot
    from .report import markdown_report

    json_path, markdown_path, plot_path = (folder / f"{stem}.{suffix}" for suffix in ("json", "md", "png"))
    files = {"json": str(json_path), "markdown": str(markdown_path)}
    if write_plot(results, plot_path):
        files["plot"] = str(plot_path)
    serve_plot_path = folder / f"{stem}-serve.png"
    if write_serve_plot(results, serve_plot_path):
        files["serve"] = str(serve_plot_path)
    results["files"] = files
    json_path.write_text(json.dumps(results, indent=1, default=str) + "\n", encoding="utf-8")
    markdown_path.write_text(markdown_report(results), encoding="utf-8")
    return files
