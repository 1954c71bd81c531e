"""When the backend `auto` chose raises, and when a gradient checkpoint runs a forward again.

**Failover**: the same call runs on the next candidate (`LayerDispatch.replacements`: the others predicted to fit the
budget, fastest first, then eager, then the other default backends this layer can run); once one succeeds, the
failing backend is excluded for that layer spec (its table is rebuilt without it) and a `BackendFailedWarning` is
given once. Only a backend's own failure is handled so: the exceptions frameworks raise through a call to steer it
(`torch.utils.checkpoint` stopping a recomputation early, Dynamo, fake tensors; `KeyboardInterrupt` and other
`BaseException`s) pass untouched.

**Replay**: a gradient checkpoint runs the forward again during backward (inside the autograd engine), and its saved
tensors must match the first run's. So every call remembers, per module and token count, what it ran (its
`Entry`); a call made during backward replays exactly that (the backends that raised first, then the one whose
output was used), with no new decision, no failover and no hooks (it is not a new forward).
"""

from __future__ import annotations

import dataclasses
import logging
import traceback
import warnings

import torch

from ..decisions import Decision
from ..errors import BackendFailedWarning, user_stacklevel
from ..layer import backend_forward
from ..table import Source
from .state import Entry, LayerDispatch

logger = logging.getLogger(__name__)

# Modules whose exceptions steer a call from outside (a checkpoint's early stop of a recomputation, Dynamo's graph
# breaks and restarts, fake-tensor and export tracing): never a backend's failure, never retried on another backend.
_FRAMEWORK_MODULES = ("torch.utils.checkpoint", "torch._dynamo", "torch._subclasses", "torch.fx", "torch.export")


def is_framework_control_flow(error: BaseException) -> bool:
    """Whether `error` is a framework's control flow passing through an experts call rather than a backend failing
    (see `_FRAMEWORK_MODULES`); `BaseException`s that are not `Exception`s (`KeyboardInterrupt`, ...) always are."""
    if not isinstance(error, Exception):
        return True
    module = type(error).__module__
    return any(module == name or module.startswith(name + ".") for name in _FRAMEWORK_MODULES)


def _describe_error(error: BaseException) -> str:
    """`Type: first line of the message`."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def run_in_place_of(
    dispatch: LayerDispatch,
    decision: Decision,
    failure: Exception,
    module: torch.nn.Module,
    hidden_states: torch.Tensor,  # (num_tokens, hidden_dim)
    top_k_index: torch.Tensor,  # (num_tokens, top_k)
    top_k_weights: torch.Tensor,  # (num_tokens, top_k)
) -> tuple[torch.Tensor, Entry]:
    """Runs the next candidate after `decision.backend` raised `failure`; returns its output and the `Entry` of what
    ran (its decision, source `"runtime_fallback"`, for the hooks; the whole entry for a recomputation to replay).

    The failing backend is excluded for the layer spec only once another backend ran the same call. When every
    replacement fails too, the input itself is at fault: `failure` (the chosen backend's error) is raised, with the
    replacements' errors logged and noted on it.
    """
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
        replacement = dataclasses.replace(decision, backend=name, source=Source.RUNTIME_FALLBACK)
        return output, Entry(forward, replacement, tuple(failed))
    note = f"autoexperts: {decision.backend} raised this"
    note += f"; the other backends failed too: {'; '.join(others)}" if others else "; no other backend can run here"
    logger.warning("%s for %s at %d tokens", note, decision.layer.describe(), decision.num_tokens)
    if hasattr(failure, "add_note"):  # Python 3.11+
        failure.add_note(note)
    raise failure


def replay(
    entry: Entry,
    module: torch.nn.Module,
    hidden_states: torch.Tensor,  # (num_tokens, hidden_dim)
    top_k_index: torch.Tensor,  # (num_tokens, top_k)
    top_k_weights: torch.Tensor,  # (num_tokens, top_k)
) -> torch.Tensor:
    """Runs again what a forward ran (`entry`), for a gradient checkpoint's recomputation: the backends that raised
    first (they save the same tensors before raising), then the one whose output was used. Nothing is decided anew,
    no backend is swapped and no hook is called."""
    for failed in entry.failed_first:
        try:
            failed(module, hidden_states, top_k_index, top_k_weights)
        except Exception as error:
            if is_framework_control_flow(error):
                raise
    return entry.forward(module, hidden_states, top_k_index, top_k_weights)


def same_call(decision: Decision, hidden_states: torch.Tensor, top_k_index: torch.Tensor) -> bool:
    """Whether `decision` was made for a call like this one (a recomputation repeats its forward's call exactly)."""
    layer = decision.layer
    return layer.top_k == top_k_index.shape[-1] and layer.dtype == str(hidden_states.dtype).removeprefix("torch.")
