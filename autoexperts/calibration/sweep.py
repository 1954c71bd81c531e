"""The calibration sweep: every backend at every token count, interleaved, with warm-up, medians and peak memory.

At each token count the backends still in the sweep run side by side: one warm-up call each, one call each under
the memory tracker, then `repeats` rounds of timed calls, each round in a new seeded order (CUDA events on GPU). A
backend leaves the sweep when

- a call runs out of memory (`"oom"`) or raises (`"error"`): its later points are `"skipped"`, and the cost model
  treats it as infeasible from the failing count up;
- its peak memory, extrapolated from its points so far, would exceed the sweep's memory limit: likewise `"skipped"`;
- it was at least `slow_factor` times slower than the fastest backend at two consecutive token counts, with calls
  long enough to fill the point's time budget at the fewest repeats: its later points are `"slow"` (not measured,
  to save time), and the cost model extrapolates its latency. A slow backend whose calls are cheap stays in the
  sweep, since a flat latency can still cross a growing one at larger counts.

A machine that stalls (another process, paging) can slow every backend at one count by orders of magnitude. When
every backend measured at two successive counts (at most 2x apart) is at least `DISTURBED_FACTOR` times slower at
one of them than at the other, that count is measured again (up to `DISTURBED_RETRIES` times): no steady device
slows a call 4x for at most twice the tokens.

With a compile mode other than `"none"`, each backend runs as `torch.compile(fn, mode=..., dynamic=True,
fullgraph=True)`: dynamic shapes compile one graph for all token counts above 1 (and one for 1), and the warm-up
call at each count absorbs any (re)compilation. On CPU the peak memory is then the uncompiled backend's: the
tracker cannot see inside compiled code (on CUDA the allocator's statistics see it).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..choices import NONE
from ..cost_model import SLOW_FACTOR, Measurement, Status
from ..layer import backend_forward
from ..timing import interleaved_rounds, repeats_for, timed_call_ms
from .experts_layer import ExpertsLayer, routed_inputs
from .interrupts import raise_if_interrupted, remember_interrupts
from .memory import peak_call_bytes
from .routing import Routing

logger = logging.getLogger(__name__)


def default_token_grid(max_tokens: int = 4096) -> list[int]:
    """Powers of two and the points halfway between them in log space (1, 2, 3, 4, 6, 8, 12, ...)."""
    grid, power = {1}, 1
    while power <= max_tokens:
        grid.update({power, power * 3 // 2})
        power *= 2
    return sorted(n for n in grid if n <= max_tokens)


# Every backend this many times slower at one of two successive counts (at most 2x apart) than at the other: the
# machine stalled there, and that count is measured again, at most `DISTURBED_RETRIES` times.
DISTURBED_FACTOR = 4.0
DISTURBED_RETRIES = 2


def disturbed_side(previous: dict[str, float], current: dict[str, float], token_ratio: float) -> int:
    """`1` when every backend timed at both counts is `DISTURBED_FACTOR` times slower at the current count, `-1` when
    at the previous one, else `0` (also when the counts are more than 2x apart or share no backend)."""
    common = [b for b in current if b in previous and previous[b] > 0 and current[b] > 0]
    if not common or token_ratio > 2:
        return 0
    if all(current[b] >= DISTURBED_FACTOR * previous[b] for b in common):
        return 1
    if all(previous[b] >= DISTURBED_FACTOR * current[b] for b in common):
        return -1
    return 0


@dataclass
class SweepOptions:
    """How to sweep: token counts, backends, repeats and the limits that stop a backend early."""

    tokens: Sequence[int]
    backends: Sequence[str]
    min_repeats: int = 3
    max_repeats: int = 25
    seconds_per_point: float = 0.6
    memory_limit_bytes: float = float("inf")
    slow_factor: float = SLOW_FACTOR
    seed: int = 0
    progress: bool = True
    # Points already measured (e.g. from an earlier run); they are kept and not measured again.
    done: list[Measurement] = field(default_factory=list)
    # Called with every point so far after each token count (the calibration's checkpoint).
    on_point: Callable[[list[Measurement]], None] | None = None
    # "none", or a `torch.compile` mode the backends run under (see the module docstring).
    compile_mode: str = NONE
    # The distribution each point's experts are drawn from (see `routing`); uniform by default.
    routing: Routing = field(default_factory=Routing)


def sweep_callable(name: str, experts_class: type, compile_mode: str) -> Callable:
    """Backend `name`'s function; compiled (dynamic shapes, `fullgraph=True`) unless `compile_mode` is `"none"`."""
    function = backend_forward(name, experts_class)
    if compile_mode == NONE:
        return function
    return torch.compile(function, mode=compile_mode, dynamic=True, fullgraph=True)


