"""`calibrate_device_model()`: the design shapes, scaled to the device -> one sweep each -> a device model, saved.

Each shape's sweep runs the counts its plan gives (`design.token_counts`, from the device's matmul rate), then more
while its calls are still shorter than `seconds_per_call` (`design.more_tokens`).

The points measured so far are checkpointed after every token count (`<stem>.checkpoint` beside the device model);
`resume=True` keeps them. Ctrl-C raises `CalibrationInterrupted` naming the checkpoint.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..allocator import allocator_settings
from ..choices import CALIBRATION_MODES, NONE
from ..cost_model import Measurement
from ..device import device_name, free_memory_bytes
from ..device_model import DeviceModel, ShapePoints
from ..device_profile import DeviceProfile, device_model_stem, save_device_profile
from ..errors import CalibrationInterrupted, UsageError
from ..freshness import library_versions
from ..layer import DEFAULT_BACKENDS
from ..selection import runnable_backends
from ..store import atomic_write_bytes, default_write_dir, file_target
from .design import DESIGN_SHAPES, build_design_layer, matmul_flops_per_second, more_tokens, scale_to_fit, token_counts
from .experts_layer import ExpertsLayer
from .run import resolve_device, resolve_dtype, runnable_for_shape
from .sweep import SweepOptions, run_sweep

logger = logging.getLogger(__name__)

CHECKPOINT_KIND = "autoexperts-device-model-checkpoint"
# One layer's weights on the device: at most this share of the free memory, and on CPU at most this many bytes.
WEIGHT_FRACTION = 0.05
CPU_WEIGHT_LIMIT = 96 * 2**20
# batched_mm's weight copies in one sweep point: at most this share of free memory (and on CPU this many bytes).
SWEEP_MEMORY_FRACTION = 0.3
CPU_SWEEP_MEMORY_LIMIT = 1 * 2**30


def calibrate_device_model(
    device: str | None = None,
    dtype: str | None = None,
    compile_mode: str = NONE,
    out: str | Path | None = None,
    progress: bool = True,
    resume: bool = False,
    seconds_per_call: float = 0.1,
    max_tokens: int = 4096,
    shapes=DESIGN_SHAPES,
) -> DeviceProfile:
    """Calibrates the device model of this device, dtype and compile mode (see `autoexperts.device_model`).

    Args:
        seconds_per_call (`float`): the longest call a design shape's token counts go up to (at the device's matmul
            rate): what keeps the whole calibration within minutes.
        max_tokens (`int`): the largest token count measured.
        shapes: the design shapes (default: `design.DESIGN_SHAPES`).

    Returns:
        `DeviceProfile`: the saved device model (`json_path` says where).
    """
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype or ("bfloat16" if torch_device.type == "cuda" else "float32"))
    dtype_name = str(torch_dtype).removeprefix("torch.")
    if compile_mode not in CALIBRATION_MODES:
        raise UsageError(f"unknown compile mode {compile_mode!r}: use {', '.join(CALIBRATION_MODES)}")
    backends = runnable_backends(list(DEFAULT_BACKENDS), compile_mode, torch_device.type)
    folder = Path(out) if out is not None else default_write_dir()
    name = device_name(torch_device)
    target = file_target(folder, name, device_model_stem(dtype_name, compile_mode))
    checkpoint = target.with_suffix(".checkpoint")

    started = time.perf_counter()
    free = free_memory_bytes(torch_device)
    weight_limit = WEIGHT_FRACTION * free
    sweep_limit = SWEEP_MEMORY_FRACTION * free
    if torch_device.type == "cpu":
        weight_limit, sweep_limit = min(weight_limit, CPU_WEIGHT_LIMIT), min(sweep_limit, CPU_SWEEP_MEMORY_LIMIT)
    rate = matmul_flops_per_second(torch_device, torch_dtype)
    plan = []
    for shape in shapes:
        scaled = scale_to_fit(shape, dtype_name, weight_limit)
        plan.append((scaled, token_counts(scaled, rate, seconds_per_call, max_tokens)))
    header = {
        "device": name,
        "dtype": dtype_name,
        "compile_mode": compile_mode,
        "backends": backends,
        "shapes": [vars(s) for s, _ in plan],
        "versions": {k: v for k, v in library_versions().items() if k in ("torch", "transformers")},
    }
    done = _read_checkpoint(checkpoint, header) if resume else {}
    measured: dict[int, list[Measurement]] = dict(done)

    def save_checkpoint(index: int, points: list[Measurement]) -> None:
        measured[index] = points
        record = {"kind": CHECKPOINT_KIND, **header}
        record["points"] = {str(i): [m.to_json() for m in ms] for i, ms in measured.items()}
        atomic_write_bytes(checkpoint, (json.dumps(record) + "\n").encode("utf-8"))

    results: list[ShapePoints] = []
    bar = tqdm(total=len(plan), disable=not progress, desc="device model", unit="shape", leave=False)
    try:
        for index, (shape, tokens) in enumerate(plan):
            layer = build_design_layer(shape, torch_device, torch_dtype, seed=index)
            shape_backends = runnable_for_shape(layer.spec, list(backends))
            options = SweepOptions(
                tokens=tokens,
                backends=shape_backends,
                min_repeats=3,
                max_repeats=10,
                seconds_per_point=0.1,
                memory_limit_bytes=sweep_limit,
                progress=False,
                done=list(done.get(index, [])),
                on_point=lambda points, i=index: save_checkpoint(i, points),
                compile_mode=compile_mode,
                seed=index,
            )
            points = sweep_design_shape(layer, torch_device, torch_dtype, options, seconds_per_call, max_tokens)
            results.append(ShapePoints(layer.spec, tuple(points)))
            del layer
            bar.update()
        model = DeviceModel.fit(results, backends)
        profile = DeviceProfile(
            device_name=name,
            device_type=torch_device.type,
            dtype=dtype_name,
            compile_mode=compile_mode,
            shapes=results,
            model=model,
            metadata={
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "device": {
                    "torch_threads": torch.get_num_threads(),
                    "allocator_settings": allocator_settings(),
                    "matmul_flops_per_second": rate,
                },
                "versions": library_versions(),
                "sweep": {
                    "backends": backends,
                    "routing": "uniform random, distinct experts per token",
                    "seconds_per_call": seconds_per_call,
                    "max_tokens": max_tokens,
                    "weight_limit_bytes": weight_limit,
                    "memory_limit_bytes": sweep_limit,
                    "wall_seconds": round(time.perf_counter() - started, 2),
                },
            },
        )
        save_device_profile(profile, folder)
    except KeyboardInterrupt as interrupt:
        kept = checkpoint if checkpoint.is_file() else None
        raise CalibrationInterrupted(kept, sum(len(m) for m in measured.values()) if kept else 0) from interrupt
    finally:
        bar.close()
    checkpoint.unlink(missing_ok=True)
    logger.info(
        "device model (%s) fitted on %d shapes in %.1f s", model.form, len(results), time.perf_counter() - started
    )
    return profile


def sweep_design_shape(
    layer: ExpertsLayer,
    device: torch.device,
    dtype: torch.dtype,
    options: SweepOptions,
    seconds_per_call: float,
    max_tokens: int,
) -> list[Measurement]:
    """`run_sweep` at `options.tokens` (the plan), then at `design.more_tokens` until a call of the fastest backend
    takes `seconds_per_call` or `max_tokens` is measured: a low estimate of the device's rate stops no sweep early."""
    points = run_sweep(layer, device, dtype, options)
    while extra := more_tokens(points, seconds_per_call, max_tokens):
        logger.info("%s: calls still under %g s at %d tokens; measuring %s too",
                    layer.spec.describe(), seconds_per_call, points[-1].num_tokens, extra)  # fmt: skip
        options = dataclasses.replace(options, tokens=[*options.tokens, *extra], done=points)
        points = run_sweep(layer, device, dtype, options)
    return points


def _read_checkpoint(path: Path, header: dict) -> dict[int, list[Measurement]]:
    if not path.is_file():
        raise UsageError(f"no checkpoint at {path} to resume; run without --resume")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("kind") != CHECKPOINT_KIND:
            raise ValueError("not a device-model checkpoint")
        points = {int(i): [Measurement.from_json(m) for m in ms] for i, ms in record["points"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise UsageError(f"cannot resume from {path}: {error}; run without --resume to start afresh") from error
    different = [key for key, value in header.items() if json.loads(json.dumps(value)) != record.get(key)]
    if different:
        raise UsageError(
            f"cannot resume from {path}: it was measured with another {', '.join(different)}; "
            "run without --resume to start afresh"
        )
    return points
