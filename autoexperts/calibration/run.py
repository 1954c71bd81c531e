"""`calibrate()`: model -> one experts layer -> sweep -> cost model -> saved profile."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from ..allocator import allocator_settings
from ..capabilities import unrunnable_backends
from ..choices import CALIBRATION_MODES, NONE
from ..cost_model import CostModel
from ..device import device_name, driver_version, free_memory_bytes, gpu_driver_version
from ..errors import CalibrationInterrupted, UsageError
from ..expert_parallel import ALL_REDUCE, parallel_layer, resolve_ep_implementation, tp_expert_style
from ..freshness import library_versions
from ..layer import DEFAULT_BACKENDS, registered_backends
from ..locking import file_lock
from ..profile import Profile, load_profile, save_profile
from ..selection import runnable_backends
from ..store import default_write_dir, file_target
from .adaptive import device_model_tokens
from .checkpoint import checkpoint_path, read_checkpoint, write_checkpoint
from .crossovers import refine_crossovers, refinement_budget
from .experts_layer import ExpertsLayer, build_experts_layer
from .model_source import ModelSource, resolve_model
from .routing import Routing
from .sweep import SweepOptions, default_token_grid, run_sweep

logger = logging.getLogger(__name__)

# The share of the device's free memory (after the layer is built) that one sweep point may take.
SWEEP_MEMORY_FRACTION = 0.7
# How long a process waits for another one calibrating the same layer (a max-autotune calibration takes long).
CALIBRATION_LOCK_TIMEOUT_S = 6 * 3600


@contextlib.contextmanager
def calibration_lock(target: Path) -> Iterator[None]:
    """Held while a process calibrates the layer whose profile is `target` (without suffix). The folders it makes
    for its lock file are removed again if nothing was saved in them (a bad `--resume` writes nothing)."""
    existing = target.parent
    while not existing.exists():
        existing = existing.parent
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with file_lock(target.parent / f".{target.name}.calibrating", CALIBRATION_LOCK_TIMEOUT_S):
            yield
    finally:
        folder = target.parent
        while folder != existing and not any(folder.iterdir()):
            folder.rmdir()
            folder = folder.parent


def resolve_device(name: str | None) -> torch.device:
    """`None` picks the GPU when there is one; `"cuda"` without CUDA is a usage error."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise UsageError(f"unknown device {name!r}: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name} asked for CUDA, but torch sees no CUDA device here")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"unsupported device {name!r}: use cpu or cuda")
    return device


def resolve_dtype(name: str) -> torch.dtype:
    aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
    dtype = getattr(torch, aliases.get(name, name), None)
    if not isinstance(dtype, torch.dtype) or dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise UsageError(f"unknown dtype {name!r}: use float32, bfloat16 or float16")
    return dtype