def sweep_functions(
    options: SweepOptions, experts_class: type, device: torch.device
) -> tuple[dict[str, Callable], dict[str, Callable]]:
    """Each backend's function to time (`sweep_callable`), and the one to measure its peak memory with: the same, but
    uncompiled on CPU, where compiled code does not run under the memory tracker's dispatch mode (Dynamo skips such
    frames)."""
    functions = {name: sweep_callable(name, experts_class, options.compile_mode) for name in options.backends}
    if device.type != "cuda" and options.compile_mode != NONE:
        return functions, {name: sweep_callable(name, experts_class, NONE) for name in options.backends}
    return functions, functions


def _is_out_of_memory(error: BaseException) -> bool:
    return (
        isinstance(error, torch.OutOfMemoryError)
        or "out of memory" in str(error).lower()
        or ("can't allocate memory" in str(error).lower())
    )


def _slow(median_ms: float, fastest_ms: float, options: SweepOptions) -> bool:
    """Whether a backend's point counts towards leaving the sweep as slow: `slow_factor` times the fastest, and
    costly to keep timing (its calls alone fill the point's time budget at the fewest repeats). A slow but cheap
    backend stays: a flat latency can still cross a growing one later (float16 `grouped_mm` on an H200 ran 9x
    `batched_mm` at 2 tokens, 3.7 ms against 0.4 ms, and would have won from about 256 tokens on)."""
    costly = median_ms * options.min_repeats >= 1000 * options.seconds_per_point
    return costly and median_ms >= options.slow_factor * fastest_ms


def _release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _predicted_peak(points: list[Measurement], num_tokens: int) -> float | None:
    """Affine extrapolation of a backend's measured peaks to `num_tokens` (None with fewer than two points)."""
    measured = [(p.num_tokens, p.peak_bytes) for p in points if p.status == Status.OK and p.peak_bytes is not None]
    if len(measured) < 2:
        return None
    (n0, b0), (n1, b1) = measured[-2], measured[-1]
    slope = max((b1 - b0) / (n1 - n0), 0.0)
    return b1 + slope * (num_tokens - n1)


def _measure_point(
    functions: dict[str, Callable],
    memory_functions: dict[str, Callable],
    module: torch.nn.Module,
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    backends: list[str],
    device: torch.device,
    options: SweepOptions,
) -> tuple[dict[str, list[float]], dict[str, int], dict[str, tuple[str, str]]]:
    """One token count: warm-up and peak memory per backend, then interleaved timed rounds.

    Returns:
        Timings in ms and peak bytes of the backends that ran, and `(status, message)` of those that failed.
    """

    def call_of(backend: str, table: dict[str, Callable] = functions) -> Callable[[], torch.Tensor]:
        return lambda: table[backend](module, *inputs)

    peaks: dict[str, int] = {}
    warm_ms: dict[str, float] = {}
    failures: dict[str, tuple[str, str]] = {}
    for backend in backends:
        try:
            with torch.inference_mode():
                warm_ms[backend] = timed_call_ms(call_of(backend), device)
                peaks[backend] = peak_call_bytes(call_of(backend, memory_functions), device)
        except Exception as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            failures[backend] = (
                Status.OOM if _is_out_of_memory(error) else Status.ERROR,
                f"{type(error).__name__}: {first_line}",
            )
            _release_memory(device)

    running = [b for b in backends if b not in failures]
    if not running:
        return {}, peaks, failures
    round_ms = sum(warm_ms[b] for b in running)
    repeats = repeats_for(round_ms, options.seconds_per_point, options.min_repeats, options.max_repeats)
    with torch.inference_mode():
        times = interleaved_rounds({b: call_of(b) for b in running}, device, repeats)
    return times, peaks, failures


def _measure_again(
    results: list[Measurement], num_tokens: int, functions, memory_functions, layer, device, dtype, options
) -> dict[str, float]:
    """Measures the backends that ran at `num_tokens` again, replaces their points in `results` and returns their
    new medians."""
    ran = [m.backend for m in results if m.num_tokens == num_tokens and m.status == Status.OK]
    inputs = routed_inputs(layer.spec, num_tokens, device, dtype, options.seed, options.routing)
    times, peaks, _ = _measure_point(functions, memory_functions, layer.module, inputs, ran, device, options)
    for i, m in enumerate(results):
        if m.num_tokens == num_tokens and m.backend in times:
            median = statistics.median(times[m.backend])
            results[i] = Measurement(
                m.backend, num_tokens, Status.OK, median, peaks[m.backend], tuple(times[m.backend])
            )
    return {b: statistics.median(t) for b, t in times.items()}


