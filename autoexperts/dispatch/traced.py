"""`auto` inside `torch.compile` and `torch.export`: the decision table as a trace-time constant.

The table is fetched once per trace by a function Dynamo runs at trace time and treats as a constant
(`torch.compiler.assume_constant_result`), and the traced code compares the token count with the region boundaries:
with dynamic shapes each comparison becomes a guard, so there is one graph per decision region, not per token count.
Hooks are not called from compiled code (a graph has no Python to call them per call); each table a trace uses is
logged once instead. An exported program is one graph for every token count its dynamic shapes allow, so there it
runs one backend: the one for the largest count.
"""

from __future__ import annotations

import logging
import math
import operator

import torch

from .. import compile_mode as modes
from ..choices import DEFAULT, NONE
from ..layer import ExpertsForward, backend_forward
from ..selection import LayerKey, TraceParts
from .state import dispatch_for

logger = logging.getLogger(__name__)


def traced_backend(
    module: torch.nn.Module,
    hidden_states: torch.Tensor,  # (num_tokens, hidden_dim)
    top_k_index: torch.Tensor,  # (num_tokens, top_k)
) -> ExpertsForward:
    """The backend function for this call, as code `torch.compile` can trace without a graph break.

    The region boundaries come back from `_compiled_regions` as constants; the token count is a `SymInt` under
    dynamic shapes, so each comparison below becomes a guard and every decision region gets one graph.
    """
    # top_k is symbolic where the experts call starts a frame of its own (after a graph break upstream, or the module
    # compiled alone: its inputs are then graph inputs, every dimension dynamic). `operator.index` specialises it
    # with a guard (`int` keeps it symbolic), so the table's parts stay constants and the lookup does not break the
    # graph.
    parts = TraceParts.of(module, hidden_states, operator.index(top_k_index.shape[-1]))
    # Handed over as a plain tuple: Dynamo rebuilds a NamedTuple argument of a constant-result function wrongly.
    regions = _compiled_regions(tuple(parts))
    num_tokens = hidden_states.shape[0]
    if isinstance(num_tokens, torch.SymInt) and torch.compiler.is_exporting():
        # A guard on the count would break the user's range (torch.export raises): the largest count's backend.
        num_tokens = _largest_value(num_tokens)
    backend = regions[-1][1]
    for last, name in regions[:-1]:
        if num_tokens <= last:
            backend = name
            break
    return backend_forward(backend, type(module))


def _largest_value(size: torch.SymInt) -> float:
    """The largest value a symbolic size can take in this trace (its shape environment's bound; `inf` if none)."""
    upper = size.node.shape_env.bound_sympy(size.node.expr).upper
    return float(upper) if upper.is_finite else math.inf


# Never traced: after a graph break elsewhere, Dynamo may meet this function as a frame of its own and would otherwise
# trace into the table building (locks, file reads, logging) instead of just running it.
@torch.compiler.disable
def _regions_of(parts: tuple) -> tuple[tuple[float, str], ...]:
    """`((last token count, backend), ...)` of the layer's decision table for the compile mode being traced; `parts`
    is a `TraceParts`' tuple."""
    compile_mode = modes.traced_compile_mode()
    if compile_mode == NONE:  # called outside a trace (torch.compile is not tracing): the default mode's table
        compile_mode = DEFAULT
    dispatch = dispatch_for(LayerKey.from_trace_parts(TraceParts._make(parts), compile_mode))
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
def _compiled_regions(parts: tuple) -> tuple[tuple[float, str], ...]:
    """Runs at trace time (Dynamo calls it and keeps the result as a constant): `_regions_of(parts)`."""
    return _regions_of(parts)
