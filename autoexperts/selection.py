"""What decides a layer's backends: the whole first call of a layer, top-down, from its key to its decision table.

For a `LayerKey` (the layer's spec, device and compile mode) and a memory budget, `select` gives the `Selection`:

1. **Candidates** (`_candidates`): the registered backends less those the compile mode cannot run
   (`runnable_backends`) and those this device cannot run for this shape (`autoexperts.capabilities`).
2. **A profile** (`_from_profile`): the first usable one calibrated for this spec and device in the compile mode,
   else in the closest mode it may borrow (`profile_modes`), whose measured backends include a candidate: its cost
   model's table (`autoexperts.table`).
3. **Else the device model** (`_from_device_model`) of this device and dtype, seen for this shape: source
   `"device_model"`, under the same budget.
4. **Else the fallback rule** (`_from_fallback_rule`, `fallback_table`), with one `ProfileMissingWarning` per layer and
   mode saying how to calibrate.

A backend that raised at run time is excluded afterwards with `Selection.without`, which decides again from the same
source without it. `autoexperts.dispatch` keeps the per-call path (lookup, hooks, failover, the traced path).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
from typing import NamedTuple

import torch

from . import settings, store
from .capabilities import unrunnable_backends
from .choices import CALIBRATION_MODES, CUDA_GRAPH_MODES, DEFAULT, EXPORT, NONE, CompileMode
from .cost_model import CostModel
from .device import device_name
from .errors import ProfileMissingWarning, forget_warnings, warn_once
from .expert_parallel import calibrate_args, expert_shards
from .layer import BATCHED_MM, DEFAULT_BACKENDS, EAGER, GROUPED_MM, LayerSpec, layout_flags, registered_backends
from .profile import find_profile
from .table import DecisionTable, Region, Source, build_profile_table

logger = logging.getLogger(__name__)

# The fallback rule's batched_mm range on CUDA (Transformers switches to batched_mm for decoding likewise).
FALLBACK_BATCHED_MAX_TOKENS = 64

_device_models_lock = threading.Lock()
# Device models read so far, per (device name, dtype, compile mode, search folders, stale policy); `None` where there
# is none.
_device_models: dict[tuple, object] = {}


class TraceParts(NamedTuple):
    """A `LayerKey`'s parts as plain values, built in traced code: Dynamo keeps them as constants (see
    `autoexperts.dispatch.traced`)."""

    experts_class: type
    down_proj_shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    layout_flags: tuple[bool, bool, bool, bool]
    top_k: int
    expert_shards: int
    model_id: str
    parallel_args: str

    @classmethod
    def of(cls, module: torch.nn.Module, hidden_states: torch.Tensor, top_k: int) -> TraceParts:
        return cls(
            type(module),
            tuple(module.down_proj.shape),
            hidden_states.dtype,
            hidden_states.device,
            layout_flags(module),
            top_k,
            expert_shards(module, top_k),
            model_id_of(module),
            calibrate_args(module, top_k),
        )


@dataclasses.dataclass(frozen=True)
class LayerKey:
    """What a layer's decisions depend on: its spec, its device and the compile mode it runs in.

    `experts_class` (whose backends run) and `model_id` (named in warnings) ride along without taking part in
    equality: layers of one spec share their decisions whichever model they belong to.
    """

    spec: LayerSpec
    device: torch.device
    compile_mode: str = NONE
    experts_class: type = dataclasses.field(default=torch.nn.Module, compare=False)
    model_id: str = dataclasses.field(default="", compare=False)
    # The `calibrate` options that give a rank's layer under expert parallelism (named in warnings).
    parallel_args: str = dataclasses.field(default="", compare=False)

    @classmethod
    def of(cls, module: torch.nn.Module, device: torch.device, top_k: int, compile_mode: str = NONE) -> LayerKey:
        """The key of an experts module called on `device` with `top_k` experts per token."""
        spec = LayerSpec.of(module, top_k)
        args = calibrate_args(module, top_k)
        return cls(spec, torch.device(device), compile_mode, type(module), model_id_of(module), args)

    @classmethod
    def from_trace_parts(cls, parts: TraceParts, compile_mode: str) -> LayerKey:
        """The key from the `TraceParts` a `torch.compile` trace hands over as a constant."""
        spec = LayerSpec.from_parts(
            parts.experts_class,
            parts.down_proj_shape,
            parts.dtype,
            parts.device,
            *parts.layout_flags,
            parts.top_k,
            parts.expert_shards,
        )
        device = torch.device(parts.device)
        return cls(spec, device, compile_mode, parts.experts_class, parts.model_id, parts.parallel_args)


def model_id_of(module: torch.nn.Module) -> str:
    """The model id or folder the module's config was loaded from ('' when unknown)."""
    return getattr(getattr(module, "config", None), "_name_or_path", "") or ""


