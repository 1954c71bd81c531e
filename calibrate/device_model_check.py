"""How well a device model picks for shapes it never saw: the presets' real shapes, scaled like the design shapes.

For each preset, its experts layer (its own Transformers class) is scaled to the device model's weight limit the way
`calibration.design.scale_to_fit` scales a design shape, and every backend is timed at token counts off any grid
(the geometric midpoints of the default grid, up to the design's longest call), interleaved in shuffled rounds
after a warm-up. At each count three choices are read off:

- `device_model`: the decision table the device model predicts for the shape (what `auto` runs without a profile);
- `fallback`: the fallback rule's table (what `auto` ran before there were device models);
- `oracle`: the backend measured fastest there.

Per shape, each choice's *total* is the sum of the measured medians of the backends it picked; the verdict is
`device_model total / oracle total` (target ≤ 1.05 median, ≤ 1.10 worst) and whether it is never above the fallback's.

Run it as `python calibrate/device_model_check.py --profile-dir DIR [--dtype T] [--out FILE]`.

With `--against-profiles DIR`, nothing is timed: the truth is the measurements of the exact-shape profiles in `DIR`
(real, unscaled shapes calibrated on the same device), at every count they measured. This checks a device model of a
machine that is no longer at hand, e.g. a GPU's, from its calibration files alone. A choice the calibration had
stopped timing there costs `cost_model.SLOW_FACTOR` times the fastest; a choice that failed or ran out of memory
there costs infinity (`analysis.pick_ms`).
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig

from autoexperts.bench.analysis import pick_ms
from autoexperts.bench.layer_sweep import held_out_tokens
from autoexperts.calibration.design import GATED, TRANSPOSED_BIAS, UNGATED, DesignShape, scale_to_fit, token_counts
from autoexperts.calibration.experts_layer import ExpertsLayer, build_experts_layer, routed_inputs
from autoexperts.calibration.run import resolve_device, resolve_dtype, runnable_for_shape
from autoexperts.choices import NONE
from autoexperts.cost_model import SLOW_FACTOR
from autoexperts.device import device_name
from autoexperts.device_profile import DeviceProfile, find_device_profile
from autoexperts.layer import DEFAULT_BACKENDS, LayerSpec, backend_forward
from autoexperts.presets import PRESETS
from autoexperts.selection import device_model_table, fallback_table, runnable_backends
from autoexperts.timing import interleaved_rounds, repeats_for, timed_call_ms

from checks import measured_by_tokens, write_result

logger = logging.getLogger(__name__)

MEDIAN_TARGET, WORST_TARGET = 1.05, 1.10


@dataclass
class ShapeCheck:
    """One held-out shape's measurements and choices."""

    preset: str
    spec: LayerSpec
    scale: int
    points: list[dict] = field(default_factory=list)

    def total(self, choice: str) -> float:
        return sum(p["median_ms"][p[choice]] for p in self.points)

    def summary(self) -> dict:
        oracle = self.total("oracle")
        fixed = {
            b: sum(p["median_ms"][b] for p in self.points) / oracle
            for b in DEFAULT_BACKENDS
            if all(b in p["median_ms"] for p in self.points)
        }
        return {
            "preset": self.preset,
            "scale": self.scale,
            "shape": _shape_fields(self.spec),
            "tokens": [p["tokens"] for p in self.points],
            "device_model_over_oracle": self.total("device_model") / oracle,
            "fallback_over_oracle": self.total("fallback") / oracle,
            "fixed_over_oracle": fixed,
            "points": self.points,
        }


def _shape_fields(spec: LayerSpec) -> dict:
    return {
        "experts_class": spec.experts_class,
        "num_experts": spec.num_experts,
        "hidden_dim": spec.hidden_dim,
        "intermediate_dim": spec.intermediate_dim,
        "top_k": spec.top_k,
        "has_gate": spec.has_gate,
        "is_transposed": spec.is_transposed,
        "has_bias": spec.has_bias,
    }


def _layout(spec: LayerSpec) -> str:
    if spec.is_transposed:
        return TRANSPOSED_BIAS
    return GATED if spec.has_gate else UNGATED


def scaled_preset_layer(
    name: str, device: torch.device, dtype: torch.dtype, weight_limit_bytes: float
) -> tuple[ExpertsLayer, int]:
    """The preset's experts layer with hidden and intermediate sizes divided by the power of two that fits
    `weight_limit_bytes` (as a design shape is), and that factor."""
    preset = PRESETS[name]
    config = AutoConfig.for_model(preset["model_type"], **preset["config"])
    full = build_experts_layer(config, torch.device("meta"), dtype).spec
    shape = DesignShape(full.num_experts, full.hidden_dim, full.intermediate_dim, full.top_k, _layout(full))
    dtype_name = str(dtype).removeprefix("torch.")
    scaled = scale_to_fit(shape, dtype_name, weight_limit_bytes)
    factor = round(full.hidden_dim / scaled.hidden_dim)
    if factor > 1:
        fields = [f for f in ("moe_intermediate_size", "intermediate_size") if getattr(config, f, None)]
        field_name = next(f for f in fields if getattr(config, f) == full.intermediate_dim)
        config = AutoConfig.for_model(
            preset["model_type"],
            **{**preset["config"], "hidden_size": scaled.hidden_dim, field_name: scaled.intermediate_dim},
        )
    layer = build_experts_layer(config, device, dtype, seed=7)
    got = (layer.spec.hidden_dim, layer.spec.intermediate_dim)
    if got != (scaled.hidden_dim, scaled.intermediate_dim):
        raise RuntimeError(f"{name}: scaled to {got}, expected {(scaled.hidden_dim, scaled.intermediate_dim)}")
    return layer, factor


