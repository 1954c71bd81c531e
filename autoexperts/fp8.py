"""FP8 experts: `auto` rejects them with a clear message.

Fine-grained FP8 checkpoints swap each experts layer for Transformers' `FP8Experts`, whose backends live in a
registry of their own (`FP8ExpertsInterface`: `batched_mm`, `grouped_mm`, `deepgemm`, ...). Their costs are not
those of the unquantized kernels `calibrate` measures, so `auto` has no profile to decide with. Registering a
rejecting `"auto"` there turns Transformers' generic "not a valid experts implementation" error into one that says
what to use instead.
"""

from __future__ import annotations

import logging

import torch

from .layer import AUTO

logger = logging.getLogger(__name__)


def fp8_auto_experts_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """Raises: `auto` does not dispatch FP8 experts.

    Raises:
        `NotImplementedError`: always, naming the FP8 backends this process has.
    """
    raise NotImplementedError(
        f'experts_implementation="auto" does not support FP8-quantized experts ({type(self).__name__}): autoexperts '
        "calibrates unquantized kernels only. Pick one of Transformers' FP8 experts backends for this model, e.g. "
        f'model.set_experts_implementation("grouped_mm"); available: {", ".join(fp8_backends())}.'
    )


def fp8_backends() -> list[str]:
    """The FP8 experts backends Transformers has registered (without `"auto"`)."""
    try:
        from transformers.integrations.finegrained_fp8 import ALL_FP8_EXPERTS_FUNCTIONS
    except ImportError:
        return []
    return [name for name in ALL_FP8_EXPERTS_FUNCTIONS if name != AUTO]


def register() -> None:
    """Registers the rejecting `"auto"` with Transformers' FP8 experts interface, where there is one (idempotent)."""
    try:
        from transformers.integrations.finegrained_fp8 import FP8ExpertsInterface
    except ImportError:  # a Transformers without FP8 experts
        logger.debug("no FP8ExpertsInterface in this Transformers")
        return
    FP8ExpertsInterface.register(AUTO, fp8_auto_experts_forward)
