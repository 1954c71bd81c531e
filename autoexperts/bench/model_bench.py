"""Parts 2 and 3 of the benchmark: whole-model forwards and `generate()` with every contender.

The model is the preset's own architecture with its real layer shapes, cut to a few decoder layers and a small
vocabulary so it fits a CPU, with random weights. Contenders are switched with `set_experts_implementation` between
timed calls (never inside one), in interleaved rounds after a warm-up each.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from ..calibration.memory import peak_call_bytes
from ..cost_model import Status
from ..decisions import record_decisions
from ..errors import UsageError
from ..layer import AUTO, GROUPED_MM, is_experts_module
from ..timing import repeats_for, round_orders, timed_call_ms
from .analysis import CONTENDERS, FIXED_BACKENDS, ContenderRun, PointResult
from .layer_sweep import MemoryGuard, TimingOptions

logger = logging.getLogger(__name__)

# Transformers' experts benchmark grid (batch x sequence), plus a single-token decode step and a long prefill.
FORWARD_BATCHES = (1, 4)
FORWARD_SEQUENCES = (16, 128)
# The fewest interleaved rounds per forward point: a 2-layer forward on an H200 is launch-bound (~6.5 ms) and reads
# ~10 % slower after another backend's call than after its own kernel's, so 3 rounds could not tell `auto` from the
# backend it ran.
FORWARD_MIN_ROUNDS = 20
# Config fields that make some decoder layers dense; the benchmark model keeps every layer MoE.
_ALL_LAYERS_MOE = {"first_k_dense_replace": 0, "mlp_only_layers": [], "decoder_sparse_step": 1}


@dataclass(frozen=True)
class ForwardPoint:
    """One model input shape: `batch` sequences of `sequence` tokens."""

    batch: int
    sequence: int
    kind: str = "prefill"

    @property
    def num_tokens(self) -> int:
        return self.batch * self.sequence

    @property
    def label(self) -> str:
        return f"{self.kind} {self.batch}x{self.sequence}"


def forward_points(long_prefill: int) -> list[ForwardPoint]:
    """The grid: one decode token, batch {1, 4} x sequence {16, 128}, and one long prefill."""
    grid = [ForwardPoint(b, s) for b in FORWARD_BATCHES for s in FORWARD_SEQUENCES]
    return [ForwardPoint(1, 1, "decode"), *grid, ForwardPoint(1, long_prefill)]


def bench_config(config: PretrainedConfig, num_layers: int, vocab_size: int) -> PretrainedConfig:
    """A copy of `config` with `num_layers` decoder layers, all MoE, and a `vocab_size` vocabulary."""
    config = copy.deepcopy(config)
    text = config.get_text_config()
    text.num_hidden_layers = num_layers
    text.vocab_size = vocab_size
    if isinstance(getattr(text, "layer_types", None), list):
        text.layer_types = text.layer_types[:num_layers]
    for name, value in _ALL_LAYERS_MOE.items():
        if hasattr(text, name):
            setattr(text, name, value)
    return config


def build_bench_model(
    config: PretrainedConfig, device: torch.device, dtype: torch.dtype, num_layers: int = 2, vocab_size: int = 1024
) -> torch.nn.Module:
    """The preset's architecture with its real layer shapes, `num_layers` layers and random weights, in eval mode."""
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(bench_config(config, num_layers, vocab_size), dtype=dtype)
    model.eval().requires_grad_(False)
    if not any(is_experts_module(m) for m in model.modules()):
        raise UsageError(f"model type {config.model_type!r} built without an experts layer; cannot benchmark it")
    return model


def _time_contenders(
    model: torch.nn.Module,
    calls: dict[str, Callable[[], object]],
    device: torch.device,
    timing: TimingOptions,
    track_auto_memory: bool = True,
) -> tuple[dict[str, ContenderRun], str | None]:
    """Warm-up, a probe call, peak memory and interleaved rounds of `calls`, switching the model's experts
    implementation before each call. A contender whose probe takes `slow_factor` times the fastest probe is reported
    with that one timing, not timed further.

    Returns:
        The runs, and the backends `auto` chose during its warm-up call (backend -> number of experts calls).
    """
    runs: dict[str, ContenderRun] = {}
    probe_ms: dict[str, float] = {}
    auto_choices: Counter = Counter()
    for name, call in calls.items():  # the first call of each pays one-off costs; the probe does not
        model.set_experts_implementation(name)
        with record_decisions() as decisions:
            call()
        if name == AUTO:
            auto_choices.update(d.backend for d in decisions)
    for name, call in calls.items():
        model.set_experts_implementation(name)
        probe_ms[name] = timed_call_ms(call, device)
    fastest = min(probe_ms.values())
    timed = {}
    for name, call in calls.items():
        if name != AUTO and probe_ms[name] >= timing.slow_factor * fastest:
            note = f"one call {probe_ms[name]:.4g} ms, {probe_ms[name] / fastest:.1f}x the fastest; not timed further"
            runs[name] = ContenderRun(status=Status.SLOW, note=note)
            continue
        model.set_experts_implementation(name)
        tracked = track_auto_memory or name != AUTO
        runs[name] = ContenderRun(peak_bytes=peak_call_bytes(call, device) if tracked else None)
        timed[name] = call
    round_ms = sum(probe_ms[n] for n in timed)
    repeats = repeats_for(round_ms, timing.seconds_per_point, timing.min_repeats, timing.max_repeats)
    for order in round_orders(list(timed), repeats):  # interleaved, in a new seeded order every round
        for name in order:
            model.set_experts_implementation(name)
            runs[name].samples_ms.append(timed_call_ms(timed[name], device))
    return runs, auto_choices