def check_shape(
    layer: ExpertsLayer,
    preset: str,
    factor: int,
    device_profile: DeviceProfile,
    device: torch.device,
    dtype: torch.dtype,
    tokens: list[int],
    budget_bytes: float,
    seconds_per_point: float,
) -> ShapeCheck:
    """Times every backend at `tokens` on `layer` and records the device model's, the fallback's and the oracle's
    choice at each count."""
    spec = layer.spec
    candidates = runnable_for_shape(spec, runnable_backends(list(DEFAULT_BACKENDS), NONE, device.type))
    predicted = device_model_table(spec, device_profile.model.for_spec(spec), candidates, budget_bytes)
    fallback = fallback_table(spec, candidates, budget_bytes)
    calls = {b: backend_forward(b, type(layer.module)) for b in candidates}
    check = ShapeCheck(preset, spec, factor)
    slow_streak = dict.fromkeys(candidates, 0)
    for n in tokens:
        choices = {"device_model": predicted.region_for(n).backend, "fallback": fallback.region_for(n).backend}
        timed = [b for b in candidates if slow_streak[b] < 2 or b in choices.values()]
        inputs = routed_inputs(spec, n, device, dtype, seed=11)  # neither the calibration's seed nor the bench's
        active = {b: (lambda call=calls[b], inputs=inputs: call(layer.module, *inputs)) for b in timed}
        with torch.inference_mode():
            warm = sum(timed_call_ms(call, device) for call in active.values())
            repeats = repeats_for(warm, seconds_per_point, 3, 15)
            samples = interleaved_rounds(active, device, repeats, seed=n)
        medians = {b: statistics.median(times) for b, times in samples.items()}
        fastest = min(medians.values())
        for b in candidates:
            slow_streak[b] = slow_streak[b] + 1 if medians.get(b, math.inf) >= SLOW_FACTOR * fastest else 0
        oracle = min(medians, key=medians.get)
        check.points.append({"tokens": n, "median_ms": medians, "oracle": oracle, **choices})
    return check


def _measured_check(profile, device_profile: DeviceProfile, budget_bytes: float) -> ShapeCheck:
    """The choices of the device model and the fallback rule on one exact-shape profile's own measurements."""
    spec = profile.spec
    measured = {m.backend for m in profile.measurements}
    candidates = [b for b in runnable_backends(list(DEFAULT_BACKENDS), profile.compile_mode, spec.device_type)
                  if b in measured]  # fmt: skip
    predicted = device_model_table(spec, device_profile.model.for_spec(spec), candidates, budget_bytes)
    fallback = fallback_table(spec, candidates, budget_bytes)
    check = ShapeCheck(profile.metadata.get("model", {}).get("name") or spec.experts_class, spec, 1)
    for n, points in measured_by_tokens(profile.measurements).items():
        if not set(candidates) <= set(points):  # a crossover's refined count: only its two contenders were timed
            continue
        choices = {"device_model": predicted.region_for(n).backend, "fallback": fallback.region_for(n).backend}
        medians = {b: pick_ms(points, b) for b in {*points, *choices.values()}}
        check.points.append({"tokens": n, "median_ms": medians, "oracle": min(medians, key=medians.get), **choices})
    return check


def run_measured_check(device_model_path: Path, profiles_dir: Path) -> dict:
    """Checks a device model against every exact-shape profile of its device, dtype and compile mode in
    `profiles_dir` (see the module docstring); nothing is timed."""
    from autoexperts.device_profile import load_device_profile
    from autoexperts.profile import load_profile
    from autoexperts.store import profile_files

    device_profile = load_device_profile(device_model_path)
    budget = device_profile.metadata["sweep"]["memory_limit_bytes"]
    shapes = []
    for path in profile_files([profiles_dir]):
        profile = load_profile(path)
        same = (profile.device_name, profile.spec.dtype, profile.compile_mode) == (
            device_profile.device_name, device_profile.dtype, device_profile.compile_mode,
        )  # fmt: skip
        if same:
            shapes.append(_measured_check(profile, device_profile, budget).summary())
    if not shapes:
        raise SystemExit(f"no profile of {device_profile.device_name}, {device_profile.dtype} under {profiles_dir}")
    return _verdict(device_profile, sorted(shapes, key=lambda s: s["preset"]), source=str(profiles_dir))


