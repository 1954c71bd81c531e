"""The benchmark's serve part: the seeded request trace, the histograms of steps and backends, the results it writes
for Transformers' continuous batching with every contender, its options and the targets it is held to."""

import importlib.util
import json
import statistics

import pytest
import torch

from autoexperts.bench.analysis import headline_figures, spans_crossovers
from autoexperts.bench.run import BenchOptions, run_benchmark
from autoexperts.bench.serve import (
    ContinuousBatching,
    ServeSetup,
    TraceSpec,
    backend_histogram,
    make_trace,
    run_serve,
    size_bucket,
    step_histogram,
)
from autoexperts.calibration.run import calibrate
from tests.conftest import load_script

CONTENDERS = {"eager", "batched_mm", "grouped_mm", "default", "auto"}


@pytest.mark.parametrize(
    "spec",
    [
        TraceSpec(),  # the default: 64 requests, prompts 16-1024, 16-128 new tokens
        TraceSpec(requests=5, prompt_lengths=(7, 7), new_tokens=(1, 1), seed=3),  # every range a single value
        TraceSpec(requests=200, prompt_lengths=(1, 4096), new_tokens=(1, 512), seed=9),  # wide ranges, many requests
    ],
)
def test_trace_is_seeded_and_has_the_requested_shape(spec):
    trace = make_trace(spec, vocab_size=1000)
    assert trace == make_trace(spec, vocab_size=1000)  # the same spec draws the same requests
    assert len(trace.prompts) == len(trace.new_tokens) == spec.requests
    lengths = [len(p) for p in trace.prompts]
    assert spec.prompt_lengths[0] <= min(lengths) and max(lengths) <= spec.prompt_lengths[1]
    assert spec.new_tokens[0] <= min(trace.new_tokens) and max(trace.new_tokens) <= spec.new_tokens[1]
    assert all(0 <= token < 1000 for prompt in trace.prompts for token in prompt)
    assert trace.prompt_tokens == sum(lengths) and trace.generated_tokens == sum(trace.new_tokens)
    other = make_trace(TraceSpec(spec.requests, spec.prompt_lengths, spec.new_tokens, spec.seed + 1), 1000)
    assert other.prompts != trace.prompts  # another seed, other prompts (their token ids at least)


def test_prompt_lengths_are_log_uniform():
    """Half the prompts of a log-uniform draw over 16-1024 lie below the geometric midpoint 128 (a uniform draw would
    put the median near 520)."""
    lengths = [len(p) for p in make_trace(TraceSpec(requests=400), vocab_size=10).prompts]
    assert 100 <= statistics.median(lengths) <= 160
    below = sum(n < 128 for n in lengths) / len(lengths)
    assert 0.4 <= below <= 0.6


def test_warmup_trace_is_another_smaller_draw():
    spec = TraceSpec(requests=64, seed=0)
    warmup = spec.warmup()
    assert (warmup.requests, warmup.seed) == (16, 1)
    assert (warmup.prompt_lengths, warmup.new_tokens) == (spec.prompt_lengths, spec.new_tokens)
    assert TraceSpec(requests=2).warmup().requests == 4  # never fewer than a few requests to tune on


@pytest.mark.parametrize(
    ("num_tokens", "bucket"),
    [
        (1, (1, 1)),  # a single decode token
        (3, (2, 3)),
        (64, (64, 127)),  # a power of two opens its bucket
        (1023, (512, 1023)),  # one below a power of two closes the bucket below
    ],
)
def test_size_bucket(num_tokens, bucket):
    assert size_bucket(num_tokens) == bucket


def test_histograms_count_every_step_and_every_decision():
    steps = [1000, 1000, 600, 40, 33, 1]
    histogram = step_histogram(steps)
    assert [(b["first"], b["last"], b["steps"], b["tokens"]) for b in histogram] == [
        (1, 1, 1, 1),
        (32, 63, 2, 73),
        (512, 1023, 3, 2600),
    ]
    decisions = [(n, "eager" if n >= 600 else "grouped_mm") for n in steps for _ in range(2)]  # two layers
    backends = backend_histogram(decisions)
    assert sum(sum(b["calls"].values()) for b in backends) == len(decisions)
    assert backends[-1] == {"first": 512, "last": 1023, "calls": {"eager": 6}}


def test_transformers_without_continuous_batching_skips_the_part_in_one_line():
    model = torch.nn.Linear(2, 2)  # stands for a model of a transformers without generate_batch
    reason = ContinuousBatching.unavailable_reason(model)
    assert "no continuous batching" in reason and "\n" not in reason
    setup = ServeSetup(
        None, 1, guard=None, tune_folder=None, tune_seconds_per_point=0.1, progress=False, reading_profiles_from=None
    )
    assert run_serve(model, torch.device("cpu"), TraceSpec(), setup) == {"skipped": reason}