def calibrate(
    model: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    tokens: Sequence[int] | None = None,
    backends: Sequence[str] | None = None,
    out: str | Path | None = None,
    top_k: int | None = None,
    progress: bool = True,
    seconds_per_point: float = 0.6,
    resume: bool = False,
    compile_mode: str = NONE,
    full_grid: bool = False,
    tp_size: int = 1,
    ep_size: int = 1,
    ep_implementation: str = "auto",
    routing: Routing | str | None = None,
    refine: bool | None = None,
) -> Profile:
    """Calibrates one model's experts layer on a device and saves the profile.

    Args:
        model (`str`, *optional*): a preset name, a folder or config.json, or a Hub id (default: the small preset).
        device (`str`, *optional*): `"cpu"` or `"cuda"` (default: the GPU if there is one).
        dtype (`str`, *optional*): `float32`, `bfloat16` or `float16` (default: bfloat16 on CUDA, float32 elsewhere).
        tokens (`Sequence[int]`, *optional*): token counts to measure (default: around the crossovers the device
            model predicts for the layer when there is one for this device, dtype and mode, see
            `calibration.adaptive`; else `default_token_grid()`).
        backends (`Sequence[str]`, *optional*): backends to measure (default: eager, batched_mm, grouped_mm, less
            those that cannot run in `compile_mode`).
        out (`str` or `Path`, *optional*): profile folder (default: `AUTOEXPERTS_PROFILE_DIR` or the user cache).
        top_k (`int`, *optional*): experts per token, when the config does not say.
        progress (`bool`): show a progress bar.
        seconds_per_point (`float`): timing budget per token count (at least 3 timed calls per backend).
        resume (`bool`): keep the points of an interrupted calibration of the same layer, device, dtype, backends
            and library versions (its checkpoint beside the profile) and measure only the rest.
        compile_mode (`str`): `"none"`, `"default"` or `"max-autotune-no-cudagraphs"`: the `torch.compile` mode the
            backends are measured in (compiled with `dynamic=True, fullgraph=True`); the profile serves that mode.
        full_grid (`bool`): measure the whole default grid even when a device model could guide the sweep.
        tp_size (`int`), ep_size (`int`), ep_implementation (`str`): as in Transformers' `DistributedConfig`: calibrate
            the layer one rank runs under that parallelism (see `autoexperts.expert_parallel`), which `auto` finds
            from inside the distributed run.
        routing (`Routing` or `str`, *optional*): the distribution each point's experts are drawn from: `"uniform"`
            (the default), `"zipf:S"` or a routing file from `autoexperts.record_routing` (see
            `calibration.routing`). The profile records it. A device model, measured with uniform routing, does not
            choose the counts of a skewed calibration: it measures the default grid.
        refine (`bool`, *optional*): after the sweep, measure the counts around each crossover again, the two
            contenders interleaved, so the switch lands within one grid step (see `calibration.crossovers`; adds at
            most a tenth of the sweep's time). Default: when `tokens` is not given (given counts are measured as
            given).

    Several processes calibrating the same layer on the same kind of device at once (the ranks of a `torchrun`
    launch) measure it once: the first takes the layer's lock and measures, the others wait for it and return the
    profile it saved.

    The points measured so far are checkpointed after every token count; the checkpoint is removed once the
    profile is saved.

    Returns:
        `Profile`: the saved profile (`profile.json_path` says where).

    Raises:
        `UsageError`: on bad input (a routing file without a layer of this shape included); with `resume`, when there
            is no checkpoint or it was measured for something else.
        `CalibrationInterrupted`: on Ctrl-C, naming the checkpoint that keeps the points measured so far.
    """
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype or ("bfloat16" if torch_device.type == "cuda" else "float32"))
    if compile_mode not in CALIBRATION_MODES:
        raise UsageError(f"unknown compile mode {compile_mode!r}: use {', '.join(CALIBRATION_MODES)}")
    if backends is None:
        backends = runnable_backends(list(DEFAULT_BACKENDS), compile_mode, torch_device.type)
    unknown = [b for b in backends if b not in registered_backends()]
    if unknown:
        raise UsageError(f"unknown backend(s) {', '.join(unknown)}; registered: {', '.join(registered_backends())}")
    unrunnable = [b for b in backends if b not in runnable_backends(list(backends), compile_mode, torch_device.type)]
    if unrunnable:
        raise UsageError(
            f"backend(s) {', '.join(unrunnable)} cannot run under torch.compile(fullgraph=True) in mode {compile_mode} "
            f"on {torch_device.type}; auto never picks them there"
        )
    if tokens is not None:
        tokens = sorted(set(tokens))
        if not tokens or tokens[0] < 1:
            raise UsageError("token counts must be positive integers")
    folder = Path(out) if out is not None else default_write_dir()
    source = resolve_model(model)
    if tp_size > 1 and ep_size == 1 and tp_expert_style(source.config) == "masked":
        ep_size, ep_implementation = tp_size, ALL_REDUCE  # what this Transformers' tensor-parallel plan does
    implementation = resolve_ep_implementation(ep_implementation, tp_size, ep_size)
    parallel = parallel_layer(source.config, tp_size, ep_size, implementation)
    routing = Routing.parse(routing) if isinstance(routing, str) else (routing or Routing())

    started = time.perf_counter()
    layer = build_experts_layer(
        source.config, torch_device, torch_dtype, top_k=top_k, ep_size=ep_size, ep_implementation=implementation,
        tp_size=tp_size,
    )  # fmt: skip
    backends = runnable_for_shape(layer.spec, list(backends))
    routing = routing.for_shape(layer.spec.num_experts * layer.spec.expert_shards, layer.spec.top_k)
    plan = LayerCalibration(
        layer=layer,
        source=source,
        device=torch_device,
        dtype=torch_dtype,
        device_name=device_name(torch_device),
        folder=folder,
        backends=list(backends),
        tokens=tokens,
        routing=routing,
        compile_mode=compile_mode,
        seconds_per_point=seconds_per_point,
        progress=progress,
        resume=resume,
        full_grid=full_grid,
        parallel=parallel,
        launch=launch_id(),
        started=started,
        refine=tokens is None if refine is None else refine,
    )
    return calibrate_layer(plan)


