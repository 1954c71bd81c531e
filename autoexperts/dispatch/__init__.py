"""The `"auto"` experts backend: a per-call lookup of the token count in the layer's decision table.

The per-call path, in this module: the module's state (per dtype, device and top_k) gives its layer's shared
dispatch (`dispatch.state`); the token count gives a cached `Entry` (backend function and `Decision`); the registered
hooks see the decision; Transformers' own backend function runs. The first call of a layer builds its decision table
(`autoexperts.selection`, read top-down there); the first call at a token count decides it from the table, with one
DEBUG record on this module's logger.

The other paths live beside it: `dispatch.failover` (a backend that raises, and a gradient checkpoint's replay of
what a forward ran) and `dispatch.traced` (`torch.compile` and `torch.export`, where the table is a trace-time
constant).

Pickling: the per-module state pickles (and deep-copies) as `None`, so `torch.save(model)`, `copy.deepcopy` and
`pickle` work after `auto` ran, and the copy decides afresh on its first call.
"""

from __future__ import annotations

import contextlib
import logging
import traceback
from collections.abc import Callable, Iterator

import torch

from ..decisions import active_hooks
from ..layer import backend_forward as backend_forward
from ..selection import LayerKey
from .failover import is_framework_control_flow, replay, run_in_place_of, same_call
from .state import Entry, LayerDispatch, dispatch_for, epoch, lock
from .state import decision_table as decision_table
from .state import memory_budget_bytes as memory_budget_bytes
from .state import reset as reset
from .state import set_memory_budget as set_memory_budget
from .traced import traced_backend

logger = logging.getLogger(__name__)

_STATE_ATTR = "_autoexperts_state"
# Calls remembered per module for a checkpoint's recomputation (one per token count; a training step needs a few).
_MAX_REMEMBERED_CALLS = 1 << 10
# -1 outside the autograd engine; the id of the running backward inside it (where checkpoints recompute).
_graph_task_id = torch._C._current_graph_task_id

# Called as `observer(module, hidden_states, top_k_index)` with every experts call `auto` runs in a forward: the inputs
# the layer itself gets (also under expert parallelism, after the exchange), what `autoexperts.tune` records. Replaced,
# never mutated, so the per-call path reads it without a lock.
_observers: tuple[Callable, ...] = ()

__all__ = [
    "auto_experts_forward",
    "decision_table",
    "dispatch_entry",
    "is_framework_control_flow",
    "memory_budget_bytes",
    "observe_calls",
    "reset",
    "set_memory_budget",
]


class _ModuleState:
    """Per experts module: the dispatch for each (dtype, device, top_k) it has been called with, and what its calls
    ran (`ran[num_tokens]`, the entry a gradient checkpoint's recomputation of that call replays)."""

    __slots__ = ("dispatch", "epoch", "ran")

    def __init__(self, epoch: int, ran: dict[int, Entry] | None = None):
        self.epoch = epoch
        self.dispatch: dict[tuple, LayerDispatch] = {}
        self.ran: dict[int, Entry] = ran if ran is not None else {}

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
        return traced_backend(self, hidden_states, top_k_index)(self, hidden_states, top_k_index, top_k_weights)
    if _graph_task_id() != -1:  # inside backward: a gradient checkpoint recomputing the forward
        return _recompute(self, hidden_states, top_k_index, top_k_weights)
    entry = dispatch_entry(self, hidden_states, top_k_index)
    hooks = active_hooks()
    if hooks:
        for hook in hooks:
            hook(entry.decision)
    if _observers:
        for observe in _observers:
            observe(self, hidden_states, top_k_index)
    try:
        return entry.forward(self, hidden_states, top_k_index, top_k_weights)
    except Exception as error:  # costs nothing until a backend raises
        if is_framework_control_flow(error):
            raise
        failure = error
        # The failed call's tensors (held by the traceback's frames) are freed before the next backend runs; the
        # error keeps its message and line numbers, to be raised if nothing else can run the call.
        traceback.clear_frames(error.__traceback__)
    return _fail_over(self, entry, failure, hidden_states, top_k_index, top_k_weights)


