"""Which backends can run a layer's shape on this device and install, known before any call.

Today one limit is known: Transformers' `grouped_mm` calls torch's grouped GEMM, which on some torch builds and
devices rejects operands whose row strides are not multiples of 16 bytes ("strides should be multiple of 16 bytes":
torch 2.15 on CPU, for example a hidden size of 37 in float32 or 12 in bfloat16), while Transformers assumes that
limit ended with torch 2.10. Whether the running pair has the limit is probed once per device type and dtype with
tiny tensors through Transformers' own grouped-matmul helper (so its fallbacks count); a layer's shape is then
judged by arithmetic, so `auto` never makes a failing call to find out.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch.utils._python_dispatch import _disable_current_modes

from .layer import GROUPED_MM, LayerSpec

logger = logging.getLogger(__name__)

# torch's grouped GEMM wants every operand's row stride to be a multiple of this many bytes.
GROUPED_MM_STRIDE_BYTES = 16


def unrunnable_backends(spec: LayerSpec) -> dict[str, str]:
    """The backends that cannot run `spec` here, each with the reason (empty when all can).

    Args:
        spec (`LayerSpec`): the layer (shape, dtype, device type).
    """
    reason = _grouped_mm_limit(spec)
    return {GROUPED_MM: reason} if reason else {}


def _grouped_mm_limit(spec: LayerSpec) -> str | None:
    if spec.device_type not in ("cpu", "cuda"):
        return None
    probe = _probe_grouped_mm(spec.device_type, spec.dtype)
    if probe == "runs":
        return None
    if probe != "needs aligned strides":
        return f"grouped_mm cannot run {spec.dtype} on this {spec.device_type} ({probe})"
    element_size = torch.empty((), dtype=getattr(torch, spec.dtype)).element_size()
    misaligned = [
        f"{name} {size} × {element_size} bytes"
        for name, size in (("hidden_dim", spec.hidden_dim), ("intermediate_dim", spec.intermediate_dim))
        if size * element_size % GROUPED_MM_STRIDE_BYTES
    ]
    if not misaligned:
        return None
    return (
        f"grouped_mm cannot run this shape on this {spec.device_type} with torch {torch.__version__}: its grouped "
        f"GEMM needs row strides that are multiples of {GROUPED_MM_STRIDE_BYTES} bytes ({', '.join(misaligned)})"
    )


@functools.cache
def _probe_grouped_mm(device_type: str, dtype_name: str) -> str:
    """`"runs"`, `"needs aligned strides"`, or why grouped matmuls fail altogether, for `dtype` on `device_type`."""
    device = torch.device(device_type)
    if device.type == "cuda" and not torch.cuda.is_available():
        return "runs"  # nothing to probe; a real call would fail earlier for want of a device
    # On real tensors whatever runs around the first call (an export's fake tensors, a profiler's dispatch mode):
    # the answer is cached and must be the kernel's own.
    with _disable_current_modes(), torch.no_grad():
        return _probe_on(device, getattr(torch, dtype_name))


def _probe_on(device: torch.device, dtype: torch.dtype) -> str:
    grouped_mm = _transformers_grouped_mm()
    aligned_dim = GROUPED_MM_STRIDE_BYTES  # 16 elements: a multiple of 16 bytes in every dtype
    offsets = torch.tensor([2, 4], dtype=torch.int32, device=device)  # two groups of two rows

    def attempt(input_dim: int) -> Exception | None:
        inputs = torch.ones(4, input_dim, dtype=dtype, device=device)  # (rows, input_dim)
        weights = torch.ones(2, input_dim, aligned_dim, dtype=dtype, device=device)  # (groups, input_dim, output)
        try:
            grouped_mm(inputs, weights, offsets)
        except Exception as error:  # a probe: any failure is the answer
            return error
        return None

    failure = attempt(aligned_dim)
    if failure is not None:
        logger.info("grouped_mm probe (%s, %s) failed: %s", device, dtype, failure)
        return f"{type(failure).__name__}: {(str(failure).strip().splitlines() or [''])[0]}"
    misaligned_dim = aligned_dim + 1  # a row stride of 17 elements is no multiple of 16 bytes in any dtype
    failure = attempt(misaligned_dim)
    if failure is None:
        return "runs"
    logger.info("grouped_mm on %s in %s needs aligned strides: %s", device, dtype, failure)
    return "needs aligned strides"


def _transformers_grouped_mm():
    """The grouped matmul Transformers' `grouped_mm` backend calls (its private dispatcher, fallbacks included),
    else torch's own."""
    from transformers.integrations import moe

    helper = getattr(moe, "_grouped_mm", None)
    if helper is not None:
        return lambda inputs, weights, offsets: helper(inputs, weights, offs=offsets)
    native = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
    return lambda inputs, weights, offsets: native(inputs, weights, offs=offsets)
