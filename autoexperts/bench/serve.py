"""Part 5 of the benchmark: Transformers' continuous batching on a seeded request trace, with every contender.

A trace is `requests` prompts of random tokens, their lengths log-uniform over a range, each with its own number of
new tokens (uniform over a range). Each contender serves the whole trace through Transformers' continuous-batching
manager, the one `model.generate_batch` and `transformers serve --continuous-batching` run: every request is queued
before its loop starts, so that every contender runs the same steps, and decoding is greedy with no end-of-sequence
token, so that every request generates exactly its new tokens. One step is one forward over all the tokens the
scheduler took together, from a few decode tokens to `max_batch_tokens` of mixed prefill: the experts calls of one
trace span the layer's crossovers.

Contenders: the fixed backends, Transformers' default (what a model with no experts implementation asked runs; where
it ran one fixed backend at every step, its figures are that backend's rather than a second timing of the same
kernels), and `auto` tuned in place: `autoexperts.tune(model)` around one serving of a separate warm-up trace
(another seed, fewer requests), its profiles saved to a folder of their own that `auto` then reads. Every contender
serves the trace once untimed (its warm-up), then in interleaved timed rounds, each round in a new seeded order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import itertools
import logging
import math
import os
import random
import statistics
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from ..cost_model import SLOW_FACTOR, Status
from ..decisions import record_decisions
from ..device import synchronize
from ..errors import ProfileMissingWarning
from ..layer import AUTO, GROUPED_MM, is_experts_module
from ..timing import round_orders
from .analysis import FIXED_BACKENDS, ContenderRun
from .layer_sweep import MemoryGuard

logger = logging.getLogger(__name__)

# The contender that runs what a model with no experts implementation asked runs (Transformers' default).
DEFAULT = "default"
# The warm-up trace that `auto` is tuned on: this share of the measured trace's requests (at least
# `MIN_WARMUP_REQUESTS`), drawn with the next seed.
WARMUP_SHARE = 4
MIN_WARMUP_REQUESTS = 4
# Blocks of the paged KV cache beyond what the trace's requests hold together, as a share: the FIFO scheduler stops
# admitting new requests when fewer than 15 % of the blocks are free, and the cache must never be what limits a step.
_CACHE_HEADROOM = 1.5
# The page size of the KV cache when this transformers does not say (its 5.25 default).
_DEFAULT_PAGE_SIZE = 256
# How long one serving of a trace may go without a finished request before it is given up as stuck (seconds).
_STALL_SECONDS = 600.0


@dataclasses.dataclass(frozen=True)
class TraceSpec:
    """The shape of a request trace: how many requests, the range of their prompt lengths (drawn log-uniform) and of
    their new tokens (drawn uniform), both inclusive, and the seed of the draw."""

    requests: int = 64
    prompt_lengths: tuple[int, int] = (16, 1024)
    new_tokens: tuple[int, int] = (16, 128)
    seed: int = 0

    def warmup(self) -> TraceSpec:
        """The separate, smaller trace `auto` is tuned on: another seed, a quarter of the requests."""
        requests = max(MIN_WARMUP_REQUESTS, self.requests // WARMUP_SHARE)
        return dataclasses.replace(self, requests=requests, seed=self.seed + 1)


@dataclasses.dataclass(frozen=True)
class Trace:
    """The requests of one trace: prompts of random token ids, and the new tokens each generates."""

    spec: TraceSpec
    prompts: tuple[tuple[int, ...], ...]
    new_tokens: tuple[int, ...]

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def generated_tokens(self) -> int:
        return sum(self.new_tokens)

    def to_json(self) -> dict:
        return {
            "requests": self.spec.requests,
            "prompt_lengths_range": list(self.spec.prompt_lengths),
            "new_tokens_range": list(self.spec.new_tokens),
            "seed": self.spec.seed,
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "prompt_lengths": [len(p) for p in self.prompts],
            "new_tokens": list(self.new_tokens),
        }


def make_trace(spec: TraceSpec, vocab_size: int) -> Trace:
    """The seeded trace of `spec`: the same requests for the same spec and vocabulary, on every machine."""
    generator = random.Random(spec.seed)
    (low, high), (fewest, most) = spec.prompt_lengths, spec.new_tokens
    prompts, new_tokens = [], []
    for _ in range(spec.requests):
        length = round(math.exp(generator.uniform(math.log(low), math.log(high))))
        length = min(max(length, low), high)
        prompts.append(tuple(generator.randrange(vocab_size) for _ in range(length)))
        new_tokens.append(generator.randint(fewest, most))
    return Trace(spec, tuple(prompts), tuple(new_tokens))


def size_bucket(num_tokens: int) -> tuple[int, int]:
    """The power-of-two bucket `[2^k, 2^(k+1) - 1]` that holds `num_tokens` (>= 1)."""
    first = 1 << (max(num_tokens, 1).bit_length() - 1)
    return first, 2 * first - 1


def step_histogram(steps: Sequence[int]) -> list[dict]:
    """`{"first", "last", "steps", "tokens"}` per power-of-two bucket of step sizes, smallest first."""
    buckets: dict[tuple[int, int], list[int]] = {}
    for num_tokens in steps:
        buckets.setdefault(size_bucket(num_tokens), []).append(num_tokens)
    return [
        {"first": first, "last": last, "steps": len(sizes), "tokens": sum(sizes)}
        for (first, last), sizes in sorted(buckets.items())
    ]


def backend_histogram(decisions: Sequence[tuple[int, str]]) -> list[dict]:
    """`auto`'s experts calls per power-of-two bucket of their token count and backend: `{"first", "last",
    "calls": {backend: count}}`, smallest first; the counts sum to the number of decisions."""
    buckets: dict[tuple[int, int], Counter] = {}
    for num_tokens, backend in decisions:
        buckets.setdefault(size_bucket(num_tokens), Counter())[backend] += 1
    return [
        {"first": first, "last": last, "calls": dict(sorted(calls.items()))}
        for (first, last), calls in sorted(buckets.items())
    ]


class _StepRecorder:
    """Records one entry per forward of the model: the first experts layer's token count and the experts
    implementation Transformers dispatched it to (`"auto"` for auto, whose backends the decisions tell)."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.steps: list[tuple[int, str]] = []

    def _hook(self, module, args):
        # Runs in continuous batching's own thread; appending to a list is atomic.
        self.steps.append((int(args[0].shape[0]), str(module.config._experts_implementation)))

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[tuple[int, str]]]:
        self.steps = []
        handle = self.module.register_forward_pre_hook(self._hook)
        try:
            yield self.steps
        finally:
            handle.remove()


@dataclasses.dataclass(frozen=True)
class Served:
    """One serving of a trace: every request's new tokens, and the milliseconds from the loop's start to the last
    request's result (a whole serving also creates the cache and the loop's thread first and stops them after)."""

    tokens: list[list[int]]
    serving_ms: float


@dataclasses.dataclass
class ContinuousBatching:
    """Transformers' continuous batching as the installed version offers it, found by feature detection.

    Attributes:
        init_kwargs (`dict`): what `model.init_continuous_batching` is given besides the generation config.
        generation_settings (`dict`): the settings an older transformers reads from the generation config.
        settings (`dict`): the settings asked and how this transformers took them (reported in the results).
        add_request_kwargs (`dict`): the fixed arguments of every `manager.add_request`.
    """

    init_kwargs: dict
    generation_settings: dict
    settings: dict
    add_request_kwargs: dict

    @staticmethod
    def unavailable_reason(model: torch.nn.Module) -> str | None:
        """Why this transformers cannot run the serve part (`None` when it can), in one line."""
        import transformers

        version = transformers.__version__
        if not hasattr(model, "generate_batch"):
            return f"transformers {version} has no continuous batching (model.generate_batch)"
        if not hasattr(model, "init_continuous_batching"):
            return f"transformers {version} has no model.init_continuous_batching to queue requests with"
        manager = _manager_class()
        if manager is None or "max_new_tokens" not in inspect.signature(manager.add_request).parameters:
            return f"transformers {version}'s continuous batching takes no max_new_tokens per request"
        return None

    @classmethod
    def configure(cls, model: torch.nn.Module, trace: Trace, max_batch_tokens: int | None) -> ContinuousBatching:
        """The settings for serving `trace`: at most `max_batch_tokens` tokens per step (Transformers' own default
        when `None`), and a KV cache sized for every request of the trace at once (rather than for the device's
        memory, which on CPU means most of the RAM zeroed at every start)."""
        page_size = _DEFAULT_PAGE_SIZE
        config_class = _continuous_batching_config_class()
        init_parameters = inspect.signature(model.init_continuous_batching).parameters
        fields = {f.name for f in dataclasses.fields(config_class)} if config_class is not None else set()
        if "page_size" in fields:
            page_size = next(f.default for f in dataclasses.fields(config_class) if f.name == "page_size")
        pages = [math.ceil((len(p) + n) / page_size) for p, n in zip(trace.prompts, trace.new_tokens, strict=True)]
        blocks = math.ceil(_CACHE_HEADROOM * sum(pages))
        asked = {"max_batch_tokens": max_batch_tokens, "num_blocks": blocks}
        settings: dict = {"page_size": page_size, **asked, "applied_through": None}
        init_kwargs, generation_settings = {}, {}
        if config_class is not None and "continuous_batching_config" in init_parameters and "num_blocks" in fields:
            values = {k: v for k, v in asked.items() if v is not None and k in fields}
            init_kwargs["continuous_batching_config"] = config_class(**values)
            settings["applied_through"] = "ContinuousBatchingConfig"
            settings["not_applied"] = sorted(k for k, v in asked.items() if v is not None and k not in fields)
        else:  # older releases read these settings from the generation config, where it has them
            from transformers import GenerationConfig

            known = {k for k in asked if hasattr(GenerationConfig(), k)}
            settings["applied_through"] = "GenerationConfig"
            settings["not_applied"] = sorted(k for k, v in asked.items() if v is not None and k not in known)
            generation_settings = {k: v for k, v in asked.items() if v is not None and k in known}
        add_request = inspect.signature(_manager_class().add_request).parameters
        add_kwargs = {"eos_token_id": -1} if "eos_token_id" in add_request else {}
        return cls(init_kwargs, generation_settings, settings, add_kwargs)

    def generation_config(self, trace: Trace):
        """Greedy, no end-of-sequence token: every request generates exactly its own new tokens."""
        from transformers import GenerationConfig

        config = GenerationConfig(do_sample=False, max_new_tokens=max(trace.new_tokens), pad_token_id=0)
        config.eos_token_id = -1  # never generated: no request stops early
        for name, value in self.generation_settings.items():
            setattr(config, name, value)
        return config

    def serve(self, model: torch.nn.Module, trace: Trace) -> Served:
        """Serves every request of `trace` (all queued before the loop starts): each one's new tokens, in request
        order. Raises `RuntimeError` when a request fails or the loop stops before all finished."""
        manager = model.init_continuous_batching(generation_config=self.generation_config(trace), **self.init_kwargs)
        ids = [f"req_{i}" for i in range(len(trace.prompts))]
        for request_id, prompt, new_tokens in zip(ids, trace.prompts, trace.new_tokens, strict=True):
            manager.add_request(list(prompt), request_id=request_id, max_new_tokens=new_tokens,
                                **self.add_request_kwargs)  # fmt: skip
        manager.start()
        started = time.perf_counter()
        results = {}
        try:
            waited = time.perf_counter()
            while len(results) < len(ids):
                result = manager.get_result(timeout=1)
                if result is None:
                    if not manager.is_running() or time.perf_counter() - waited > _STALL_SECONDS:
                        raise RuntimeError(f"continuous batching stopped after {len(results)} of {len(ids)} requests")
                    continue
                waited = time.perf_counter()
                if getattr(result, "error", None):
                    raise RuntimeError(f"continuous batching failed request {result.request_id}: {result.error}")
                finished = getattr(result, "is_finished", None)
                if finished is None or finished():
                    results[result.request_id] = result
            serving_ms = (time.perf_counter() - started) * 1e3
        finally:
            manager.stop(block=True)
            if hasattr(manager, "destroy"):
                manager.destroy()
        return Served([list(results[request_id].generated_tokens) for request_id in ids], serving_ms)


def _manager_class():
    try:
        from transformers.generation.continuous_batching import ContinuousBatchingManager
    except ImportError:
        return None
    return ContinuousBatchingManager


def _continuous_batching_config_class():
    try:
        from transformers.generation.configuration_utils import ContinuousBatchingConfig
    except ImportError:
        return None
    return ContinuousBatchingConfig if dataclasses.is_dataclass(ContinuousBatchingConfig) else None


def transformers_default(model: torch.nn.Module) -> str:
    """The experts implementation Transformers gives a model that asks for none (`grouped_mm`, or `eager` where
    grouped GEMM cannot dispatch)."""
    resolve = getattr(model, "get_correct_experts_implementation", None)
    if resolve is None:
        return GROUPED_MM
    try:
        return resolve(None)
    except (ValueError, ImportError):
        return GROUPED_MM


@dataclasses.dataclass
class ServeRun:
    """One contender's servings of the trace: timings (whole servings, ms), tokens, steps and peak memory."""

    run: ContenderRun
    tokens: list[list[int]] | None = None  # every request's new tokens, from the warm-up serving
    steps: list[tuple[int, str]] = dataclasses.field(default_factory=list)  # the warm-up's (tokens, dispatched to)
    same_tokens_every_round: bool = True
    serving_ms: list[float] = dataclasses.field(default_factory=list)  # each timed round's `Served.serving_ms`
    warm_ms: float | None = None  # the warm-up serving's wall time
    alias: str | None = None  # the fixed backend whose timings these are (Transformers' default, where it ran one)


@dataclasses.dataclass
class ServeSetup:
    """What the serve part needs from the benchmark: where `auto` is tuned, how, and what may not run."""

    max_batch_tokens: int | None
    rounds: int
    guard: MemoryGuard
    tune_folder: Path
    tune_seconds_per_point: float
    progress: bool
    # Points `auto` at a profile folder for the block (the benchmark's `_reading_profiles_from`).
    reading_profiles_from: Callable[[Path], contextlib.AbstractContextManager]
    slow_factor: float = SLOW_FACTOR


def run_serve(model: torch.nn.Module, device: torch.device, spec: TraceSpec, setup: ServeSetup) -> dict:
    """Serves `spec`'s trace with every contender (see the module docstring) and returns the serve part's results;
    `{"skipped": reason}` where this transformers has no continuous batching to run."""
    reason = ContinuousBatching.unavailable_reason(model)
    if reason is not None:
        logger.warning("serve part skipped: %s", reason)
        return {"skipped": reason}
    vocab = model.config.get_text_config().vocab_size
    trace, warmup_trace = make_trace(spec, vocab), make_trace(spec.warmup(), vocab)
    batching = ContinuousBatching.configure(model, trace, setup.max_batch_tokens)
    largest_step = min(setup.max_batch_tokens or trace.prompt_tokens, trace.prompt_tokens + spec.requests)
    experts = [m for m in model.modules() if is_experts_module(m)]
    recorder = _StepRecorder(experts[0])
    default_backend = transformers_default(model)
    # Each contender, in serving order, and the experts implementation it sets.
    implementation = {name: name for name in FIXED_BACKENDS} | {DEFAULT: default_backend, AUTO: AUTO}
    runs: dict[str, ServeRun] = {}
    for name in implementation:
        skip = setup.guard.reason(implementation[name], largest_step)
        if skip is not None:
            runs[name] = ServeRun(ContenderRun(status=Status.SKIPPED, note=f"largest step ({largest_step}): {skip}"))

    results: dict = {
        "load_average_at_start": _load_average(),
        "trace": trace.to_json(),
        "warmup_trace": warmup_trace.to_json(),
        "continuous_batching": batching.settings,
        "default_backend": default_backend,
    }
    with torch.inference_mode(), setup.reading_profiles_from(setup.tune_folder):
        results["tune"], top_k = _tune(model, batching, warmup_trace, setup)
        results["auto_regions"], results["crossovers"] = _auto_table(experts[0], device, top_k)
        auto_decisions = _warm_up(model, batching, trace, recorder, implementation, runs)
        _default_alias(runs, default_backend)
        results["round_orders"] = _timed_rounds(model, batching, trace, device, implementation, runs, setup)
    model.set_experts_implementation(AUTO)
    results["load_average_at_end"] = _load_average()
    return results | _summary(trace, runs, auto_decisions, len(experts), default_backend)


def _load_average() -> list[float] | None:
    """The machine's 1-, 5- and 15-minute load averages (None where the OS has none): a shared machine's other work
    slows the servings of a whole trace, which take seconds to minutes each."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _tune(model, batching: ContinuousBatching, warmup_trace: Trace, setup: ServeSetup) -> tuple[dict, int]:
    """`auto` tuned in place on one serving of the warm-up trace: its wall time and what it measured, and the
    experts layers' top-k."""
    from ..tuning import tune

    model.set_experts_implementation(AUTO)
    started = time.perf_counter()
    with warnings.catch_warnings():  # no profile yet, by design: the block runs on the fallback rule
        warnings.simplefilter("ignore", ProfileMissingWarning)
        tuning = tune(
            model, out=setup.tune_folder, seconds_per_point=setup.tune_seconds_per_point, progress=setup.progress
        )
        with tuning as report:
            batching.serve(model, warmup_trace)
    seconds = time.perf_counter() - started
    logger.info("tuned in place in %.1f s:\n%s", seconds, report.summary())
    record = {
        "wall_seconds": seconds,
        "seconds_per_point": setup.tune_seconds_per_point,
        "profile_dir": str(setup.tune_folder),
        "summary": report.summary(),
        "layers": [
            {
                "layer": layer.spec.describe(),
                "profile": str(layer.profile),
                "sweep_seconds": layer.seconds,
                "tokens_measured": layer.tokens_measured,
                "calls_by_tokens": {str(k): v for k, v in layer.calls_by_tokens.items()},
                "regions": [_region_json(r) for r in layer.regions],
            }
            for layer in report.layers
        ],
    }
    return record, report.layers[0].spec.top_k


def _region_json(region) -> dict:
    last = None if math.isinf(region.last) else int(region.last)
    return {"first": region.first, "last": last, "backend": region.backend, "source": region.source}


def _auto_table(module: torch.nn.Module, device: torch.device, top_k: int) -> tuple[list[dict], list[dict]]:
    """The decision table `auto` serves `module` with, and its crossovers: where the backend changes, with the
    backends on either side."""
    from ..dispatch import decision_table

    regions = decision_table(module, device, top_k).regions
    crossovers = [
        {"tokens": after.first, "from": before.backend, "to": after.backend}
        for before, after in itertools.pairwise(regions)
        if before.backend != after.backend
    ]
    return [_region_json(r) for r in regions], crossovers


def _warm_up(model, batching, trace, recorder, implementation: dict[str, str], runs) -> list[tuple[int, str]]:
    """One untimed serving per contender that may run: its tokens, its steps, and (for auto) its decisions."""
    auto_decisions: list[tuple[int, str]] = []
    for name, experts_implementation in implementation.items():
        if name in runs:
            continue
        model.set_experts_implementation(experts_implementation)
        started = time.perf_counter()
        try:
            with recorder.recording() as steps, record_decisions() as decisions:
                tokens = batching.serve(model, trace).tokens
        except (RuntimeError, torch.OutOfMemoryError) as error:
            runs[name] = ServeRun(ContenderRun(status=Status.ERROR, note=f"{type(error).__name__}: {error}"))
            continue
        warm_ms = (time.perf_counter() - started) * 1e3
        runs[name] = ServeRun(ContenderRun(), tokens=tokens, steps=list(steps), warm_ms=warm_ms)
        if name == AUTO:
            auto_decisions = [(d.num_tokens, d.backend) for d in decisions]
    return auto_decisions


def _default_alias(runs: dict[str, ServeRun], default_backend: str) -> None:
    """Transformers' default ran one fixed backend at every step: it is that backend, timed once (its own warm-up
    stays as the check)."""
    default = runs.get(DEFAULT)
    if default is None or default.run.status != Status.OK or not default.steps:
        return
    ran = {implementation for _, implementation in default.steps}
    twin = runs.get(default_backend)
    if ran == {default_backend} and twin is not None and twin.run.status == Status.OK:
        default.run.note = f"ran {default_backend} at every step: its timings are {default_backend}'s"
        default.alias = default_backend


def _timed_rounds(
    model, batching, trace, device, implementation: dict[str, str], runs: dict[str, ServeRun], setup: ServeSetup
) -> list[list[str]]:
    """Interleaved timed rounds of the contenders that warmed up, in a new seeded order every round (returned); one
    whose warm-up took `slow_factor` times the fastest's is reported with that one timing, not timed further."""
    warmed = {name: r for name, r in runs.items() if r.run.status == Status.OK and r.alias is None}
    if not warmed:
        return []
    fastest = min(r.warm_ms for r in warmed.values())
    timed = []
    for name, serve_run in warmed.items():
        if name != AUTO and serve_run.warm_ms >= setup.slow_factor * fastest:
            ratio = serve_run.warm_ms / fastest
            serve_run.run.status = Status.SLOW
            serve_run.run.note = f"warm-up {serve_run.warm_ms:.4g} ms, {ratio:.1f}x the fastest; not timed further"
        else:
            timed.append(name)
    peaks: dict[str, int] = {}
    orders = list(round_orders(timed, setup.rounds))
    for order in orders:
        for name in order:
            model.set_experts_implementation(implementation[name])
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            synchronize(device)
            started = time.perf_counter()
            served = batching.serve(model, trace)
            synchronize(device)
            runs[name].run.samples_ms.append((time.perf_counter() - started) * 1e3)
            runs[name].serving_ms.append(served.serving_ms)
            runs[name].same_tokens_every_round &= served.tokens == runs[name].tokens
            if device.type == "cuda":
                peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated(device))
    for name, peak in peaks.items():
        runs[name].run.peak_bytes = peak
    for serve_run in runs.values():
        if serve_run.alias is not None:
            serve_run.run.samples_ms = list(runs[serve_run.alias].run.samples_ms)
            serve_run.serving_ms = list(runs[serve_run.alias].serving_ms)
            serve_run.run.peak_bytes = runs[serve_run.alias].run.peak_bytes
    return orders


def _summary(trace: Trace, runs: dict[str, ServeRun], auto_decisions, layers: int, default_backend: str) -> dict:
    reference = runs.get("eager")
    reference_tokens = reference.tokens if reference is not None else None
    contenders = {}
    for name, serve_run in runs.items():
        run = serve_run.run
        median = run.median_ms
        record = run.to_json() | {
            "tokens_per_second": trace.generated_tokens / (median / 1e3) if median else None,
            "same_as": serve_run.alias,
            "serving_ms": serve_run.serving_ms,
            "serving_median_ms": statistics.median(serve_run.serving_ms) if serve_run.serving_ms else None,
            "warm_up_ms": serve_run.warm_ms,
            "steps": len(serve_run.steps) if serve_run.steps else None,
            "dispatched": dict(Counter(impl for _, impl in serve_run.steps)) if serve_run.steps else None,
        }
        contenders[name] = record
    same_tokens = {
        name: (
            None
            if reference_tokens is None or serve_run.tokens is None
            else serve_run.tokens == reference_tokens and serve_run.same_tokens_every_round
        )
        for name, serve_run in runs.items()
    }
    step_lists = {name: [n for n, _ in r.steps] for name, r in runs.items() if r.steps}
    auto_steps = step_lists.get(AUTO) or next(iter(step_lists.values()), [])
    medians = {name: r.run.median_ms for name, r in runs.items() if r.run.median_ms is not None}
    fixed = {b: medians[b] for b in FIXED_BACKENDS if b in medians}
    best = min(fixed, key=fixed.get) if fixed else None
    auto = medians.get(AUTO)
    return {
        "contenders": contenders,
        "same_tokens_as_eager": same_tokens,
        "steps": {
            "count": len(auto_steps),
            "largest": max(auto_steps, default=None),
            "same_for_every_contender": len({tuple(s) for s in step_lists.values()}) <= 1,
            "sizes": auto_steps,
            "histogram": step_histogram(auto_steps),
        },
        "experts_layers": layers,
        "auto_decisions": len(auto_decisions),
        "auto_backends": backend_histogram(auto_decisions),
        "memory_note": None if any(r.run.peak_bytes for r in runs.values()) else _CPU_MEMORY_NOTE,
        "best_fixed": best,
        "auto_over_best_fixed": auto / fixed[best] if auto is not None and best else None,
        "auto_over_default": auto / medians[DEFAULT] if auto is not None and DEFAULT in medians else None,
    }


_CPU_MEMORY_NOTE = (
    "on CPU torch keeps no allocator statistics, and the bench's CPU tracker follows the calling thread's tensors "
    "while continuous batching runs the model in a thread of its own"
)
