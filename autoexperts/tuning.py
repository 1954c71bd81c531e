"""`with autoexperts.tune(model):` calibrates a model's own experts layers on its own warm-up, in place.

Inside the block the model runs as usual while, per experts layer, every call's token count and routed experts are
recorded (counts kept on the layer's device, no host sync per call): where `auto` runs the call, from the inputs the
layer itself gets (`dispatch.observe_calls`; under expert parallelism, the rank's own rows after the exchange),
else from a forward pre-hook on the module (`record_routing`; not for an expert-parallel layer, whose module inputs
are not what its experts get). Nothing of this outlives the block.

On a normal exit, for each distinct layer spec the block ran (per rank under torch.distributed), the calibration
sweep of `autoexperts calibrate` runs on one of the model's own experts modules: its real weights (no copy; a
sharded layer's local shards, as Transformers runs them), inputs drawn from the routing the block recorded, at

- the default token grid up to the first grid count at least 2x the largest count the block ran (and at least
  `MIN_MAX_TOKENS`), memory permitting; and
- the counts the block ran most often (up to `MAX_SEEN_COUNTS` of them), between their neighbours on that grid.

Each profile is fitted and saved where `calibrate` saves it (the same files, lock, backup and checkpoint; its
routing recorded as captured in place), and `auto` uses it from the next call in this process. An exception in the
block measures and writes nothing; Ctrl-C during the sweep leaves the points measured so far in the checkpoint
(`CalibrationInterrupted`), which the next `tune` of the same layer resumes from.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from . import store
from .calibration.experts_layer import ExpertsLayer
from .calibration.model_source import ModelSource
from .calibration.routing import CapturedLayer, Routing
from .calibration.run import SWEEP_MEMORY_FRACTION, LayerCalibration, calibrate_layer, launch_id, runnable_for_shape
from .calibration.sweep import default_token_grid
from .capture import LayerRouting, record_routing
from .choices import CALIBRATION_MODES, NONE
from .device import device_name, free_memory_bytes
from .dispatch import memory_budget_bytes, observe_calls, reset
from .errors import ProfileWarning, UsageError
from .expert_parallel import parallel_layer_of
from .layer import DEFAULT_BACKENDS, LayerSpec, is_experts_module, registered_backends
from .profile import Profile
from .report import profile_table
from .selection import LayerKey, calibrate_hint, runnable_backends
from .table import Region, Source

logger = logging.getLogger(__name__)

# The measured counts reach at least this far, however small the warm-up's calls (decode-only warm-ups included).
MIN_MAX_TOKENS = 64
# At most this many of the counts the block ran are measured besides the grid (the most frequent first).
MAX_SEEN_COUNTS = 8
DEFAULT_SECONDS_PER_POINT = 0.6


@dataclasses.dataclass
class LayerTuning:
    """What `tune` did for one layer spec.

    Attributes:
        spec (`LayerSpec`): the layer spec.
        layers (`list[str]`): the module names of the model's layers of this spec.
        calls_by_tokens (`dict[int, int]`): how many experts calls of these layers the block ran at each token count.
        tokens_measured (`list[int]`): the token counts the sweep measured.
        regions (`list[Region]`): the decision table `auto` now uses for the spec, under the memory budget.
        seconds (`float`): the wall time of its sweep, fit and save.
        profile (`Path`): the profile's JSON.
        measured_elsewhere (`bool`): another process (a rank of the same launch) measured it meanwhile.
    """

    spec: LayerSpec
    layers: list[str]
    calls_by_tokens: dict[int, int]
    tokens_measured: list[int]
    regions: list[Region]
    seconds: float
    profile: Path
    measured_elsewhere: bool = False

    def summary(self) -> str:
        seen = sorted(self.calls_by_tokens)
        table = ", ".join(
            f"{r.first}–{'∞' if math.isinf(r.last) else int(r.last)} {r.backend}"
            + (" (over budget)" if r.source == Source.OVER_BUDGET else "")
            for r in self.regions
        )
        return (
            f"{self.spec.describe()} ({len(self.layers)} layers): {sum(self.calls_by_tokens.values())} calls at "
            f"{len(seen)} token counts ({seen[0]}–{seen[-1]}); measured {len(self.tokens_measured)} counts "
            f"({self.tokens_measured[0]}–{self.tokens_measured[-1]}) in {self.seconds:.1f} s"
            + (" (by another process)" if self.measured_elsewhere else "")
            + f"; table: {table}; profile {self.profile}"
        )


@dataclasses.dataclass
class TuneReport:
    """What `tune` measured, filled in when its block ends: one `LayerTuning` per layer spec."""

    layers: list[LayerTuning] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        return "\n".join(layer.summary() for layer in self.layers) or "nothing tuned"


@dataclasses.dataclass(frozen=True)
class _Options:
    folder: Path
    backends: tuple[str, ...] | None
    seconds_per_point: float
    compile_mode: str
    progress: bool


@contextlib.contextmanager
def tune(
    model: torch.nn.Module,
    *,
    out: str | Path | None = None,
    backends: Sequence[str] | None = None,
    seconds_per_point: float | None = None,
    compile: str | None = None,
    progress: bool = True,
) -> Iterator[TuneReport]:
    """Calibrates `model`'s experts layers on what the block runs (see the module docstring).

    Example:
        ```python
        with autoexperts.tune(model) as report:
            model.generate(**warmup_inputs, max_new_tokens=32)  # or model.generate_batch(...), model(**batch)
        print(report.summary())  # auto now decides from the profiles just measured
        ```

    Args:
        model (`torch.nn.Module`): a model with Transformers experts layers (`@use_experts_implementation`).
        out (`str` or `Path`, *optional*): the profile folder (default: the one `calibrate` writes and `auto` reads
            first, `AUTOEXPERTS_PROFILE_DIR` or the user cache).
        backends (`Sequence[str]`, *optional*): the backends to measure (default: eager, batched_mm, grouped_mm,
            less those that cannot run in the compile mode or the layer's shape here).
        seconds_per_point (`float`, *optional*): timing budget per token count (default 0.6, as `calibrate`).
        compile (`str`, *optional*): measure the backends under `torch.compile` in this mode (`"default"` or
            `"max-autotune-no-cudagraphs"`), as `calibrate --compile` does; default: uncompiled.
        progress (`bool`): show a progress bar while each layer spec is measured.

    Raises:
        `ValueError`: on bad arguments, or a model without experts layers, before anything runs.
        `CalibrationInterrupted`: on Ctrl-C during the sweep, naming the checkpoint that keeps what was measured.
    """
    options = _validated(model, out, backends, seconds_per_point, compile, progress)
    report = TuneReport()
    observed = _ObservedCalls(model)
    with record_routing(model) as hooked, observe_calls(observed):
        yield report
    # Reached only when the block ended without an exception.
    _tune_recorded(model, _layers_that_ran(model, observed, hooked.layers), options, report)


def _validated(model, out, backends, seconds_per_point, compile_mode, progress) -> _Options:
    """The arguments checked, each error one line (`UsageError`, a `ValueError`)."""
    if not isinstance(model, torch.nn.Module) or not any(is_experts_module(m) for m in model.modules()):
        name = type(model).__name__
        raise UsageError(f"tune: {name} has no experts layer decorated with @use_experts_implementation to tune")
    compile_mode = NONE if compile_mode is None else compile_mode
    if compile_mode not in CALIBRATION_MODES:
        raise UsageError(f"tune: unknown compile mode {compile_mode!r}: use {', '.join(CALIBRATION_MODES)}")
    if seconds_per_point is None:
        seconds_per_point = DEFAULT_SECONDS_PER_POINT
    if isinstance(seconds_per_point, bool) or not isinstance(seconds_per_point, (int, float)):
        raise UsageError(f"tune: seconds_per_point must be a number, got {seconds_per_point!r}")
    if not (math.isfinite(seconds_per_point) and seconds_per_point > 0):
        raise UsageError(f"tune: seconds_per_point must be positive and finite, got {seconds_per_point!r}")
    if backends is not None:
        backends = _validated_backends(backends, compile_mode)
    folder = Path(out).expanduser() if out is not None else store.default_write_dir()
    store.check_writable(folder)
    return _Options(folder, backends, float(seconds_per_point), compile_mode, bool(progress))


def _validated_backends(backends, compile_mode: str) -> tuple[str, ...]:
    if isinstance(backends, str) or not all(isinstance(b, str) for b in backends):
        raise UsageError(f"tune: backends must be a sequence of backend names, got {backends!r}")
    backends = tuple(backends)
    if not backends:
        raise UsageError("tune: backends is empty")
    repeated = sorted({b for b in backends if backends.count(b) > 1})
    if repeated:
        raise UsageError(f"tune: backends repeats {', '.join(repeated)}")
    registered = registered_backends()
    unknown = [b for b in backends if b not in registered]
    if unknown:
        raise UsageError(f"tune: unknown backend(s) {', '.join(unknown)}; registered: {', '.join(registered)}")
    if compile_mode != NONE and any(b not in runnable_backends(list(backends), compile_mode, "cuda") for b in backends):
        left_out = [b for b in backends if b not in runnable_backends(list(backends), compile_mode, "cuda")]
        raise UsageError(f"tune: {', '.join(left_out)} cannot run under torch.compile(fullgraph=True)")
    return backends


def tuning_tokens(calls_by_tokens: dict[int, int]) -> list[int]:
    """The token counts to measure for a layer whose calls ran `calls_by_tokens` (see the module docstring): the
    default grid up to the first count that reaches twice the largest (and `MIN_MAX_TOKENS`), and the most frequent
    counts that are not on it."""
    reach = max(2 * max(calls_by_tokens), MIN_MAX_TOKENS)
    grid = default_token_grid(2 * reach)
    top = next(n for n in grid if n >= reach)
    measured = {n for n in grid if n <= top}
    by_frequency = sorted(calls_by_tokens, key=lambda n: (-calls_by_tokens[n], n))
    measured.update([n for n in by_frequency if n not in measured][:MAX_SEEN_COUNTS])
    return sorted(measured)


@contextlib.contextmanager
def _local_parameters(module: torch.nn.Module) -> Iterator[None]:
    """Inside the block, the module's parameters sharded by Transformers' distributed engine (DTensors) are their
    local shards, as Transformers swaps them in for the duration of each experts forward: the rank's own layer, with
    no copy (`to_local` is a view); the DTensors are put back on exit."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without torch.distributed
        yield
        return
    originals = {name: p for name, p in module.named_parameters(recurse=False) if isinstance(p, DTensor)}
    module._parameters.update({name: p.to_local() for name, p in originals.items()})
    try:
        yield
    finally:
        module._parameters.update(originals)


class _ObservedCalls:
    """What every experts call `auto` ran in a forward got, per module of the model (see `dispatch.observe_calls`):
    the layer's spec as `auto` saw it, and its token counts and routed experts."""

    def __init__(self, model: torch.nn.Module):
        self.names = {id(module): name for name, module in model.named_modules() if is_experts_module(module)}
        self.layers: dict[str, tuple[LayerSpec, LayerRouting]] = {}

    def __call__(self, module: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor) -> None:
        name = self.names.get(id(module))
        if name is None:  # another model's layer
            return
        seen = self.layers.get(name)
        if seen is None:  # the first call: the spec and expert count `auto` saw (a rank's own, when sharded)
            spec = LayerSpec.of(module, top_k_index.shape[-1])
            seen = self.layers[name] = (spec, LayerRouting(name, int(module.down_proj.shape[0])))
        seen[1].add(top_k_index)


def _layers_that_ran(
    model: torch.nn.Module, observed: _ObservedCalls, hooked: dict[str, LayerRouting]
) -> dict[LayerSpec, list]:
    """The experts layers whose calls the block ran, by spec (the rank's local layer): `[(name, module,
    LayerRouting), ...]` in model order. A layer `auto` ran is known from its calls, any other from its pre-hook."""
    modules = dict(model.named_modules())
    groups: dict[LayerSpec, list] = collections.defaultdict(list)
    unseen = []
    for name, layer in hooked.items():
        module = modules[name]
        if name in observed.layers:
            spec, layer = observed.layers[name]
            layer.finish()
        elif layer.tokens == 0 or layer.top_k is None:
            continue
        elif getattr(module, "_is_expert_parallel", False):  # its module inputs are not its experts' inputs
            unseen.append(name)
            continue
        else:
            with _local_parameters(module):
                spec = LayerSpec.of(module, layer.top_k)
        groups[spec].append((name, module, layer))
    if unseen:
        warnings.warn(
            f"autoexperts: tune cannot see what the expert-parallel layers {', '.join(unseen)} ran (their experts "
            "implementation is not auto): run the block with experts_implementation='auto' to tune them",
            ProfileWarning,
            stacklevel=4,
        )
    return groups


def _routing(spec: LayerSpec, members: list) -> Routing:
    """The routing the block recorded for `spec`'s layers (uniform for an all-reduce expert-parallel rank's layer:
    its calls' routes to other ranks' experts were not counted)."""
    if spec.expert_shards > 1:
        return Routing()
    layers = tuple(
        CapturedLayer(name, layer.num_experts, layer.top_k, layer.tokens, tuple(layer.expert_counts))
        for name, _, layer in members
    )
    return Routing.in_place(layers).for_shape(spec.num_experts, spec.top_k)


def _tune_recorded(model: torch.nn.Module, groups: dict[LayerSpec, list], options: _Options, report) -> None:
    if not groups:
        raise UsageError("tune: the block ran no experts call, so there is nothing to tune on")
    config = getattr(model, "config", None)
    source = ModelSource(config, "tuned in place", getattr(config, "_name_or_path", "") or type(model).__name__)
    for spec, members in groups.items():
        name, module, _ = members[0]
        with _local_parameters(module):
            held = LayerSpec.of(module, spec.top_k)
        if held != spec:  # e.g. FSDP shards the experts further: the rank holds less than its forward gathers
            warnings.warn(
                f"autoexperts: tune cannot measure {spec.describe()} in place: {name} holds "
                f"{held.num_experts} experts between forwards, its forward runs {spec.num_experts}; calibrate it "
                f"with: {calibrate_hint(LayerKey.of(module, module.down_proj.device, spec.top_k))}",
                ProfileWarning,
                stacklevel=4,
            )
            continue
        device = module.down_proj.device
        calls = collections.Counter()
        for _, _, layer in members:
            calls.update(layer.calls_by_tokens)
        tokens = tuning_tokens(calls)
        backends = list(
            options.backends or runnable_backends(list(DEFAULT_BACKENDS), options.compile_mode, device.type)
        )
        backends = runnable_for_shape(spec, runnable_backends(backends, options.compile_mode, device.type))
        budget = memory_budget_bytes(device)
        logger.info(
            "tuning %s on %s: %d calls at %d token counts, measuring %d counts (%d–%d)",
            spec.describe(), name, sum(calls.values()), len(calls), len(tokens), tokens[0], tokens[-1],
        )  # fmt: skip
        started = time.perf_counter()
        plan = LayerCalibration(
            layer=ExpertsLayer(module=module, spec=spec, model_type=getattr(config, "model_type", "")),
            source=source,
            device=device,
            dtype=module.down_proj.dtype,
            device_name=device_name(device),
            folder=options.folder,
            backends=backends,
            tokens=tokens,
            routing=_routing(spec, members),
            compile_mode=options.compile_mode,
            seconds_per_point=options.seconds_per_point,
            progress=options.progress,
            resume=None,
            full_grid=True,
            parallel=parallel_layer_of(module, spec.top_k),
            launch=launch_id(),
            started=started,
            memory_limit_bytes=min(budget, SWEEP_MEMORY_FRACTION * free_memory_bytes(device)),
            refine=True,  # the crossovers placed as `calibrate` places them
        )
        with torch.no_grad(), _local_parameters(module):
            profile = calibrate_layer(plan)
        report.layers.append(_layer_tuning(spec, members, calls, profile, budget, time.perf_counter() - started))
        logger.info("tuned %s", report.layers[-1].summary())
    reset()  # every layer decides afresh, from the profiles just saved
    _warn_if_unread(options.folder)


def _layer_tuning(spec, members, calls, profile: Profile, budget: float, seconds: float) -> LayerTuning:
    return LayerTuning(
        spec=spec,
        layers=[name for name, _, _ in members],
        calls_by_tokens=dict(sorted(calls.items())),
        tokens_measured=sorted({m.num_tokens for m in profile.measurements}),
        regions=list(profile_table(profile, budget).regions),
        seconds=seconds,
        profile=profile.json_path,
        measured_elsewhere=profile.measured_elsewhere,
    )


def _warn_if_unread(folder: Path) -> None:
    """A folder `auto` does not read: the profiles are saved, but not used until `AUTOEXPERTS_PROFILE_DIR` names it."""
    if any(folder.resolve() == searched.resolve() for searched in store.search_dirs()):
        return
    warnings.warn(
        f"autoexperts: tune saved its profiles to {folder}, which auto does not read (it reads "
        f"{', '.join(str(d) for d in store.search_dirs())}): set AUTOEXPERTS_PROFILE_DIR={folder} to use them",
        ProfileWarning,
        stacklevel=3,
    )
