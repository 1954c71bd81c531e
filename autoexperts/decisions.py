"""Dispatch decisions and the ways to see them: hooks, `record_decisions()` and the `autoexperts.dispatch` logger."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Iterator

from .layer import LayerSpec
from .table import Prediction


@dataclasses.dataclass(frozen=True)
class Decision:
    """What `auto` ran for one experts call.

    Attributes:
        backend (`str`): the backend that ran, a Transformers backend name (`"eager"`, `"batched_mm"`, ...).
        num_tokens (`int`): the tokens in the call (rows of `hidden_states`).
        source (`str`, one of `table.Source`'s): `"profile"` (a calibrated profile chose), `"device_model"` (no
            profile matched; the device model predicted for this shape), `"fallback"` (no profile matched; the
            documented rule chose), `"over_budget"` (no candidate fitted the memory budget; the least memory-hungry
            ran) or `"runtime_fallback"` (the chosen backend raised for this call and this one ran in its place;
            hooks see the failed decision first, then this one).
        layer (`LayerSpec`): the experts layer the decision was made for (class, shape, dtype, device). Layers of
            one model with the same spec share their decisions.
        predicted (`dict[str, Prediction]`): each candidate's predicted latency and peak memory (empty without a
            profile).
        budget_bytes (`float`): the memory budget the choice respected.
        profile (`str | None`): the JSON file of the profile that decided, if any.
        reason (`str`): why backends were left out before any prediction, e.g. a shape `grouped_mm` cannot run on
            this device (empty when every backend could run).
    """

    backend: str
    num_tokens: int
    source: str
    layer: LayerSpec
    predicted: dict[str, Prediction] = dataclasses.field(default_factory=dict, compare=False)
    budget_bytes: float = float("inf")
    profile: str | None = None
    reason: str = ""

    def summary(self) -> str:
        """One readable line: layer, tokens, backend, why, and the predictions."""
        costs = ", ".join(
            f"{name} {p.latency_ms:.3g} ms/{p.peak_bytes / 2**20:.3g} MiB" + ("" if p.feasible else " (failed)")
            for name, p in self.predicted.items()
        )
        return (
            f"{self.layer.describe()} num_tokens={self.num_tokens} -> {self.backend} [{self.source}]"
            + (f" predicted: {costs}" if costs else "")
            + (f" ({self.reason})" if self.reason else "")
        )


DispatchHook = Callable[[Decision], None]

_hooks_lock = threading.Lock()
# Replaced (never mutated) so the dispatch path can iterate it without a lock.
_hooks: tuple[DispatchHook, ...] = ()


class HookHandle:
    """Returned by `add_dispatch_hook`; `.remove()` unregisters the hook (idempotent)."""

    def __init__(self, hook: DispatchHook):
        self._hook = hook

    def remove(self) -> None:
        global _hooks
        with _hooks_lock:
            _hooks = tuple(h for h in _hooks if h is not self._hook)

    def __enter__(self) -> HookHandle:
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()


def add_dispatch_hook(hook: DispatchHook) -> HookHandle:
    """Calls `hook(decision)` for every `auto` dispatch until the returned handle's `.remove()`.

    Example:
        ```python
        handle = autoexperts.add_dispatch_hook(lambda d: print(d.num_tokens, d.backend))
        model.generate(**inputs)
        handle.remove()
        ```
    """
    global _hooks
    if not callable(hook):
        raise TypeError(f"dispatch hook must be callable, got {type(hook).__name__}")
    wrapper = _Hook(hook)
    with _hooks_lock:
        _hooks = (*_hooks, wrapper)
    return HookHandle(wrapper)


class _Hook:
    """A distinct object per registration, so the same function can be added twice and removed once."""

    __slots__ = ("fn",)

    def __init__(self, fn: DispatchHook):
        self.fn = fn

    def __call__(self, decision: Decision) -> None:
        self.fn(decision)


def active_hooks() -> tuple[DispatchHook, ...]:
    return _hooks


@contextlib.contextmanager
def record_decisions() -> Iterator[list[Decision]]:
    """Collects every `auto` decision made inside the block, in call order.

    Example:
        ```python
        with autoexperts.record_decisions() as decisions:
            model(**inputs)
        print({(d.num_tokens, d.backend) for d in decisions})
        ```
    """
    decisions: list[Decision] = []
    handle = add_dispatch_hook(decisions.append)
    try:
        yield decisions
    finally:
        handle.remove()
