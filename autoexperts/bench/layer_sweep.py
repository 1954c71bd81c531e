"""Part 1 of the benchmark: one experts layer at token counts the calibration never measured.

At each token count every contender (the fixed backends and `auto`) gets a warm-up call and a call under the memory
tracker, then interleaved timed rounds. A fixed backend predicted (by the calibrated profile) to exceed the memory
limit is not run there; one at least `slow_factor` times slower than the fastest contender at two successive counts
stops being timed (it cannot be the oracle there, and timing it would dominate the run).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..calibration.experts_layer import ExpertsLayer, routed_inputs
from ..calibration.memory import peak_call_bytes
from ..calibration.routing import Routing
from ..choices import NONE
from ..cost_model import SLOW_FACTOR, CostModel, Status
from ..dispatch import auto_experts_forward, decision_table
from ..layer import AUTO, BATCHED_MM, backend_forward
from ..timing import interleaved_rounds, repeats_for, timed_call_ms
from .analysis import FIXED_BACKENDS, ContenderRun, PointResult

logger = logging.getLogger(__name__)

ExpertsCall = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class TimingOptions:
    """How long to time each point: `seconds_per_point` of interleaved rounds, clipped to `[min, max]` rounds."""

    seconds_per_point: float = 1.0
    min_repeats: int = 3
    max_repeats: int = 50
    slow_factor: float = SLOW_FACTOR


def held_out_tokens(grid: Sequence[int], beyond: Sequence[float] = (1.5, 2.0)) -> list[int]:
    """Token counts the calibration grid does not hold: the rounded geometric midpoint of each pair of neighbouring
    grid points (where it is not itself on the grid), and multiples `beyond` of the grid's largest count.
    """
    on_grid = sorted(set(grid))
    held_out = set()
    for low, high in itertools.pairwise(on_grid):
        middle = round(math.sqrt(low * high))
        if low < middle < high:
            held_out.add(middle)
    held_out.update(round(on_grid[-1] * factor) for factor in beyond)
    return sorted(n for n in held_out if n not in on_grid)


def _contender_calls(experts_class: type, wrap: Callable[[ExpertsCall], ExpertsCall]) -> dict[str, ExpertsCall]:
    calls = {name: wrap(backend_forward(name, experts_class)) for name in FIXED_BACKENDS}
    calls[AUTO] = wrap(auto_experts_forward)
    return calls


@dataclass(frozen=True)
class MemoryGuard:
    """Says which fixed backend may not run a call of `num_tokens` tokens per experts layer: one that failed there in
    calibration, or whose predicted peak memory exceeds `limit_bytes` (`auto` always runs)."""

    cost_model: CostModel
    limit_bytes: float
    expert_bytes: int
    top_k: int

    def reason(self, contender: str, num_tokens: int) -> str | None:
        if contender == AUTO:
            return None
        limit = self.limit_bytes
        if contender not in self.cost_model.backends:  # e.g. eager, which a fullgraph calibration cannot measure
            # batched_mm copies one expert's weights per (token, top-k) slot; the others need far less.
            predicted = num_tokens * self.top_k * self.expert_bytes if contender == BATCHED_MM else 0
            if predicted > limit:
                return f"its weight copies ({predicted / 2**30:.1f} GiB) exceed the limit {limit / 2**30:.1f} GiB"
            return None
        if num_tokens >= self.cost_model.infeasible_from(contender):
            return f"failed in calibration from {int(self.cost_model.infeasible_from(contender))} tokens"
        predicted = float(self.cost_model.peak_bytes(contender, [num_tokens])[0])
        if predicted > limit:
            return f"predicted peak {predicted / 2**30:.1f} GiB exceeds the limit {limit / 2**30:.1f} GiB"
        return None


def run_layer_sweep(
    layer: ExpertsLayer,
    device: torch.device,
    dtype: torch.dtype,
    tokens: Sequence[int],
    guard: MemoryGuard,
    timing: TimingOptions,
    wrap: Callable[[ExpertsCall], ExpertsCall] = lambda fn: fn,
    advance: Callable[[], None] = lambda: None,
    compile_mode: str = NONE,
    routing: Routing | None = None,
) -> list[PointResult]:
    """Times every contender at every count of `tokens` on `layer` (see the module docstring).

    Args:
        guard (`MemoryGuard`): which fixed backends may not run at a token count.
        wrap (`Callable`): applied to each contender's function (e.g. `torch.compile`).
        advance (`Callable`): called once per finished token count (a progress bar's update).
        compile_mode (`str`): the mode `wrap` compiles in, whose decision table says what `auto` chose.
        routing (`Routing`, *optional*): the distribution the inputs' experts are drawn from (default: uniform).
    """
    module = layer.module
    calls = _contender_calls(type(module), wrap)
    slow_streak = dict.fromkeys(FIXED_BACKENDS, 0)
    dropped: dict[str, str] = {}
    points = []
    for num_tokens in tokens:
        inputs = routed_inputs(layer.spec, num_tokens, device, dtype, seed=1, routing=routing)  # not calibration's seed
        runs: dict[str, ContenderRun] = {}
        active: dict[str, Callable[[], torch.Tensor]] = {}
        for name, call in calls.items():
            reason = dropped.get(name) or guard.reason(name, num_tokens)
            if reason is not None:
                status = Status.SLOW if name in dropped else Status.SKIPPED
                runs[name] = ContenderRun(status=status, note=reason)
                continue
            active[name] = lambda call=call, inputs=inputs: call(module, *inputs)

        with torch.inference_mode():
            table = decision_table(module, device, layer.spec.top_k, compile_mode)
            auto_backend = table.region_for(num_tokens).backend
            warm_ms = {}
            for name, call in active.items():
                warm_ms[name] = timed_call_ms(call, device)
                # The CPU memory tracker runs code uncompiled: there auto's peak is its chosen backend's (below).
                tracked = not (name == AUTO and compile_mode != NONE and device.type == "cpu")
                runs[name] = ContenderRun(peak_bytes=peak_call_bytes(call, device) if tracked else None)
            repeats = repeats_for(
                sum(warm_ms.values()), timing.seconds_per_point, timing.min_repeats, timing.max_repeats
            )
            for name, samples in interleaved_rounds(active, device, repeats).items():
                runs[name].samples_ms = samples

        if runs[AUTO].peak_bytes is None and auto_backend in runs:
            runs[AUTO].peak_bytes = runs[auto_backend].peak_bytes
        point = PointResult(str(num_tokens), num_tokens, runs, auto_backend)
        fastest = min(run.median_ms for run in runs.values() if run.ok)
        for backend in FIXED_BACKENDS:
            median = point.median(backend)
            slow_streak[backend] = slow_streak[backend] + 1 if median and median >= timing.slow_factor * fastest else 0
            if slow_streak[backend] >= 2 and backend not in dropped:
                dropped[backend] = f"dropped after {num_tokens} tokens: {timing.slow_factor:g}x slower than the fastest"
                logger.info("%s %s", backend, dropped[backend])
        points.append(point)
        advance()
        del inputs, active
    return points
