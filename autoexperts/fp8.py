"""FP8 experts: `auto` runs Transformers' default FP8 backend for them, and says so once.

Fine-grained FP8 checkpoints swap each experts layer for Transformers' `FP8Experts`, whose backends live in a
registry of their own (`FP8ExpertsInterface`: `batched_mm`, `grouped_mm`, `deepgemm`, ...). Their costs are not
those of the unquantized kernels `calibrate` measures, so `auto` has nothing to decide with. It must still run: with
`"auto"` as a model's default (or set on a whole model whose experts are quantized), an error would break a model
that runs without it. So `auto` registers itself there too and runs what Transformers runs when no implementation
is asked for (`grouped_mm`), except where that backend cannot run the layer (static activation scales: the FP8
`grouped_mm` rejects them, the eager loop handles them), with one `ProfileMissingWarning` per layer class.
"""

from __future__ import annotations

import logging

import torch

from .errors import ProfileMissingWarning, warn_once
from .layer import AUTO, EAGER, GROUPED_MM, eager_forward

logger = logging.getLogger(__name__)


def fp8_auto_experts_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,  # (num_tokens, hidden_dim)
    top_k_index: torch.Tensor,  # (num_tokens, top_k)
    top_k_weights: torch.Tensor,  # (num_tokens, top_k)
) -> torch.Tensor:
    """Runs `fp8_backend(self)`, the FP8 backend Transformers would run for this layer by default."""
    backend = fp8_backend(self)
    _warn_once(self, backend)
    if backend == EAGER:
        return eager_forward(type(self))(self, hidden_states, top_k_index, top_k_weights)
    from transformers.integrations.finegrained_fp8 import ALL_FP8_EXPERTS_FUNCTIONS

    return ALL_FP8_EXPERTS_FUNCTIONS[backend](self, hidden_states, top_k_index, top_k_weights)


def fp8_backend(experts: torch.nn.Module) -> str:
    """The FP8 backend `auto` runs for `experts`: Transformers' default (`grouped_mm`), or `eager` where
    `grouped_mm` cannot run the layer (static activation scales, or no FP8 `grouped_mm` registered)."""
    if getattr(experts, "activation_scheme", None) == "static" or GROUPED_MM not in fp8_backends():
        return EAGER
    return GROUPED_MM


def fp8_backends() -> list[str]:
    """The FP8 experts backends Transformers has registered (without `"auto"`)."""
    try:
        from transformers.integrations.finegrained_fp8 import ALL_FP8_EXPERTS_FUNCTIONS
    except ImportError:
        return []
    return [name for name in ALL_FP8_EXPERTS_FUNCTIONS if name != AUTO]


def _warn_once(experts: torch.nn.Module, backend: str) -> None:
    """Warns once per layer class (until `autoexperts.reset()`) that auto runs `backend` for it."""
    name = type(experts).__name__
    message = (
        f"autoexperts: {name} holds FP8-quantized experts, which autoexperts does not calibrate (it measures "
        f"unquantized kernels); auto runs Transformers' FP8 {backend} for them. To pick another FP8 backend: "
        f"model.set_experts_implementation(NAME) with NAME one of {', '.join(fp8_backends())}."
    )
    warn_once(ProfileMissingWarning, ("fp8", name), message)


def register() -> None:
    """Registers `"auto"` with Transformers' FP8 experts interface, where there is one (idempotent)."""
    try:
        from transformers.integrations.finegrained_fp8 import FP8ExpertsInterface
    except ImportError:  # a Transformers without FP8 experts
        logger.debug("no FP8ExpertsInterface in this Transformers")
        return
    FP8ExpertsInterface.register(AUTO, fp8_auto_experts_forward)