@dataclasses.dataclass(frozen=True)
class Selection:
    """A layer's decision table and where it came from.

    Attributes:
        key (`LayerKey`): the layer decided for.
        table (`DecisionTable`): the token-count regions.
        candidates (`list[str]`): the backends that may run this layer here; a failover picks among these.
        unavailable (`dict[str, str]`): backends this device cannot run for this shape, and why.
        profile_path (`str | None`): the profile (or device model) that decided (`None` for the fallback rule).
        cost_model (`CostModel | None`): that profile's cost model (or the device model's view of this shape).
        budget_bytes (`float`): the memory budget the table respects.
        source (`str`, a `table.Source`): `"profile"`, `"device_model"` or `"fallback"`.
    """

    key: LayerKey
    table: DecisionTable
    candidates: list[str]
    unavailable: dict[str, str]
    profile_path: str | None
    cost_model: CostModel | None
    budget_bytes: float
    source: str = Source.PROFILE

    @property
    def reason(self) -> str:
        return "; ".join(self.unavailable.values())

    def without(self, excluded: set[str]) -> Selection:
        """The selection when the `excluded` backends may not run (eager always may, outside compile): the same
        source decides again."""
        left = [b for b in self.candidates if b not in excluded] or [EAGER]
        if self.cost_model is not None and set(left) & set(self.cost_model.backends):
            table = build_profile_table(self.key.spec, self.cost_model, left, self.budget_bytes, self.source)
        else:
            table = fallback_table(self.key.spec, left, self.budget_bytes)
        return dataclasses.replace(self, table=table)


def select(key: LayerKey, budget_bytes: float) -> Selection:
    """The decision table of `key`'s layer under `budget_bytes` (see the module docstring)."""
    candidates, unavailable = _candidates(key)
    for source in (_from_profile, _from_device_model, _from_fallback_rule):
        selection = source(key, candidates, unavailable, budget_bytes)
        if selection is not None:
            return selection
    raise AssertionError("the fallback rule always selects")  # pragma: no cover


def _candidates(key: LayerKey) -> tuple[list[str], dict[str, str]]:
    """Step 1: the backends that may run `key`'s layer, and those this device cannot run for its shape (why)."""
    unavailable = unrunnable_backends(key.spec)
    for reason in unavailable.values():
        logger.info("auto: %s: %s", key.spec.describe(), reason)
    runnable = runnable_backends(registered_backends(), key.compile_mode, key.device.type)
    return [b for b in runnable if b not in unavailable], unavailable


def runnable_backends(candidates: list[str], compile_mode: str, device_type: str) -> list[str]:
    """The candidates that can run in `compile_mode` on `device_type`.

    - `eager` is never a candidate under compilation: its loop over the experts hit is data-dependent, so it breaks
      the graph (an error under `fullgraph=True`; measured on torch 2.11, 2.14 and 2.15).
    - `grouped_mm` is not one under CUDA-graph modes on CUDA: its kernel cannot be captured in CUDA graphs (on CPU,
      Inductor skips CUDA graphs and it runs).
    """
    if compile_mode == NONE:
        return list(candidates)
    excluded = {EAGER}
    if compile_mode in CUDA_GRAPH_MODES and device_type == "cuda":
        excluded.add(GROUPED_MM)
    return [backend for backend in candidates if backend not in excluded]


