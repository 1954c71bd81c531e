"""The `"auto"` experts backend: a per-call lookup of the token count in the layer's decision table.

The first call on a layer (per dtype, device and top_k) finds its profile and builds its decision table; tables are
shared by all layers of the same spec. Every later call is a dict lookup on the token count, a walk over the
registered hooks (if any), and a call of Transformers' own backend function.

Faults: when the chosen backend raises, the same call runs on the next candidate (the others predicted to fit the
budget, fastest first, then eager, then the other default backends this layer can run); once one succeeds, the
failing backend is excluded for that layer spec (its table is rebuilt without it) and a `BackendFailedWarning` is
given once. Only a backend's own failure is handled so: the exceptions frameworks raise through a call to steer it
(`torch.utils.checkpoint` stopping a recomputation early, Dynamo, fake tensors; `KeyboardInterrupt` and other
`BaseException`s) pass untouched. The `try` costs nothing while nothing raises.

Recomputation: a gradient checkpoint runs the forward again during backward (inside the autograd engine), and its
saved tensors must match the first run's. So every call remembers, per module and token count, what it ran; a call
made during backward replays exactly that (the backends that raised first, then the one whose output was used),
with no new decision, no failover and no hooks (it is not a new forward).

Pickling: the per-module state pickles (and deep-copies) as `None`, so `torch.save(model)`, `copy.deepcopy` and
`pickle` work after `auto` ran, and the copy decides afresh on its first call.

Under `torch.compile` the table is fetched once per trace by a function Dynamo runs at trace time and treats as a
constant (`torch.compiler.assume_constant_result`), and the traced code compares the token count with the region
boundaries: with dynamic shapes each comparison becomes a guard, so there is one graph per decision region, not
per token count. Hooks are not called from compiled code (a graph has no Python to call them per call); each table a
trace uses is logged once instead.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import operator
import threading
import traceback
import warnings

import torch
from transformers.integrations.moe import ExpertsInterface

from . import compile_mode as modes
from . import selection, settings
from .decisions import Decision, active_hooks
from .device import free_memory_bytes
from .errors import BackendFailedWarning, user_stacklevel
from .layer import AUTO, DEFAULT_BACKENDS, backend_forward
from .selection import LayerKey, Selection, trace_parts
from .table import DecisionTable

logger = logging.getLogger(__name__)

_STATE_ATTR = "_autoexperts_state"
# Token counts cached per table; beyond this many distinct counts, decisions are still made but not kept.
_MAX_CACHED_TOKEN_COUNTS = 1 << 16
# Calls remembered per module for a checkpoint's recomputation (one per token count; a training step needs a few).
_MAX_REMEMBERED_CALLS = 1 << 10
# -1 outside the autograd engine; the id of the running backward inside it (where checkpoints recompute).
_graph_task_id = torch._C._current_graph_task_id

_lock = threading.RLock()
_tables: dict[LayerKey, _LayerDispatch] = {}
_budget_override: tuple[str, float] | None = None
# Bumped whenever tables must be rebuilt (new budget, new profiles); modules compare it on every call.
_epoch = [0]


class _LayerDispatch:
    """One layer's `Selection` and its per-token-count cache of `(backend function, Decision)`.

    Thread-safe: the cache and the table are replaced whole (never half-updated) under the module lock, and a
    reader works from the objects it read first.
    """

    def __init__(self, selection: Selection):
        self.selection = selection
        self.table = selection.table
        self.experts_class = selection.key.experts_class
        self.profile_path = selection.profile_path
        # The backends that may run this layer here (replacements come from these).
        self.candidates = selection.candidates
        self.reason = selection.reason
        self.by_tokens: dict[int, tuple] = {}
        self.failed: dict[str, str] = {}  # backend -> why it is no longer chosen
        # `((last token count, backend), ...)` handed to `torch.compile` traces, built on the first trace.
        self.compiled_regions: tuple | None = None

    def decide(self, num_tokens: int) -> tuple:
        table, cache = self.table, self.by_tokens
        region = table.region_for(num_tokens)
        decision = Decision(
            backend=region.backend,
            num_tokens=num_tokens,
            source=region.source,
            layer=table.spec,
            predicted=table.predictions(num_tokens),
            budget_bytes=table.budget_bytes,
            profile=self.profile_path,
            reason=self.reason,
        )
        entry = (backend_forward(region.backend, self.experts_class), decision)
        with _lock:
            if num_tokens not in cache:
                if len(cache) < _MAX_CACHED_TOKEN_COUNTS:
                    cache[num_tokens] = entry
                logger.debug("%s", decision.summary())
        return entry

    def replacements(self, decision: Decision) -> list[str]:
        """The backends to try when `decision.backend` raised, best first: the others predicted to fit the budget,
        fastest first, then eager (the module's own forward), then the other default backends. Only backends that
        can run this layer here (`candidates`) and have not failed for it."""
        fitting = sorted(
            (p.latency_ms, backend)
            for backend, p in decision.predicted.items()
            if p.feasible and p.peak_bytes <= decision.budget_bytes
        )
        order = dict.fromkeys([b for _, b in fitting] + list(DEFAULT_BACKENDS))
        return [b for b in order if b != decision.backend and b in self.candidates and b not in self.failed]

    def exclude(self, backend: str, reason: str) -> bool:
        """Stops choosing `backend` for this layer spec; returns whether it was still chosen until now."""
        with _lock:
            if backend in self.failed:
                return False
            self.failed[backend] = reason
            self.table = self.selection.without(set(self.failed))
            self.by_tokens = {}
            return True


class _ModuleState:
    """Per experts module: the dispatch for each (dtype, device, top_k) it has been called with, and what its calls
    ran (`ran[num_tokens]`, the entry a gradient checkpoint's recomputation of that call replays)."""

    __slots__ = ("dispatch", "epoch", "ran")

    def __init__(self, epoch: int, ran: dict | None = None):
        self.epoch = epoch
        self.dispatch: dict[tuple, _LayerDispatch] = {}
        self.ran: dict[int, tuple] = ran if ran is not None else {}

    def __reduce__(self):
        # Pickled and deep-copied as `None`: the state holds functions (eager's is not importable by name) and
        # tables of this process; a copy decides again on its first call.
        return (type(None), ())


def auto_experts_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """Runs the backend the layer's decision table gives for this call's token count.

    Args:
        self (`torch.nn.Module`): an experts module (a class decorated with `@use_experts_implementation`).
        hidden_states (`torch.Tensor`): `(num_tokens, hidden_dim)`.
        top_k_index (`torch.Tensor`): `(num_tokens, top_k)` expert ids.
        top_k_weights (`torch.Tensor`): `(num_tokens, top_k)` routing weights.

    Returns:
        `torch.Tensor`: `(num_tokens, hidden_dim)`, exactly the chosen backend's output.
    """
    if torch.compiler.is_compiling():
        return _traced_backend(self, hidden_states, top_k_index)(self, hidden_states, top_k_index, top_k_weights)
    if _graph_task_id() != -1:  # inside backward: a gradient checkpoint recomputing the forward
        return _recompute(self, hidden_states, top_k_index, top_k_weights)
    backend, decision = dispatch_entry(self, hidden_states, top_k_index)
    hooks = active_hooks()
    if hooks:
        for hook in hooks:
            hook(decision)
    try:
        return backend(self, hidden_states, top_k_index, top_k_weights)
    except Exception as error:  # costs nothing until a backend raises
        if is_framework_control_flow(error):
            raise
        failure = error
        # The failed call's tensors (held by the traceback's frames) are freed before the next backend runs; the
        # error keeps its message and line numbers, to be raised if nothing else can run the call.
        traceback.clear_frames(error.__traceback__)
    return _run_in_place_of(self, decision, failure, hidden_states, top_k_index, top_k_weights)


# Modules whose exceptions steer a call from outside (a checkpoint's early stop of a recomputation, Dynamo's graph
# breaks and restarts, fake-tensor and export tracing): never a backend's failure, never retried on another backend.
_FRAMEWORK_MODULES = ("torch.utils.checkpoint", "torch._dynamo", "torch._subclasses", "torch.fx", "torch.export")


def is_framework_control_flow(error: BaseException) -> bool:
    """Whether `error` is a framework's control flow passing through an experts call rather than a backend failing
    (see `_FRAMEWORK_MODULES`); `BaseException`s that are not `Exception`s (`KeyboardInterrupt`, ...) always are."""
    if not isinstance(error, Exception):
        return True
    return any(
        type(error).__module__ == name or type(error).__module__.startswith(name + ".") for name in _FRAMEWORK_MODULES
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def _describe_error(error: BaseException) -> str:
    return f"{type(error).__name__}: {_first_line(error)}"


def _recompute(
    module: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """A call made inside backward (a gradient checkpoint's recomputation): replays what the module's forward ran at
    this token count, so the recomputed tensors match the saved ones. A backend that raised in the forward is run
    again first (it saves the same tensors before raising), then the one whose output was used; nothing is decided
    anew, no backend is swapped and no hook is called. Without a record (no forward of this module was seen), the
    call is dispatched as a forward is."""
    state = module.__dict__.get(_STATE_ATTR)
    entry = state.ran.get(hidden_states.shape[0]) if state is not None else None
    if entry is None or not _same_call(entry[1], hidden_states, top_k_index):
        backend, _ = dispatch_entry(module, hidden_states, top_k_index)
        return backend(module, hidden_states, top_k_index, top_k_weights)
    backend, _, *failed_first = entry
    for failed in failed_first[0] if failed_first else ():
        try:
            failed(module, hidden_states, top_k_index, top_k_weights)
        except Exception as error:
            if is_framework_control_flow(error):
                raise
    return backend(module, hidden_states, top_k_index, top_k_weights)


def _same_call(decision: Decision, hidden_states: torch.Tensor, top_k_index: torch.Tensor) -> bool:
    """Whether `decision` was made for a call like this one (a recomputation repeats its forward's call exactly)."""
    layer = decision.layer
    return layer.top_k == top_k_index.shape[-1] and layer.dtype == str(hidden_states.dtype).removeprefix("torch.")


def _run_in_place_of(
    module: torch.nn.Module,
    decision: Decision,
    failure: Exception,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """Runs the next candidate after `decision.backend` raised `failure` (see `_LayerDispatch.replacements`).

    The failing backend is excluded for the layer spec only once another backend ran the same call. When every
    replacement fails too, the input itself is at fault: `failure` (the chosen backend's error) is raised, with the
    replacements' errors logged and noted on it.
    """
    state = module.__dict__.get(_STATE_ATTR)
    key = (hidden_states.dtype, hidden_states.device, top_k_index.shape[-1])
    dispatch = state.dispatch.get(key) if state is not None else None
    if dispatch is None:  # tables were reset since the lookup
        dispatch = _layer_dispatch(module, hidden_states.device, top_k_index.shape[-1])
    failed = [backend_forward(decision.backend, dispatch.experts_class)]
    others: list[str] = []
    for name in dispatch.replacements(decision):
        forward = backend_forward(name, dispatch.experts_class)
        try:
            output = forward(module, hidden_states, top_k_index, top_k_weights)
        except Exception as error:
            if is_framework_control_flow(error):
                raise
            others.append(f"{name} ({_describe_error(error)})")
            logger.debug("replacement %s failed too: %s", name, _describe_error(error))
            traceback.clear_frames(error.__traceback__)
            failed.append(forward)
            continue
        if dispatch.exclude(decision.backend, _describe_error(failure)):
            message = (
                f"autoexperts: backend {decision.backend} raised for {decision.layer.describe()} at "
                f"{decision.num_tokens} tokens ({_describe_error(failure)}); {name} ran in its place, and "
                f"{decision.backend} is no longer chosen for this layer shape"
            )
            warnings.warn(message, BackendFailedWarning, stacklevel=user_stacklevel())
            logger.warning("%s", message)
        replacement = dataclasses.replace(decision, backend=name, source="runtime_fallback")
        if state is not None:  # what a checkpoint's recomputation of this call replays
            state.ran[decision.num_tokens] = (forward, replacement, tuple(failed))
        for hook in active_hooks():
            hook(replacement)
        return output
    note = f"autoexperts: {decision.backend} raised this"
    note += f"; the other backends failed too: {'; '.join(others)}" if others else "; no other backend can run here"
    logger.warning("%s for %s at %d tokens", note, decision.layer.describe(), decision.num_tokens)
    if hasattr(failure, "add_note"):  # Python 3.11+
        failure.add_note(note)
    raise failure


def dispatch_entry(self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor) -> tuple:
    """The hot path's lookup: `(backend function, Decision)` for this call, from the module's cached tables; also
    remembers it as what this module ran at this token count (see `_recompute`)."""
    state = self.__dict__.get(_STATE_ATTR)
    if state is None or state.epoch != _epoch[0]:
        # A new epoch rebuilds the tables, but what ran is kept: a pending backward must still replay it.
        state = self.__dict__[_STATE_ATTR] = _ModuleState(_epoch[0], state.ran if state is not None else None)
    key = (hidden_states.dtype, hidden_states.device, top_k_index.shape[-1])
    dispatch = state.dispatch.get(key)
    if dispatch is None:
        dispatch = state.dispatch[key] = _layer_dispatch(self, hidden_states.device, top_k_index.shape[-1])
    num_tokens = hidden_states.shape[0]
    entry = dispatch.by_tokens.get(num_tokens) or dispatch.decide(num_tokens)
    ran = state.ran
    if len(ran) >= _MAX_REMEMBERED_CALLS:  # a backward replays recent calls only; forget the old ones
        ran.clear()
    ran[num_tokens] = entry
    return entry


def current_compile_mode() -> str:
    """The compile mode whose profiles apply to the running code: `"none"` outside `torch.compile`, else the mode
    being traced (see `autoexperts.compile_mode`)."""
    return modes.traced_compile_mode()


def _traced_backend(self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor):
    """The backend function for this call, as code `torch.compile` can trace without a graph break.

    The region boundaries come back from `_compiled_regions` as constants; the token count is a `SymInt` under
    dynamic shapes, so each comparison below becomes a guard and every decision region gets one graph.
    """
    # top_k is symbolic where the experts call starts a frame of its own (after a graph break upstream, or the module
    # compiled alone: its inputs are then graph inputs, every dimension dynamic). `operator.index` specialises it
    # with a guard (`int` keeps it symbolic), so the table's parts stay constants and the lookup does not break the
    # graph.
    regions = _compiled_regions(trace_parts(self, hidden_states, operator.index(top_k_index.shape[-1])))
    num_tokens = hidden_states.shape[0]
    if isinstance(num_tokens, torch.SymInt) and torch.compiler.is_exporting():
        # An exported program is one graph for every token count its dynamic shapes allow: a guard on the count
        # would break the user's range (torch.export raises). One backend runs them all: the one for the largest.
        num_tokens = _largest_value(num_tokens)
    backend = regions[-1][1]
    for last, name in regions[:-1]:
        if num_tokens <= last:
            backend = name
            break
    return backend_forward(backend, type(self))


def _largest_value(size: torch.SymInt) -> float:
    """The largest value a symbolic size can take in this trace (its shape environment's bound; `inf` if none)."""
    upper = size.node.shape_env.bound_sympy(size.node.expr).upper
    return float(upper) if upper.is_finite else math.inf


# Never traced: after a graph break elsewhere, Dynamo may meet this function as a frame of its own and would otherwise
# trace into the table building (locks, file reads, logging) instead of just running it.
@torch.compiler.disable
def _regions_of(parts: tuple) -> tuple:
    """`((last token count, backend), ...)` of the layer's decision table for the compile mode being traced; `parts`
    is `selection.trace_parts`' tuple."""
    compile_mode = modes.traced_compile_mode()
    if compile_mode == modes.NONE:  # called outside a trace (torch.compile is not tracing): the default mode's table
        compile_mode = modes.DEFAULT
    dispatch = _dispatch_for(LayerKey.from_trace_parts(parts, compile_mode))
    if dispatch.compiled_regions is None:
        # Neighbouring regions of one backend (e.g. within and over the budget) need no guard between them.
        merged: list[list] = []
        for region in dispatch.table.regions:
            if merged and merged[-1][1] == region.backend:
                merged[-1][0] = region.last
            else:
                merged.append([region.last, region.backend])
        dispatch.compiled_regions = tuple((last, backend) for last, backend in merged)
        logger.debug(
            "compiled (%s): %s: %s [%s]",
            compile_mode,
            dispatch.table.spec.describe(),
            ", ".join(f"up to {last:g} tokens -> {backend}" for last, backend in dispatch.compiled_regions),
            dispatch.table.regions[0].source,
        )
    return dispatch.compiled_regions


@torch.compiler.assume_constant_result
def _compiled_regions(parts: tuple) -> tuple:
    """Runs at trace time (Dynamo calls it and keeps the result as a constant): `_regions_of(parts)`."""
    return _regions_of(parts)


def memory_budget_bytes(device: torch.device, setting: tuple[str, float] | None = None) -> float:
    """The memory budget in bytes for one experts call on `device`.

    Args:
        device (`torch.device`): where a fractional budget takes its share of the free memory.
        setting (`tuple[str, float]`, *optional*): a parsed budget (default: `set_memory_budget`'s, else the
            environment's).
    """
    kind, value = setting or _budget_override or settings.memory_budget_setting()
    return value * free_memory_bytes(device) if kind == "fraction" else value


def set_memory_budget(budget: str | float | int | None) -> None:
    """Sets the memory budget of every `auto` layer in this process (overrides `AUTOEXPERTS_MEMORY_BUDGET`).

    Args:
        budget (`str`, `float`, `int` or `None`): bytes (`"8GiB"`, `2**33`), a fraction of the device's free memory
            (`0.5`), or `None` to go back to the environment's setting. Decision tables are rebuilt on the next call.
    """
    global _budget_override
    parsed = None if budget is None else settings.parse_memory_budget(budget)
    with _lock:
        _budget_override = parsed
    reset()


def reset() -> None:
    """Forgets every decision table, so the next call of each layer looks for profiles and budgets anew."""
    with _lock:
        _tables.clear()
        selection.forget()
        _epoch[0] += 1


def decision_table(
    module: torch.nn.Module, device: torch.device, top_k: int, compile_mode: str = modes.NONE
) -> DecisionTable:
    """The decision table `auto` uses for `module` on `device` in `compile_mode` (built on first use, then shared),
    e.g. to see what compiled code chose, where no hook runs."""
    return _dispatch_for(LayerKey.of(module, device, top_k, compile_mode)).table


def _layer_dispatch(module: torch.nn.Module, device: torch.device, top_k: int) -> _LayerDispatch:
    return _dispatch_for(LayerKey.of(module, device, top_k))


def _dispatch_for(key: LayerKey) -> _LayerDispatch:
    """The shared dispatch of `key`'s layer, built on first use."""
    with _lock:
        dispatch = _tables.get(key)
        if dispatch is None:
            dispatch = _tables[key] = _LayerDispatch(selection.select(key, memory_budget_bytes(key.device)))
        return dispatch


def register() -> None:
    """Registers `"auto"` with Transformers' experts interface (idempotent), and the FP8 experts interface's
    rejecting `"auto"` (see `autoexperts.fp8`)."""
    from . import fp8

    ExpertsInterface.register(AUTO, auto_experts_forward)
    fp8.register()
