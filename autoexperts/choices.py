"""The package's named strings that the `autoexperts` command offers as choices, in a module that imports nothing.

The command builds its argument parser from these names, so that `--help` and argument errors answer at once rather
than after torch and Transformers have loaded (seconds); `import autoexperts` registers `"auto"` by the same rule.

Named strings are plain `str` constants grouped in classes, not `enum` members: they are stored in profiles and
handed to users (`Decision.source`), who compare, print, pickle and `torch.load(weights_only=True)` them as strings.
"""

# The experts implementation this package adds to Transformers' registries.
AUTO = "auto"


class CompileMode:
    """The compile mode an experts call runs in: a profile is specific to one (compilation moves the crossovers)."""

    NONE = "none"
    DEFAULT = "default"
    MAX_AUTOTUNE_NO_CUDAGRAPHS = "max-autotune-no-cudagraphs"
    REDUCE_OVERHEAD = "reduce-overhead"
    MAX_AUTOTUNE = "max-autotune"
    # `torch.export` tracing: not a `torch.compile` mode (nothing to calibrate), but its own table (see `selection`).
    EXPORT = "export"


NONE, DEFAULT, EXPORT = CompileMode.NONE, CompileMode.DEFAULT, CompileMode.EXPORT
# The modes `calibrate --compile` measures (CUDA-graph modes are not: their captured graphs are timed by the user's
# own `reduce-overhead` runs; `auto` uses the `default` profile there).
CALIBRATION_MODES = (NONE, DEFAULT, CompileMode.MAX_AUTOTUNE_NO_CUDAGRAPHS)
# The modes that capture CUDA graphs, which `grouped_mm`'s kernel cannot be part of.
CUDA_GRAPH_MODES = (CompileMode.REDUCE_OVERHEAD, CompileMode.MAX_AUTOTUNE)
# The parts of `autoexperts bench`, in the order they run (the overhead first, whatever the order given).
BENCH_PARTS = ("sweep", "forward", "generate", "overhead", "serve")
# The parts `autoexperts bench` runs without `--parts`: `serve` (continuous batching) is asked for by name, since it
# tunes `auto` in place and serves a whole trace several times per contender (minutes on a CPU).
DEFAULT_BENCH_PARTS = ("sweep", "forward", "generate", "overhead")
# How tokens reach a rank's experts under expert parallelism (`calibrate --ep-implementation`), as Transformers'
# `DistributedConfig.ep_implementation` names them (its "auto": Transformers' inference choice).
EP_IMPLEMENTATIONS = ("auto", "all_to_all", "all_reduce")