def _verdict(device_profile: DeviceProfile, shapes: list[dict], source: str) -> dict:
    ratios = [s["device_model_over_oracle"] for s in shapes]
    return {
        "device": device_profile.device_name,
        "dtype": device_profile.dtype,
        "device_model": str(device_profile.json_path),
        "truth": source,
        "form": device_profile.model.form,
        "versions": device_profile.metadata.get("versions", {}),
        "median_over_oracle": statistics.median(ratios),
        "worst_over_oracle": max(ratios),
        "never_worse_than_fallback": all(
            s["device_model_over_oracle"] <= s["fallback_over_oracle"] * (1 + 1e-9) for s in shapes
        ),
        "targets": {"median": MEDIAN_TARGET, "worst": WORST_TARGET},
        "shapes": shapes,
    }


def run_check(
    profile_dir: Path,
    device: str | None,
    dtype: str | None,
    presets: list[str],
    seconds_per_point: float = 0.3,
) -> dict:
    """Checks the device model in `profile_dir` for this device and dtype on every preset of `presets`."""
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype or ("bfloat16" if torch_device.type == "cuda" else "float32"))
    dtype_name = str(torch_dtype).removeprefix("torch.")
    name = device_name(torch_device)
    device_profile = find_device_profile(name, dtype_name, NONE, [profile_dir])
    if device_profile is None:
        raise SystemExit(f"no device model for {name}, {dtype_name} under {profile_dir}")
    sweep = device_profile.metadata["sweep"]
    rate = device_profile.metadata["device"]["matmul_flops_per_second"]
    budget = sweep["memory_limit_bytes"]
    shapes = []
    for preset in presets:
        layer, factor = scaled_preset_layer(preset, torch_device, torch_dtype, sweep["weight_limit_bytes"])
        spec = layer.spec
        flops_shape = DesignShape(spec.num_experts, spec.hidden_dim, spec.intermediate_dim, spec.top_k, _layout(spec))
        grid = token_counts(flops_shape, rate, sweep["seconds_per_call"], sweep.get("max_tokens", 4096))
        tokens = [n for n in held_out_tokens(grid, beyond=()) if n > 1]
        logger.info("%s scaled 1/%d: %s at %s tokens", preset, factor, spec.describe(), tokens)
        check = check_shape(
            layer, preset, factor, device_profile, torch_device, torch_dtype, tokens, budget, seconds_per_point
        )
        shapes.append(check.summary())
        logger.info(
            "%s: device model / oracle %.3f, fallback / oracle %.3f",
            preset,
            shapes[-1]["device_model_over_oracle"],
            shapes[-1]["fallback_over_oracle"],
        )
        del layer
    return _verdict(device_profile, shapes, source="timed here")


def markdown(result: dict) -> str:
    """The check as a Markdown table, one row per shape."""
    lines = [
        f"Device model {result['form']} on {result['device']}, {result['dtype']}: median "
        f"{result['median_over_oracle']:.3f}, worst {result['worst_over_oracle']:.3f} (targets ≤ "
        f"{MEDIAN_TARGET}, ≤ {WORST_TARGET}); never worse than the fallback: {result['never_worse_than_fallback']}",
        "",
        "| preset (scale) | E | H | I | k | tokens | device model / oracle | fallback / oracle | "
        "eager | batched_mm | grouped_mm |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in result["shapes"]:
        shape = s["shape"]
        fixed = [f"{s['fixed_over_oracle'][b]:.3f}" if b in s["fixed_over_oracle"] else "–" for b in DEFAULT_BACKENDS]
        lines.append(
            f"| {s['preset']} (1/{s['scale']}) | {shape['num_experts']} | {shape['hidden_dim']} | "
            f"{shape['intermediate_dim']} | {shape['top_k']} | {s['tokens'][0]}–{s['tokens'][-1]} | "
            f"{s['device_model_over_oracle']:.3f} | {s['fallback_over_oracle']:.3f} | " + " | ".join(fixed) + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile-dir", type=Path, help="the folder holding the device model")
    parser.add_argument("--device-model", type=Path, help="with --against-profiles: the device model's JSON")
    parser.add_argument(
        "--against-profiles", type=Path, help="time nothing: check against the exact-shape profiles in this folder"
    )
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--presets", default=",".join(PRESETS), help="comma-separated preset names")
    parser.add_argument("--seconds-per-point", type=float, default=0.3)
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here (and Markdown beside it)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    presets = [p for p in args.presets.split(",") if p]
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        parser.error(f"unknown preset(s) {', '.join(unknown)}: use {', '.join(PRESETS)}")
    if args.against_profiles:
        if not args.device_model:
            parser.error("--against-profiles needs --device-model")
        result = run_measured_check(args.device_model, args.against_profiles)
    elif args.profile_dir:
        result = run_check(args.profile_dir, args.device, args.dtype, presets, args.seconds_per_point)
    else:
        parser.error("give --profile-dir, or --against-profiles with --device-model")
    write_result(result, markdown(result), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