def test_serve_part_writes_consistent_results(tiny_model_folder, tmp_path, profile_dir):
    profiles = tmp_path / "bench-profiles"
    calibrate(str(tiny_model_folder), "cpu", "float32", [1, 2, 4, 8, 16], out=profiles, progress=False,
              seconds_per_point=0.005)  # fmt: skip
    options = BenchOptions(
        model=str(tiny_model_folder), device="cpu", out=tmp_path / "results", profile_dir=profiles, parts=("serve",),
        requests=6, serve_prompt_lengths=(4, 40), serve_new_tokens=(2, 5), max_batch_tokens=32, generate_rounds=2,
        calibration_seconds_per_point=0.005, progress=False,
    )  # fmt: skip
    results = run_benchmark(options)
    with open(results["files"]["json"], encoding="utf-8") as file:
        serve = json.load(file)["serve"]

    contenders = serve["contenders"]
    assert set(contenders) == CONTENDERS
    assert all(serve["same_tokens_as_eager"][name] is True for name in CONTENDERS)
    assert serve["default_backend"] == "grouped_mm"  # on CPU, and continuous batching keeps it at every step
    assert contenders["default"]["same_as"] == "grouped_mm"
    assert contenders["default"]["dispatched"] == {"grouped_mm": serve["steps"]["count"]}
    assert contenders["auto"]["dispatched"] == {"auto": serve["steps"]["count"]}
    timed = ["auto", "batched_mm", "eager", "grouped_mm"]  # the default is grouped_mm's twin, not timed again
    assert len(serve["round_orders"]) == 2 and all(sorted(order) == timed for order in serve["round_orders"])
    for run in contenders.values():
        assert run["status"] == "ok" and len(run["samples_ms"]) == 2
        assert run["tokens_per_second"] == pytest.approx(serve["trace"]["generated_tokens"] / run["median_ms"] * 1e3)

    # The steps: every contender ran the same ones, none above max_batch_tokens, and together they hold every prompt
    # token and every generated token but each request's last (one forward per new token, the first from the prompt).
    steps = serve["steps"]
    assert steps["same_for_every_contender"] and 0 < steps["largest"] <= 32
    trace = serve["trace"]
    assert sum(steps["sizes"]) == trace["prompt_tokens"] + trace["generated_tokens"] - trace["requests"]
    assert sum(b["steps"] for b in steps["histogram"]) == steps["count"] == len(steps["sizes"])
    assert serve["continuous_batching"]["max_batch_tokens"] == 32

    # auto's backends: one decision per step and experts layer, each counted once in the histogram.
    assert serve["auto_decisions"] == steps["count"] * serve["experts_layers"]
    assert sum(sum(b["calls"].values()) for b in serve["auto_backends"]) == serve["auto_decisions"]
    for bucket in serve["auto_backends"]:
        region_backends = {r["backend"] for r in serve["auto_regions"]}
        assert set(bucket["calls"]) <= region_backends
    assert serve["tune"]["wall_seconds"] > 0 and serve["tune"]["layers"]
    # auto served with the tuned table (its bounds set by the memory budget may move with the free memory)
    tuned = serve["tune"]["layers"][0]["regions"]
    for n in steps["sizes"]:
        assert _backend_at(serve["auto_regions"], n) == _backend_at(tuned, n)
    for crossover in serve["crossovers"]:
        assert crossover["tokens"] in [r["first"] for r in serve["auto_regions"]]

    # The ratios come from the medians.
    medians = {name: run["median_ms"] for name, run in contenders.items()}
    best = min(("eager", "batched_mm", "grouped_mm"), key=medians.get)
    assert serve["best_fixed"] == best
    assert serve["auto_over_best_fixed"] == pytest.approx(medians["auto"] / medians[best])
    assert serve["auto_over_default"] == pytest.approx(medians["auto"] / medians["grouped_mm"])
    figures = {f["name"]: f["value"] for f in headline_figures({"serve": serve, "machine": {"device_type": "cpu"}})}
    assert figures["serve: auto / best fixed backend"] == serve["auto_over_best_fixed"]
    assert figures["serve: auto / Transformers' default"] == serve["auto_over_default"]

    with open(results["files"]["markdown"], encoding="utf-8") as file:
        markdown = file.read()
    assert "## 6. Continuous batching" in markdown and "| default → grouped_mm |" in markdown
    assert list((tmp_path / "results").glob("*/profiles-serve-tuned/*/*.json")), "the tuned profile is kept apart"
    assert not list(profiles.glob("*/*.previous.json")), "the reused profile folder is left as it was"
    if importlib.util.find_spec("matplotlib") is None:  # the optional extra: no plot, and no error
        assert "serve" not in results["files"]
        return
    with open(results["files"]["serve"], "rb") as png:
        assert png.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "-serve.png)" in markdown