def _from_profile(
    key: LayerKey, candidates: list[str], unavailable: dict[str, str], budget_bytes: float
) -> Selection | None:
    """Step 2: the table of the first usable profile of the layer in its compile mode or one it may borrow."""
    spec, compile_mode, name = key.spec, key.compile_mode, device_name(key.device)
    stale_policy = settings.stale_profiles_policy()
    for profile_mode in profile_modes(compile_mode):
        profile = find_profile(spec, name, profile_mode, store.search_dirs(), stale_policy=stale_policy)
        if profile is None or not set(candidates) & set(profile.cost_model.backends):
            continue
        logger.info("auto: %s (compile mode %s) uses profile %s", spec.describe(), compile_mode, profile.json_path)
        if profile_mode != compile_mode and not (compile_mode == EXPORT and profile_mode == NONE):
            left_out = ", ".join(sorted(set(registered_backends()) - set(candidates)))
            _warn_once(
                key,
                f"autoexperts: no profile for {spec.describe()} on {name} in compile mode {compile_mode}; using "
                f"the one calibrated in mode {profile_mode} ({profile.json_path}) without {left_out}. "
                + calibrate_hint(key),
            )
        measured = [b for b in candidates if b in DEFAULT_BACKENDS or b in profile.cost_model.backends]
        table = build_profile_table(spec, profile.cost_model, candidates, budget_bytes)
        return Selection(key, table, measured, unavailable, str(profile.json_path), profile.cost_model, budget_bytes)
    return None


def profile_modes(compile_mode: str) -> tuple[str, ...]:
    """The compile modes whose profiles may decide in `compile_mode`, best match first.

    A compiled run without a profile of its own mode borrows the closest one (the `default` mode's, then the
    uncompiled one's: its crossovers are off under compilation, but its ranking and memory still hold). An exported
    program runs ATen's kernels uncompiled: the uncompiled profile is its own (less `eager`, which cannot be
    exported), the `default` one next.
    """
    if compile_mode == NONE:
        return (NONE,)
    if compile_mode == EXPORT:
        return (NONE, DEFAULT)
    if compile_mode == DEFAULT:
        return (DEFAULT, NONE)
    if compile_mode == CompileMode.MAX_AUTOTUNE:
        return (CompileMode.MAX_AUTOTUNE, CompileMode.MAX_AUTOTUNE_NO_CUDAGRAPHS, DEFAULT, NONE)
    return (compile_mode, DEFAULT, NONE)


def _from_device_model(
    key: LayerKey, candidates: list[str], unavailable: dict[str, str], budget_bytes: float
) -> Selection | None:
    """Step 3: the table the device model of this device and dtype (its own compile mode's, else the closest one's)
    predicts for the layer's shape; `None` without one."""
    from .device_profile import find_device_profile

    spec, name = key.spec, device_name(key.device)
    if spec.expert_shards > 1:  # the design sweep has no sentinel routes: its work features cannot see their cost
        return None
    stale_policy = settings.stale_profiles_policy()
    for profile_mode in profile_modes(key.compile_mode):
        cache_key = (name, spec.dtype, profile_mode, tuple(store.search_dirs()), stale_policy)
        with _device_models_lock:
            if cache_key not in _device_models:
                _device_models[cache_key] = find_device_profile(
                    name, spec.dtype, profile_mode, store.search_dirs(), stale_policy
                )
            device_profile = _device_models[cache_key]
        if device_profile is None or not set(candidates) & set(device_profile.model.backends):
            continue
        cost_model = device_profile.model.for_spec(spec)
        table = device_model_table(spec, cost_model, candidates, budget_bytes)
        _warn_once(
            key,
            f"autoexperts: no profile for {spec.describe()} on {name} (compile mode {key.compile_mode}); using the "
            f"device model {device_profile.json_path} (calibrated in mode {profile_mode}, fitted on "
            f"{len(device_profile.shapes)} other shapes). For this exact shape: " + calibrate_hint(key),
        )
        measured = [b for b in candidates if b in DEFAULT_BACKENDS or b in cost_model.backends]
        path = str(device_profile.json_path)
        return Selection(key, table, measured, unavailable, path, cost_model, budget_bytes, Source.DEVICE_MODEL)
    return None


def device_model_table(spec: LayerSpec, cost_model, candidates: list[str], budget_bytes: float) -> DecisionTable:
    """The table a device model's view of `spec` (`DeviceModel.for_spec`) gives: its predictions, where they save
    more than their own error over the fallback rule's choice, else the fallback rule (source `"device_model"`)."""
    default = fallback_table(spec, [b for b in candidates if b in DEFAULT_BACKENDS], budget_bytes)
    return build_profile_table(spec, cost_model, candidates, budget_bytes, Source.DEVICE_MODEL, default=default)


