"""Compile modes: which one the running code is traced in, and which backends can run in it.

A profile is specific to a compile mode (compilation moves the crossovers). `auto` tells the modes apart while
`torch.compile` traces a model: `"none"` outside tracing, else the Inductor mode read off the compiler Dynamo was
given (`"default"`, `"max-autotune-no-cudagraphs"`, `"reduce-overhead"`, `"max-autotune"`; options passed as
`torch.compile(options=...)` count by their effect: CUDA graphs and/or max-autotune). Other compile backends
(`"aot_eager"`, custom ones) count as `"default"`. The detection reads Dynamo internals that have been stable from
torch 2.11 to 2.15; when they cannot be read, the mode is `"default"`.
"""

from __future__ import annotations

import logging

import torch

from .choices import CALIBRATION_MODES as CALIBRATION_MODES  # defined without torch, for the command's parser
from .choices import DEFAULT, NONE
from .layer import EAGER, GROUPED_MM

logger = logging.getLogger(__name__)

CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def traced_compile_mode() -> str:
    """The compile mode of the `torch.compile` call tracing right now; call it at trace time, outside the graph.

    Returns `"none"` when no Dynamo trace is running.
    """
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        translator = InstructionTranslator.current_tx()
        compiler = translator.output.compiler_fn
    except Exception:  # not tracing (torch 2.14 raises, 2.11 returns None)
        return NONE
    config = None
    for _ in range(8):  # unwrap Dynamo's debug and callback wrappers down to Inductor's
        if compiler is None:
            break
        if type(compiler).__name__ == "_TorchCompileInductorWrapper":
            config = getattr(compiler, "config", None)
            break
        compiler = getattr(compiler, "compiler_fn", None) or getattr(compiler, "__wrapped__", None)
    if not isinstance(config, dict):
        return DEFAULT
    cudagraphs = bool(config.get("triton.cudagraphs"))
    autotune = bool(config.get("max_autotune"))
    if cudagraphs:
        return "max-autotune" if autotune else "reduce-overhead"
    return "max-autotune-no-cudagraphs" if autotune else DEFAULT


def runnable_backends(candidates: list[str], compile_mode: str, device_type: str) -> list[str]:
    """The candidates that can run in `compile_mode` on `device_type`.

    - `eager` is never a candidate under compilation: its loop over the experts hit is data-dependent, so it breaks
      the graph (an error under `fullgraph=True`; measured on torch 2.11, 2.14 and 2.15).
    - `grouped_mm` is not one under CUDA-graph modes on CUDA: its kernel cannot be captured in CUDA graphs (on CPU,
      Inductor skips CUDA graphs and it runs).
    """
    if compile_mode == NONE:
        return list(candidates)
    excluded = {EAGER}
    if compile_mode in CUDA_GRAPH_MODES and device_type == "cuda":
        excluded.add(GROUPED_MM)
    return [backend for backend in candidates if backend not in excluded]


def profile_modes(compile_mode: str) -> tuple[str, ...]:
    """The compile modes whose profiles may decide in `compile_mode`, best match first.

    A compiled run without a profile of its own mode borrows the closest one (the `default` mode's, then the
    uncompiled one's: its crossovers are off under compilation, but its ranking and memory still hold).
    """
    if compile_mode == NONE:
        return (NONE,)
    if compile_mode == DEFAULT:
        return (DEFAULT, NONE)
    if compile_mode == "max-autotune":
        return ("max-autotune", "max-autotune-no-cudagraphs", DEFAULT, NONE)
    return (compile_mode, DEFAULT, NONE)


def is_compiling() -> bool:
    """Whether Dynamo is tracing the calling code (a constant `True` inside a graph)."""
    return torch.compiler.is_compiling()