@dataclasses.dataclass(frozen=True)
class LayerCalibration:
    """What one layer's calibration measures and where its profile goes (`calibrate` builds one from its arguments,
    `autoexperts.tune` from a model's own layer)."""

    layer: ExpertsLayer
    source: ModelSource
    device: torch.device
    dtype: torch.dtype
    device_name: str
    folder: Path  # the profile folder
    backends: list[str]
    tokens: list[int] | None  # None: the device model's counts, else the default grid
    routing: Routing
    compile_mode: str
    seconds_per_point: float
    progress: bool
    # True: keep the checkpoint's points (it must match); False: start afresh; None: keep them when it matches.
    resume: bool | None
    full_grid: bool
    parallel: dict | None  # the distributed layout, as `expert_parallel.parallel_layer` records it
    launch: str | None  # the torchrun launch (`launch_id`)
    started: float  # `time.perf_counter()` when the calibration began
    # The most memory one sweep point may take (default: `SWEEP_MEMORY_FRACTION` of the free memory).
    memory_limit_bytes: float | None = None
    # Measure the counts around each crossover again after the sweep (`calibration.crossovers`).
    refine: bool = False

    @property
    def target(self) -> Path:
        """The profile's path, without suffix."""
        return file_target(self.folder, self.device_name, self.layer.spec.file_stem(self.compile_mode))


def calibrate_layer(plan: LayerCalibration) -> Profile:
    """Measures `plan`'s layer, fits and saves its profile; under the layer's calibration lock, so that processes
    calibrating the same layer at once (the ranks of a `torchrun` launch) measure it once: the others return the
    profile the first saved (`measured_elsewhere`)."""
    target, waiting_since = plan.target, time.time()
    with calibration_lock(target):
        measured_meanwhile = _measured_meanwhile(target.with_name(f"{target.name}.json"), waiting_since, plan.launch)
        if measured_meanwhile is not None:
            logger.info("%s was calibrated by another process meanwhile: %s", plan.layer.spec.describe(), target)
            measured_meanwhile.measured_elsewhere = True
            return measured_meanwhile
        return _calibrate_layer(plan)


