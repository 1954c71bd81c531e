"""Compile modes: which one the running code is traced in, and which backends can run in it.

A profile is specific to a compile mode (compilation moves the crossovers). `auto` tells the modes apart while
`torch.compile` traces a model: `"none"` outside tracing, else the Inductor mode read off the compiler Dynamo was
given (`"default"`, `"max-autotune-no-cudagraphs"`, `"reduce-overhead"`, `"max-autotune"`; options passed as
`torch.compile(options=...)` count by their effect: CUDA graphs and/or max-autotune). Other compile backends
(`"aot_eager"`, custom ones) count as `"default"`. The detection reads Dynamo internals that have been stable from
torch 2.11 to 2.15; when they cannot be read, the mode is `"default"`. A `torch.export` trace (strict or not) is
`"export"`: the exported program runs the ATen kernels uncompiled.
Which backends a mode can run, and whose profiles it may borrow, is decided in `autoexperts.selection`.
"""

from __future__ import annotations

import logging

import torch

from .choices import CompileMode

logger = logging.getLogger(__name__)


def traced_compile_mode() -> str:
    """The compile mode of the `torch.compile` call tracing right now; call it at trace time, outside the graph.

    Returns `"export"` under `torch.export`, `"none"` when no Dynamo trace is running.
    """
    if torch.compiler.is_exporting():
        return CompileMode.EXPORT
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        translator = InstructionTranslator.current_tx()
        compiler = translator.output.compiler_fn
    except Exception:  # not tracing (torch 2.14 raises, 2.11 returns None)
        return CompileMode.NONE
    config = None
    for _ in range(8):  # unwrap Dynamo's debug and callback wrappers down to Inductor's
        if compiler is None:
            break
        if type(compiler).__name__ == "_TorchCompileInductorWrapper":
            config = getattr(compiler, "config", None)
            break
        compiler = getattr(compiler, "compiler_fn", None) or getattr(compiler, "__wrapped__", None)
    if not isinstance(config, dict):
        return CompileMode.DEFAULT
    cudagraphs = bool(config.get("triton.cudagraphs"))
    autotune = bool(config.get("max_autotune"))
    if cudagraphs:
        return CompileMode.MAX_AUTOTUNE if autotune else CompileMode.REDUCE_OVERHEAD
    return CompileMode.MAX_AUTOTUNE_NO_CUDAGRAPHS if autotune else CompileMode.DEFAULT