@contextlib.contextmanager
def observe_calls(observer: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], None]) -> Iterator[None]:
    """Calls `observer(module, hidden_states, top_k_index)` with every experts call `auto` runs in a forward inside
    the block (not a checkpoint's recomputation, not compiled code)."""
    global _observers
    with lock:
        _observers = (*_observers, observer)
    try:
        yield
    finally:
        with lock:
            _observers = tuple(o for o in _observers if o is not observer)


def dispatch_entry(self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor) -> Entry:
    """The hot path's lookup: this call's `Entry` from the module's cached tables; also remembers it as what this
    module ran at this token count (see `_recompute`)."""
    state = self.__dict__.get(_STATE_ATTR)
    if state is None or state.epoch != epoch[0]:
        # A new epoch rebuilds the tables, but what ran is kept: a pending backward must still replay it.
        state = self.__dict__[_STATE_ATTR] = _ModuleState(epoch[0], state.ran if state is not None else None)
    key = (hidden_states.dtype, hidden_states.device, top_k_index.shape[-1])
    dispatch = state.dispatch.get(key)
    if dispatch is None:
        dispatch = state.dispatch[key] = _layer_dispatch(self, hidden_states, top_k_index)
    num_tokens = hidden_states.shape[0]
    entry = dispatch.by_tokens.get(num_tokens) or _decide(dispatch, num_tokens)
    ran = state.ran
    if len(ran) >= _MAX_REMEMBERED_CALLS:  # a backward replays recent calls only; forget the old ones
        ran.clear()
    ran[num_tokens] = entry
    return entry


def _layer_dispatch(module: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor) -> LayerDispatch:
    """The first call of `module` with this dtype, device and top_k: its layer's shared dispatch (the decision table
    is built here on the first call of the layer spec, see `autoexperts.selection`)."""
    return dispatch_for(LayerKey.of(module, hidden_states.device, top_k_index.shape[-1]))


def _decide(dispatch: LayerDispatch, num_tokens: int) -> Entry:
    """The first call at `num_tokens`: the table's entry, logged once."""
    entry, new = dispatch.decide(num_tokens)
    if new:
        logger.debug("%s", entry.decision.summary())
    return entry


def _fail_over(
    module: torch.nn.Module,
    entry: Entry,
    failure: Exception,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """`entry`'s backend raised `failure`: the call runs on the next candidate (`failover.run_in_place_of`), which
    becomes what this module ran at this token count, and the hooks see its decision."""
    state = module.__dict__.get(_STATE_ATTR)
    key = (hidden_states.dtype, hidden_states.device, top_k_index.shape[-1])
    dispatch = state.dispatch.get(key) if state is not None else None
    if dispatch is None:  # tables were reset since the lookup
        dispatch = _layer_dispatch(module, hidden_states, top_k_index)
    output, ran = run_in_place_of(dispatch, entry.decision, failure, module, hidden_states, top_k_index, top_k_weights)
    if state is not None:  # what a checkpoint's recomputation of this call replays
        state.ran[ran.decision.num_tokens] = ran
    for hook in active_hooks():
        hook(ran.decision)
    return output


def _recompute(
    module: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """A call made inside backward (a gradient checkpoint's recomputation): replays what the module's forward ran at
    this token count (`failover.replay`). Without a record (no forward of this module was seen), the call is
    dispatched as a forward is."""
    state = module.__dict__.get(_STATE_ATTR)
    entry = state.ran.get(hidden_states.shape[0]) if state is not None else None
    if entry is None or not same_call(entry.decision, hidden_states, top_k_index):
        entry = dispatch_entry(module, hidden_states, top_k_index)
        return entry.forward(module, hidden_states, top_k_index, top_k_weights)
    return replay(entry, module, hidden_states, top_k_index, top_k_weights)