def _backend_at(regions: list[dict], num_tokens: int) -> str:
    return next(r["backend"] for r in regions if r["first"] <= num_tokens and (r["last"] or num_tokens) >= num_tokens)


def _serve_results(auto_over_best: float, auto_over_default: float) -> dict:
    serve = {
        "best_fixed": "eager",
        "auto_over_best_fixed": auto_over_best,
        "auto_over_default": auto_over_default,
        "default_backend": "grouped_mm",
        "contenders": {"default": {"dispatched": {"grouped_mm": 9}}},
        "crossovers": [{"tokens": 600, "from": "grouped_mm", "to": "eager"}],
        "steps": {"sizes": [1, 40, 1024]},
        "tune": {"wall_seconds": 30.0},
    }
    return {"kind": "autoexperts-bench", "machine": {"device_type": "cpu"}, "serve": serve}


@pytest.mark.parametrize(
    ("crossovers", "says"),
    [
        ([600], "steps of 1–1024 tokens span the crossover(s) at 600"),  # steps below and above it
        ([1, 600, 5000], "span the crossover(s) at 600, not those at 1, 5000"),  # no step below 1 nor from 5000 up
        ([2000], "span no crossover of auto's table (at 2000)"),  # every step below it
        ([], "auto's table has no crossover"),  # one backend at every count
    ],
)
def test_spans_crossovers_says_which_the_steps_reach(crossovers, says):
    serve = {"crossovers": [{"tokens": n} for n in crossovers], "steps": {"sizes": [1, 40, 1024]}}
    assert says in spans_crossovers(serve)


@pytest.mark.parametrize(
    ("auto_over_best", "auto_over_default", "met"),
    [
        (1.02, 0.97, (True, True)),  # both exactly at their limits
        (1.021, 0.96, (False, True)),  # slower than the best fixed backend by more than 2 %
        (0.99, 0.971, (True, False)),  # less than 3 % faster than Transformers' default
    ],
)
def test_targets_hold_serve_to_its_limits(auto_over_best, auto_over_default, met):
    results = _serve_results(auto_over_best, auto_over_default)
    verdicts = {t["name"]: t for t in load_script("targets").evaluate_targets(results)}
    best, default = verdicts["serve: auto / best fixed backend"], verdicts["serve: auto / Transformers' default"]
    assert (best["met"], default["met"]) == met
    assert "span the crossover(s) at 600" in best["note"] and "default ran grouped_mm" in default["note"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--serve-prompt-lengths", "1024-16"], "MIN is above MAX"),  # a range upside down
        (["--serve-new-tokens", "0-8"], "must be positive"),  # no request generates zero tokens
        (["--serve-new-tokens", "16..128"], "is not a range MIN-MAX"),  # not the MIN-MAX form
        (["--max-batch-tokens", "0"], "must be a positive integer"),  # a step of no tokens
        (["--requests", "many"], "is not an integer"),
        (["--parts", "serve,serve"], "repeats serve"),  # a part named twice
    ],
)
def test_serve_options_bad_input_is_one_line_and_exit_2(args, message, tmp_path, capsys):
    from autoexperts.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["bench", *args, "--out", str(tmp_path / "results"), "--no-progress"])
    stderr = capsys.readouterr().err
    assert exit_.value.code == 2
    assert message in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], {"parts": ["sweep", "forward", "generate", "overhead"], "requests": 64, "max_batch_tokens": None,
              "serve_prompt_lengths": (16, 1024), "serve_new_tokens": (16, 128)}),  # serve is asked for by name
        (["--parts", "serve", "--requests", "8", "--max-batch-tokens", "2048", "--serve-prompt-lengths", "32",
          "--serve-new-tokens", "4-8"],
         {"parts": ["serve"], "requests": 8, "max_batch_tokens": 2048, "serve_prompt_lengths": (32, 32),
          "serve_new_tokens": (4, 8)}),  # one count N is the range N-N
    ],
)  # fmt: skip
def test_serve_options_parse(args, expected):
    from autoexperts.cli import _build_parser

    parsed = vars(_build_parser().parse_args(["bench", *args]))
    assert {key: parsed[key] for key in expected} == expected


def test_default_parts_leave_serve_out_but_accept_it():
    from autoexperts.choices import BENCH_PARTS, DEFAULT_BENCH_PARTS

    assert "serve" in BENCH_PARTS and "serve" not in DEFAULT_BENCH_PARTS
    assert set(DEFAULT_BENCH_PARTS) < set(BENCH_PARTS)
    assert BenchOptions().parts == DEFAULT_BENCH_PARTS
