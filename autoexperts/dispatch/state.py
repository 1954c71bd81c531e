"""What `auto` keeps per layer spec, shared by every experts module of that spec: its `Selection` (from
`autoexperts.selection`, built on the first call) and a per-token-count cache of what to run; and the process-wide
settings that rebuild it (the memory budget, `reset()`).

Thread-safe: the cache and the table are replaced whole (never half-updated) under the module lock, and a reader works
from the objects it read first.
"""

from __future__ import annotations

import threading
from typing import NamedTuple

import torch

from .. import selection, settings
from ..choices import NONE
from ..decisions import Decision
from ..device import free_memory_bytes
from ..layer import DEFAULT_BACKENDS, ExpertsForward, backend_forward
from ..selection import LayerKey, Selection
from ..table import DecisionTable

# Token counts cached per table; beyond this many distinct counts, decisions are still made but not kept.
MAX_CACHED_TOKEN_COUNTS = 1 << 16

lock = threading.RLock()
_tables: dict[LayerKey, LayerDispatch] = {}
_budget_override: tuple[str, float] | None = None
# The tables' generation, bumped whenever they must be rebuilt (new budget, new profiles): a module whose state is
# older decides afresh. A one-item list, read on every call without a function call.
epoch = [0]


class Entry(NamedTuple):
    """What one call runs: the backend function and its decision. After a failover, also the backends that raised
    first for the call, which a gradient checkpoint's recomputation of it runs again, in order."""

    forward: ExpertsForward
    decision: Decision
    failed_first: tuple[ExpertsForward, ...] = ()


class LayerDispatch:
    """One layer spec's `Selection` and its per-token-count cache of `Entry`s."""

    def __init__(self, selection: Selection):
        self.selection = selection
        self.table = selection.table
        self.by_tokens: dict[int, Entry] = {}
        self.failed: dict[str, str] = {}  # backend -> why it is no longer chosen
        # `((last token count, backend), ...)` handed to `torch.compile` traces, built on the first trace.
        self.compiled_regions: tuple[tuple[float, str], ...] | None = None

    @property
    def experts_class(self) -> type:
        return self.selection.key.experts_class

    def decide(self, num_tokens: int) -> tuple[Entry, bool]:
        """The entry for `num_tokens` from the table, cached unless the cache is full; and whether it is a new
        decision (no other thread made it meanwhile)."""
        table, selection = self.table, self.selection
        region = table.region_for(num_tokens)
        decision = Decision(
            backend=region.backend,
            num_tokens=num_tokens,
            source=region.source,
            layer=table.spec,
            predicted=table.predictions(num_tokens),
            budget_bytes=table.budget_bytes,
            profile=selection.profile_path,
            reason=selection.reason,
        )
        entry = Entry(backend_forward(region.backend, self.experts_class), decision)
        with lock:
            cache = self.by_tokens
            new = num_tokens not in cache
            if new and len(cache) < MAX_CACHED_TOKEN_COUNTS:
                cache[num_tokens] = entry
        return entry, new

    def replacements(self, decision: Decision) -> list[str]:
        """The backends to try when `decision.backend` raised, best first: the others predicted to fit the budget,
        fastest first, then eager (the module's own forward), then the other default backends. Only backends that
        can run this layer here (`selection.candidates`) and have not failed for it."""
        fitting = sorted(
            (p.latency_ms, backend)
            for backend, p in decision.predicted.items()
            if p.feasible and p.peak_bytes <= decision.budget_bytes
        )
        order = dict.fromkeys([b for _, b in fitting] + list(DEFAULT_BACKENDS))
        candidates = self.selection.candidates
        return [b for b in order if b != decision.backend and b in candidates and b not in self.failed]

    def exclude(self, backend: str, reason: str) -> bool:
        """Stops choosing `backend` for this layer spec; returns whether it was still chosen until now."""
        with lock:
            if backend in self.failed:
                return False
            self.failed[backend] = reason
            self.table = self.selection.without(set(self.failed)).table
            self.by_tokens = {}
            return True


def dispatch_for(key: LayerKey) -> LayerDispatch:
    """The shared dispatch of `key`'s layer, built on first use (`selection.select`, under the memory budget)."""
    with lock:
        dispatch = _tables.get(key)
        if dispatch is None:
            dispatch = _tables[key] = LayerDispatch(selection.select(key, memory_budget_bytes(key.device)))
        return dispatch


def decision_table(
    module: torch.nn.Module, device: torch.device, top_k: int, compile_mode: str = NONE
) -> DecisionTable:
    """The decision table `auto` uses for `module` on `device` in `compile_mode` (built on first use, then shared),
    e.g. to see what compiled code chose, where no hook runs."""
    return dispatch_for(LayerKey.of(module, device, top_k, compile_mode)).table


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
    with lock:
        _budget_override = parsed
    reset()


def reset() -> None:
    """Forgets every decision table, so the next call of each layer looks for profiles and budgets anew."""
    with lock:
        _tables.clear()
        selection.forget()
        epoch[0] += 1