def run_sweep(
    layer: ExpertsLayer, device: torch.device, dtype: torch.dtype, options: SweepOptions
) -> list[Measurement]:
    """Measures every backend at every token count (see the module docstring) and returns all points."""
    module, spec = layer.module, layer.spec
    functions, memory_functions = sweep_functions(options, type(module), device)
    results: list[Measurement] = list(options.done)
    done = {(m.backend, m.num_tokens) for m in results}
    stopped: dict[str, tuple[str, str]] = {}  # backend -> (status of its later points, why it left the sweep)
    for m in results:
        if m.status != Status.OK:
            stopped.setdefault(
                m.backend, (Status.SLOW if m.status == Status.SLOW else Status.SKIPPED, m.error or m.status)
            )
    slow_streak = dict.fromkeys(options.backends, 0)
    previous_tokens, previous_medians = 0, {}  # the last count measured here and its backends' medians

    total = len(options.tokens) * len(options.backends) - len(done)
    bar = tqdm(total=max(total, 0), disable=not options.progress, desc="calibrating", unit="point", leave=False)
    # An interruption closes the bar too, so a message printed next starts on a line of its own.
    with remember_interrupts(), contextlib.closing(bar):
        for num_tokens in options.tokens:
            pending = [b for b in options.backends if (b, num_tokens) not in done]
            if not pending:
                continue
            hidden_states, top_k_index, top_k_weights = routed_inputs(
                spec, num_tokens, device, dtype, options.seed, options.routing
            )
            active = []
            for backend in pending:
                stop = stopped.get(backend)
                if stop is None:
                    predicted = _predicted_peak([m for m in results if m.backend == backend], num_tokens)
                    if predicted is not None and predicted > options.memory_limit_bytes:
                        stop = stopped[backend] = (
                            Status.SKIPPED,
                            f"predicted peak {predicted / 2**30:.2f} GiB exceeds the sweep's memory limit "
                            f"{options.memory_limit_bytes / 2**30:.2f} GiB",
                        )
                if stop is not None:
                    results.append(Measurement(backend, num_tokens, stop[0], error=stop[1]))
                    bar.update()
                    continue
                active.append(backend)

            inputs = (hidden_states, top_k_index, top_k_weights)
            times, peaks, failures = _measure_point(
                functions, memory_functions, module, inputs, active, device, options
            )
            medians = {b: statistics.median(t) for b, t in times.items()}
            ratio = num_tokens / previous_tokens if previous_tokens else float("inf")
            for _ in range(DISTURBED_RETRIES):
                side = disturbed_side(previous_medians, medians, ratio)
                if side == 0:
                    break
                again = num_tokens if side > 0 else previous_tokens
                logger.info("every backend at least %gx slower at %d tokens than beside it: measuring it again",
                            DISTURBED_FACTOR, again)  # fmt: skip
                if side > 0:  # the backends that ran, again: one that failed here is not tried twice
                    ran = [b for b in active if b not in failures]
                    times, peaks, failed_again = _measure_point(
                        functions, memory_functions, module, inputs, ran, device, options
                    )
                    failures = {**failures, **failed_again}
                    medians = {b: statistics.median(t) for b, t in times.items()}
                else:
                    previous_medians = _measure_again(
                        results, again, functions, memory_functions, layer, device, dtype, options
                    )
            # A Ctrl-C that a finalizer swallowed (see `interrupts`) may have cut the memory tracker's bookkeeping:
            # this count's points are dropped, not saved.
            raise_if_interrupted()
            for backend, (status, message) in failures.items():
                logger.info("%s failed at %d tokens (%s); it leaves the sweep", backend, num_tokens, message)
                results.append(Measurement(backend, num_tokens, status, error=message))
                stopped[backend] = (Status.SKIPPED, f"{status} at {num_tokens} tokens")
                active.remove(backend)
                bar.update()
            fastest = min(medians.values(), default=None)
            for backend in active:
                results.append(
                    Measurement(backend, num_tokens, Status.OK, medians[backend], peaks[backend], tuple(times[backend]))
                )
                bar.update()
                slow_streak[backend] = slow_streak[backend] + 1 if _slow(medians[backend], fastest, options) else 0
                if slow_streak[backend] >= 2:
                    reason = f"at least {options.slow_factor:g}x slower than the fastest backend at two points"
                    stopped[backend] = (Status.SLOW, reason)
                    logger.info("%s leaves the sweep after %d tokens: %s", backend, num_tokens, reason)
            previous_tokens, previous_medians = num_tokens, medians
            # Reference counting frees the inputs; a `gc.collect()` per count cost 0.24 s each (97 s of a 201 s
            # device-model calibration on an H200), so it runs only after a failure.
            del hidden_states, top_k_index, top_k_weights, inputs
            if options.on_point is not None:
                options.on_point(sorted(results, key=lambda m: (m.num_tokens, m.backend)))
    return sorted(results, key=lambda m: (m.num_tokens, m.backend))