def _from_fallback_rule(
    key: LayerKey, candidates: list[str], unavailable: dict[str, str], budget_bytes: float
) -> Selection:
    """Step 4: the fallback rule's table, with one warning that says how to calibrate."""
    _warn_once(
        key,
        f"autoexperts: no profile for {key.spec.describe()} on {device_name(key.device)} (compile mode "
        f"{key.compile_mode}) in {', '.join(str(d) for d in store.search_dirs())} and no device model; using the "
        f"fallback rule. {calibrate_hint(key)} (or the whole device, for every shape: {device_model_command(key)})",
    )
    defaults = [b for b in candidates if b in DEFAULT_BACKENDS]
    table = fallback_table(key.spec, defaults, budget_bytes)
    return Selection(key, table, defaults, unavailable, None, None, budget_bytes, Source.FALLBACK)


def fallback_table(spec: LayerSpec, candidates: list[str], budget_bytes: float) -> DecisionTable:
    """The rule used when nothing calibrated matches `spec` (source `"fallback"`):

    - on CUDA, `batched_mm` up to `FALLBACK_BATCHED_MAX_TOKENS` tokens when its weight copies (tokens × top_k × one
      expert's weights) fit the budget, `grouped_mm` beyond;
    - on CPU and other devices, `grouped_mm` (Transformers' default);
    - where `grouped_mm` may not run: `eager` (after a runtime fault), else `batched_mm` (CUDA-graph compile modes).
    """
    default = next((b for b in (GROUPED_MM, EAGER, BATCHED_MM) if b in candidates), candidates[0])
    everywhere = [Region(1, math.inf, default, Source.FALLBACK)]
    if spec.device_type != "cuda" or BATCHED_MM not in candidates:
        return DecisionTable(spec, everywhere, budget_bytes)
    # batched_mm gathers one expert's weights per (token, top-k) slot.
    fits_budget = budget_bytes // (spec.top_k * spec.expert_bytes) if math.isfinite(budget_bytes) else math.inf
    batched_max = int(min(FALLBACK_BATCHED_MAX_TOKENS, fits_budget))
    if batched_max < 1:
        return DecisionTable(spec, everywhere, budget_bytes)
    regions = [
        Region(1, batched_max, BATCHED_MM, Source.FALLBACK),
        Region(batched_max + 1, math.inf, default, Source.FALLBACK),
    ]
    return DecisionTable(spec, regions, budget_bytes)


def calibrate_hint(key: LayerKey) -> str:
    """The command that calibrates `key`'s layer on its device and in its compile mode."""
    model = key.model_id
    if not model or (os.path.isabs(model) and not os.path.exists(model)):  # e.g. a temporary folder, gone since
        model = "<model id or config folder>"
    command = f"autoexperts calibrate --model {model} --device {key.device.type} --dtype {key.spec.dtype}"
    if key.parallel_args:
        command += f" {key.parallel_args}"
    mode = _calibration_mode(key.compile_mode)
    if mode != NONE:
        command += f" --compile {mode}"
    if mode != key.compile_mode and key.compile_mode != EXPORT:
        command += f" (mode {key.compile_mode} is not calibrated: it uses the {mode} mode's profile)"
    return f"Calibrate this device with: {command}"


def device_model_command(key: LayerKey) -> str:
    """The command that calibrates the device model for `key`'s device, dtype and compile mode."""
    from .device_profile import device_model_command as command

    return command(key.device.type, key.spec.dtype, _calibration_mode(key.compile_mode))


def _calibration_mode(compile_mode: str) -> str:
    """The `calibrate --compile` mode that measures for `compile_mode` (CUDA-graph modes: `default`'s; an export:
    the uncompiled one's)."""
    if compile_mode == EXPORT:
        return NONE
    return compile_mode if compile_mode in CALIBRATION_MODES else DEFAULT  # CALIBRATION_MODES holds NONE


def _warn_once(key: LayerKey, message: str) -> None:
    """Warns once per layer spec and compile mode (until `autoexperts.reset()`); the user can fix it by calibrating."""
    warn_once(ProfileMissingWarning, (key.spec, key.compile_mode), message)


def forget() -> None:
    """Lets every missing-profile warning be given again and device models be read anew (`autoexperts.reset()`)."""
    with _device_models_lock:
        _device_models.clear()
    forget_warnings()
