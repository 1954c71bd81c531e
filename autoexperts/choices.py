"""The choices the `autoexperts` command offers, in a module that imports nothing.

The command builds its argument parser from these names, so that `--help` and argument errors answer at once rather
than after torch and Transformers have loaded (seconds). `autoexperts.compile_mode` and `autoexperts.bench.run` take
them from here.
"""

NONE = "none"
DEFAULT = "default"
# `torch.export` tracing: not a `torch.compile` mode (nothing to calibrate), but its own table (see `selection`).
EXPORT = "export"
# The modes `calibrate --compile` measures (CUDA-graph modes are not: their captured graphs are timed by the user's
# own `reduce-overhead` runs; `auto` uses the `default` profile there).
CALIBRATION_MODES = (NONE, DEFAULT, "max-autotune-no-cudagraphs")
# The parts of `autoexperts bench`, in the order they run.
BENCH_PARTS = ("sweep", "forward", "generate", "overhead")
# How tokens reach a rank's experts under expert parallelism (`calibrate --ep-implementation`), as Transformers'
# `DistributedConfig.ep_implementation` names them.
EP_IMPLEMENTATIONS = ("auto", "all_to_all", "all_reduce")