def launch_id() -> str | None:
    """What the processes of one `torchrun` launch on one node share (`None` outside torchrun): its run id and
    rendezvous address, and the agent process that started them."""
    if "TORCHELASTIC_RUN_ID" not in os.environ and "LOCAL_RANK" not in os.environ:
        return None
    parts = [os.environ.get(name, "") for name in ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT")]
    return ":".join([*parts, str(os.getppid())])


def _measured_meanwhile(json_path: Path, since: float, launch: str | None) -> Profile | None:
    """The profile at `json_path` if another process measured it while this one waited for the layer's lock: one
    of the same `torchrun` launch, or one that wrote it at or after `since` (`time.time()`)."""
    try:
        written = json_path.stat().st_mtime
    except FileNotFoundError:
        return None
    if written < since and launch is None:
        return None
    profile = load_profile(json_path)
    if written >= since or profile.metadata.get("launch") == launch:
        return profile
    return None


def _calibrate_layer(plan: LayerCalibration) -> Profile:
    """The sweep, fit and save of `calibrate` (under the layer's calibration lock)."""
    layer = plan.layer
    memory_limit = plan.memory_limit_bytes or SWEEP_MEMORY_FRACTION * free_memory_bytes(plan.device)
    tokens, guide = plan.tokens, None
    if tokens is None and not plan.full_grid and plan.routing.is_uniform:
        tokens, guide = device_model_tokens(
            layer.spec, plan.device_name, plan.compile_mode, plan.backends, memory_limit
        )
    tokens = tokens or default_token_grid()
    checkpoint = checkpoint_path(plan.target)
    header = checkpoint_header(plan)
    resume = plan.resume
    if resume is None:  # keep what an interrupted run of the same measurement left, if anything
        resume = checkpoint.is_file() and _matches(checkpoint, header)
    done = [m for m in read_checkpoint(checkpoint, header) if m.num_tokens in tokens] if resume else []
    if done:
        logger.info("resuming from %s: %d points already measured", checkpoint, len(done))
    elif not resume and checkpoint.is_file():
        logger.info("starting afresh: the checkpoint %s will be replaced (use --resume to keep it)", checkpoint)
    points = [len(done)]

    def save_checkpoint(measured: list) -> None:
        write_checkpoint(checkpoint, header, measured)
        points[0] = len(measured)

    options = SweepOptions(
        tokens=tokens,
        backends=list(plan.backends),
        memory_limit_bytes=memory_limit,
        seconds_per_point=plan.seconds_per_point,
        progress=plan.progress,
        done=done,
        on_point=save_checkpoint,
        compile_mode=plan.compile_mode,
        routing=plan.routing,
    )
    try:  # until the profile is saved, an interruption or a crash leaves the checkpoint to resume from
        sweep_started = time.perf_counter()
        measurements = run_sweep(layer, plan.device, plan.dtype, options)
        refinement = None
        if plan.refine:
            budget = refinement_budget(time.perf_counter() - sweep_started)
            refinement = refine_crossovers(layer, plan.device, plan.dtype, measurements, options, budget)
            measurements = refinement.points
        elapsed = time.perf_counter() - plan.started
        profile = _profile(layer, plan.source, plan.device_name, plan.device, measurements, options, elapsed, guide)
        if refinement is not None:
            profile.metadata["sweep"]["refined"] = refinement.to_json()
        if plan.parallel:
            profile.metadata["parallel"] = plan.parallel
        if plan.launch:  # the torchrun launch it was measured in: its other ranks use this profile
            profile.metadata["launch"] = plan.launch
        save_profile(profile, plan.folder)
    except KeyboardInterrupt as interrupt:
        kept = checkpoint if checkpoint.is_file() else None
        raise CalibrationInterrupted(kept, points[0] if kept else 0) from interrupt
    except Exception:
        if checkpoint.is_file():
            logger.warning("calibration failed; the points measured so far are kept in %s (resume=True)", checkpoint)
        raise
    checkpoint.unlink(missing_ok=True)
    logger.info("calibration of %s took %.1f s", layer.spec.describe(), profile.metadata["sweep"]["wall_seconds"])
    return profile


def checkpoint_header(plan: LayerCalibration) -> dict:
    """What a checkpoint's points were measured for: resuming needs all of it to match."""
    return {
        "layer": dataclasses.asdict(plan.layer.spec),
        "device": plan.device_name,
        "compile_mode": plan.compile_mode,
        "backends": sorted(plan.backends),
        "routing": plan.routing.checkpoint_identity(),
        "versions": {k: v for k, v in library_versions().items() if k in ("torch", "transformers")},
    }


def _matches(checkpoint: Path, header: dict) -> bool:
    try:
        read_checkpoint(checkpoint, header)
    except UsageError:
        return False
    return True


def runnable_for_shape(spec, backends: list[str]) -> list[str]:
    """`backends` less those that cannot run `spec` here (see `autoexperts.capabilities`): they are not measured, and
    `auto` never picks them for this shape."""
    unavailable = unrunnable_backends(spec)
    for backend in backends:
        if backend in unavailable:
            logger.warning("not measuring %s: %s", backend, unavailable[backend])
    left = [b for b in backends if b not in unavailable]
    if not left:
        raise UsageError(
            f"none of the backends {', '.join(backends)} can run this layer here: {'; '.join(unavailable.values())}"
        )
    return left


def _profile(layer, source, name: str, torch_device, measurements, options, elapsed: float, guide=None) -> Profile:
    """The profile of a finished sweep: measurements, the fitted cost model and what they were measured with
    (`guide`: the device model that chose the token counts, if one did)."""
    cost_model = CostModel.fit(measurements)
    if not cost_model.backends:
        raise RuntimeError("no backend ran successfully at any token count; nothing to save")
    return Profile(
        spec=layer.spec,
        device_name=name,
        compile_mode=options.compile_mode,
        measurements=measurements,
        metadata={
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": {
                "driver": driver_version(torch_device),
                "gpu_driver": gpu_driver_version(torch_device.type),
                "torch_threads": torch.get_num_threads(),
                "allocator_settings": allocator_settings(),
            },
            "versions": library_versions(),
            "model": source.describe(),
            "experts": {"model_type": layer.model_type},
            "sweep": {
                "tokens": list(options.tokens),
                "tokens_chosen_by": str(guide.json_path) if guide is not None else "default grid",
                "backends": list(options.backends),
                "routing": options.routing.to_json(),
                "seconds_per_point": options.seconds_per_point,
                "compile": {"mode": options.compile_mode, "dynamic": True, "fullgraph": True}
                if options.compile_mode != NONE
                else None,
                "memory_limit_bytes": options.memory_limit_bytes,
                "wall_seconds": round(elapsed, 2),
                "resumed_points": len(options.done),
            },
        },
        cost_model=cost_model,
    )