def run_forward_points(
    model: torch.nn.Module,
    points: Sequence[ForwardPoint],
    device: torch.device,
    guard: MemoryGuard,
    timing: TimingOptions,
    advance: Callable[[], None] = lambda: None,
    call: Callable | None = None,
    choice_for: Callable[[int], str] | None = None,
) -> list[PointResult]:
    """Times one forward (no KV cache) of every contender at every point; returns one `PointResult` per point.

    Args:
        guard (`MemoryGuard`): which fixed backends may not run at a point's token count.
        call (`Callable`, *optional*): what runs the forward (default: `model`; e.g. `torch.compile(model)`).
        choice_for (`Callable`, *optional*): `auto`'s backend at a token count, where no decision is recorded
            (compiled code calls no hooks).
    """
    forward = model if call is None else call
    generator = torch.Generator().manual_seed(0)
    results = []
    for point in points:
        input_ids = torch.randint(
            model.config.get_text_config().vocab_size, (point.batch, point.sequence), generator=generator
        ).to(device)  # (batch, sequence)
        runs, calls = {}, {}
        for name in CONTENDERS:
            reason = guard.reason(name, point.num_tokens)
            if reason is not None:
                runs[name] = ContenderRun(status=Status.SKIPPED, note=reason)
            else:
                calls[name] = lambda input_ids=input_ids: forward(input_ids=input_ids, use_cache=False).logits
        compiled = forward is not model
        with torch.inference_mode():
            # The CPU memory tracker runs code uncompiled: there auto's peak is its chosen backend's (below).
            track_auto = not (compiled and device.type == "cpu")
            timed_runs, auto_choices = _time_contenders(model, calls, device, timing, track_auto)
        runs.update(timed_runs)
        auto_backend = auto_choices.most_common(1)[0][0] if auto_choices else None
        if auto_backend is None and choice_for is not None:
            auto_backend = choice_for(point.num_tokens)
        if AUTO in runs and runs[AUTO].peak_bytes is None and auto_backend in runs:
            runs[AUTO].peak_bytes = runs[auto_backend].peak_bytes
        results.append(PointResult(point.label, point.num_tokens, runs, auto_backend))
        advance()
    model.set_experts_implementation(AUTO)
    return results


@dataclass
class GenerationResult:
    """`generate()` with every contender: the runs (total milliseconds per call) and whether tokens matched eager's."""

    point: PointResult
    new_tokens: int
    same_tokens_as_eager: dict[str, bool]
    decisions: dict[str, int]  # `auto`'s backend choices in one call: backend -> count

    def to_json(self) -> dict:
        return {
            **self.point.to_json(),
            "new_tokens": self.new_tokens,
            "same_tokens_as_eager": self.same_tokens_as_eager,
            "auto_decisions": self.decisions,
        }


def run_generation(
    model: torch.nn.Module,
    device: torch.device,
    batch: int,
    prompt_length: int,
    new_tokens: int,
    rounds: int,
    guard: MemoryGuard,
) -> GenerationResult:
    """Greedy `generate()` of exactly `new_tokens` tokens per contender, `rounds` interleaved timed rounds.

    `grouped_mm` is Transformers' default: on non-CPU devices `generate()` switches it to `batched_mm` for decoding.
    """
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.get_text_config().vocab_size
    input_ids = torch.randint(vocab, (batch, prompt_length), generator=generator).to(device)  # (batch, prompt)
    kwargs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "do_sample": False,
        "pad_token_id": 0,
    }
    outputs: dict[str, torch.Tensor] = {}
    runs: dict[str, ContenderRun] = {}
    calls = {}
    for name in (GROUPED_MM, *(b for b in FIXED_BACKENDS if b != GROUPED_MM), AUTO):
        reason = guard.reason(name, batch * prompt_length)
        if reason is not None:
            runs[name] = ContenderRun(status=Status.SKIPPED, note=f"prefill: {reason}")
            continue

        def call(name=name):
            outputs[name] = model.generate(**kwargs)

        calls[name] = call
    with torch.inference_mode():
        timing = TimingOptions(seconds_per_point=0.0, min_repeats=rounds, max_repeats=rounds)
        timed_runs, decisions = _time_contenders(model, calls, device, timing)
    runs.update(timed_runs)
    model.set_experts_implementation(AUTO)
    reference = outputs.get("eager")
    same = {
        name: bool(reference is not None and output.shape == reference.shape and torch.equal(output, reference))
        for name, output in outputs.items()
    }
    auto_backend = decisions.most_common(1)[0][0] if decisions else None
    point = PointResult(f"generate {batch}x{prompt_length}+{new_tokens}", batch * prompt_length, runs, auto_backend)
    layers = sum(1 for m in model.modules() if is_experts_module(m))
    per_call = {backend: count // max(layers, 1) for backend, count in decisions.items()}
    return GenerationResult(point, new_tokens, same, per_call)
