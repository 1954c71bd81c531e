"""The benchmark's own logic: held-out token counts, oracle and regret, totals, headline figures, the files it writes,
and the project's targets script (`calibrate/targets.py`) reading them."""

import importlib.util
import itertools
import json
import subprocess
import sys

import pytest
import torch

from autoexperts.bench.analysis import (
    ContenderRun,
    PointResult,
    choice_totals,
    headline_figures,
    sweep_summary,
)
from autoexperts.bench.layer_sweep import held_out_tokens
from autoexperts.bench.model_bench import FORWARD_MIN_ROUNDS
from autoexperts.bench.report import model_label
from autoexperts.bench.run import BenchOptions, run_benchmark
from autoexperts.calibration.run import calibrate
from autoexperts.calibration.sweep import default_token_grid
from autoexperts.cost_model import SLOW_FACTOR
from autoexperts.selection import device_model_table
from tests.conftest import REPOSITORY, layer_spec, load_script, tiny_model
from tests.test_device_model import BACKENDS, save_synthetic_device_model


def _point(num_tokens, auto_backend, **samples):
    runs = {
        name: ContenderRun(samples_ms=list(values)) if values else ContenderRun(status="skipped", note="memory")
        for name, values in samples.items()
    }
    return PointResult(str(num_tokens), num_tokens, runs, auto_backend)


@pytest.mark.parametrize(
    "grid",
    [
        default_token_grid(),  # the calibration default: 1, 2, 3, 4, 6, ..., 4096
        [1, 2, 4, 8, 16],  # powers of two
        [1, 100, 10_000],  # sparse
    ],
)
def test_held_out_tokens_lie_between_and_beyond_the_grid(grid):
    held_out = held_out_tokens(grid)
    assert held_out and not set(held_out) & set(grid)
    inside = [n for n in held_out if n < max(grid)]
    # every gap of the grid wide enough to hold an integer gets one point, strictly inside it
    gaps = [(a, b) for a, b in itertools.pairwise(grid) if b - a > 1]
    assert len(inside) == len(gaps)
    assert all(a < n < b for n, (a, b) in zip(inside, gaps, strict=True))
    assert [n for n in held_out if n > max(grid)] == [round(1.5 * max(grid)), 2 * max(grid)]


@pytest.mark.parametrize(
    ("point", "oracle", "regret", "choice_regret"),
    [
        # auto picked the fastest backend; its own timing is 10 % above that backend's
        (
            _point(8, "batched_mm", eager=[3, 3, 3], batched_mm=[1, 2, 3], grouped_mm=[4], auto=[2.2]),
            "batched_mm",
            0.1,
            0,
        ),
        # auto picked eager, 50 % slower than the oracle; its own timing a bit slower still
        (_point(8, "eager", eager=[3], batched_mm=[2], grouped_mm=[4], auto=[3.1]), "batched_mm", 0.55, 0.5),
        # batched_mm was not run (memory): the oracle is the fastest of the others
        (_point(8, "grouped_mm", eager=[5], batched_mm=[], grouped_mm=[4], auto=[4]), "grouped_mm", 0.0, 0.0),
    ],
)
def test_oracle_and_regret(point, oracle, regret, choice_regret):
    assert point.oracle()[0] == oracle
    assert point.regret() == pytest.approx(regret)
    assert point.choice_regret() == pytest.approx(choice_regret)


def test_sweep_summary_compares_each_backend_over_the_points_where_it_ran():
    points = [
        _point(4, "batched_mm", eager=[4], batched_mm=[1], grouped_mm=[2], auto=[1.1]),
        _point(400, "grouped_mm", eager=[30], batched_mm=[], grouped_mm=[20], auto=[21]),
    ]
    summary = sweep_summary(points)
    assert summary["auto_total_ms"] == pytest.approx(22.1)
    assert summary["oracle_total_ms"] == pytest.approx(21)
    assert summary["auto_over_oracle"] == pytest.approx(22.1 / 21)
    assert summary["versus_fixed"]["eager"]["auto_ratio"] == pytest.approx(22.1 / 34)
    batched = summary["versus_fixed"]["batched_mm"]
    assert batched["points_missing"] == 1 and batched["auto_ratio"] == pytest.approx(1.1)
    assert (summary["worst_regret"], summary["worst_regret_tokens"]) == (pytest.approx(0.1), 4)
    assert summary["oracle_picks"] == 2


@pytest.mark.parametrize(
    ("picks", "total", "oracle_picks", "untimed"),
    [
        (["batched_mm", "grouped_mm", "grouped_mm"], 1 + 20 + 50, 3, 0),  # the oracle everywhere
        (["grouped_mm", "eager", "grouped_mm"], 2 + 30 + 50, 1, 0),  # two timed wrong picks
        (["batched_mm", "grouped_mm", "eager"], 1 + 20 + SLOW_FACTOR * 50, 2, 1),  # eager was dropped as slow
        (["batched_mm", "batched_mm", "grouped_mm"], float("inf"), 2, 1),  # batched_mm was over the memory limit
    ],
)
def test_choice_totals_read_each_pick_off_the_fixed_backends_timings(picks, total, oracle_picks, untimed):
    slow = ContenderRun(status="slow", note="8x")
    points = [
        _point(4, "batched_mm", eager=[4], batched_mm=[1], grouped_mm=[2], auto=[1.1]),
        _point(400, "grouped_mm", eager=[30], batched_mm=[], grouped_mm=[20], auto=[21]),
        PointResult("4000", 4000, {"eager": slow, "grouped_mm": ContenderRun(samples_ms=[50])}, "grouped_mm"),
    ]
    totals = choice_totals(points, {"chooser": picks})["chooser"]
    assert totals["total_ms"] == pytest.approx(total)
    assert totals["over_oracle"] == pytest.approx(total / 71)
    assert (totals["oracle_picks"], totals["untimed_picks"]) == (oracle_picks, untimed)


def _cpu_results(overhead_us: float) -> dict:
    points = [
        _point(4, "batched_mm", eager=[4], batched_mm=[1], grouped_mm=[2], auto=[1.02]),
        _point(400, "grouped_mm", eager=[30], batched_mm=[], grouped_mm=[20], auto=[20]),
    ]
    return {
        "kind": "autoexperts-bench",
        "machine": {"device_type": "cpu"},
        "layer_sweep": {"summary": sweep_summary(points)},
        "overhead": {"auto_path_us": overhead_us},
        "calibration": {"wall_seconds": 100.0},
    }


def test_headline_figures_report_ratios_without_verdicts():
    figures = {f["name"]: f["value"] for f in headline_figures(_cpu_results(2.5))}
    assert figures["layer sweep: auto total / oracle total"] == pytest.approx(21.02 / 21)
    assert figures["layer sweep: auto total / batched_mm total"] == pytest.approx(1.02)  # where batched_mm ran
    assert figures["dispatch overhead per call (µs)"] == 2.5
    assert not any("generate" in name for name in figures)  # no generate() part in this run


def test_targets_script_flags_misses_and_strict_comparisons(tmp_path, capsys):
    targets = load_script("targets")
    verdicts = {t["name"]: t["met"] for t in targets.evaluate_targets(_cpu_results(2.5))}
    assert verdicts["layer sweep: auto total / oracle total"] is True  # 21.02 / 21
    assert verdicts["layer sweep: auto total / eager total"] is True
    assert verdicts["layer sweep: auto total / batched_mm total"] is False  # 1.02 / 1: not strictly below
    assert verdicts["layer sweep: worst point regret"] is True  # 2 % <= 10 % on CPU
    assert verdicts["dispatch overhead per call (µs)"] is False
    assert verdicts["calibration wall time (s)"] is True
    assert not any("generate" in name for name in verdicts)  # generate() targets are for GPUs

    result = tmp_path / "run.json"
    result.write_text(json.dumps(_cpu_results(1.5)), encoding="utf-8")
    assert targets.main([str(result)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(result)
    assert "met    dispatch overhead per call (µs): 1.500 (<= 2)" in lines
    missed = "MISSED layer sweep: auto total / batched_mm total: 1.020 (< 1) [over the 1 points where batched_mm ran]"
    assert missed in lines


@pytest.mark.parametrize(
    "content",
    [
        "{not json",  # unreadable
        '{"kind": "autoexperts-profile"}',  # another autoexperts file
    ],
)
def test_targets_script_refuses_a_file_that_is_not_a_bench_result(tmp_path, capsys, content):
    result = tmp_path / "run.json"
    result.write_text(content, encoding="utf-8")
    assert load_script("targets").main([str(result)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("targets.py: error: ") and len(error.strip().splitlines()) == 1


def test_targets_script_judges_every_committed_result(capsys):
    """Every bench result committed under calibrate/results is readable by the targets script."""
    files = (REPOSITORY / "calibrate").rglob("*.json")
    records = {path: json.loads(path.read_text(encoding="utf-8")) for path in files}
    bench = [p for p, r in records.items() if isinstance(r, dict) and r.get("kind") == "autoexperts-bench"]
    assert bench, "no committed bench result found"
    assert load_script("targets").main([str(p) for p in sorted(bench)]) == 0
    assert capsys.readouterr().out.count("\n/") + 1 == len(bench)  # one block per file


def test_benchmark_writes_consistent_json_markdown_and_plot(tiny_model_folder, tmp_path, profile_dir):
    profiles = tmp_path / "bench-profiles"
    calibrate(str(tiny_model_folder), "cpu", "float32", [1, 2, 4, 8, 16], out=profiles, progress=False,
              seconds_per_point=0.005)  # fmt: skip
    device_model = save_synthetic_device_model(profiles)  # so the sweep also shows auto with the device model
    options = BenchOptions(
        model=str(tiny_model_folder), device="cpu", out=tmp_path / "results", profile_dir=profiles,
        sweep_tokens=[3, 6, 12], long_prefill=32, prompt_length=8, new_tokens=3, generate_rounds=1, forward_rounds=2,
        seconds_per_point=0.005, progress=False,
    )  # fmt: skip
    results = run_benchmark(options)

    with open(results["files"]["json"], encoding="utf-8") as file:
        written = json.load(file)
    assert written["machine"]["device_type"] == "cpu" and written["versions"]["torch"] == torch.__version__
    for point in written["layer_sweep"]["points"]:
        fixed = {b: r["median_ms"] for b, r in point["runs"].items() if b != "auto" and r["median_ms"] is not None}
        assert point["oracle"] == min(fixed, key=fixed.get)
        assert point["regret"] == pytest.approx(point["runs"]["auto"]["median_ms"] / min(fixed.values()) - 1)
        assert point["auto_backend"] in fixed
    compared = written["layer_sweep"]["device_model"]
    assert compared["path"] == str(device_model.json_path)
    spec = layer_spec(tiny_model("qwen3_moe"))
    table = device_model_table(spec, device_model.model.for_spec(spec), BACKENDS, written["budget_bytes"])
    assert compared["picks"] == [table.region_for(n).backend for n in (3, 6, 12)]
    assert compared["totals"]["profile"]["oracle_picks"] == written["layer_sweep"]["summary"]["oracle_picks"]
    assert [p["num_tokens"] for p in written["forward"]] == [1, 16, 128, 64, 512, 32]
    assert written["generation"]["same_tokens_as_eager"]["eager"] is True
    assert sum(written["generation"]["auto_decisions"].values()) == 3  # one prefill and two decode steps
    assert {f["name"] for f in written["headline"]} >= {"layer sweep: worst point regret"}
    assert "targets" not in written  # the project's thresholds are calibrate/targets.py's, not the package's

    with open(results["files"]["markdown"], encoding="utf-8") as file:
        markdown = file.read()
    assert "| Implementation | Mean | Median | P90 latency | Peak Mem | vs best fixed |" in markdown
    assert "## 1. Layer sweep" in markdown and "## 3. generate()" in markdown
    assert "| auto with the device model |" in markdown
    if importlib.util.find_spec("matplotlib") is None:  # the optional extra: no plot, and no error
        assert "plot" not in results["files"]
        return
    with open(results["files"]["plot"], "rb") as png:
        assert png.read(8) == b"\x89PNG\r\n\x1a\n"


def test_model_forward_times_every_contender_at_least_the_forward_rounds(tiny_model_folder, tmp_path, profile_dir):
    assert BenchOptions().forward_rounds == FORWARD_MIN_ROUNDS >= 20  # 3 rounds could not tell auto from its kernel
    profiles = tmp_path / "bench-profiles"
    calibrate(str(tiny_model_folder), "cpu", "float32", [1, 2, 4, 8, 16], out=profiles, progress=False,
              seconds_per_point=0.005)  # fmt: skip
    options = BenchOptions(
        model=str(tiny_model_folder), device="cpu", out=tmp_path / "results", profile_dir=profiles, parts=("forward",),
        long_prefill=16, seconds_per_point=0.0, forward_rounds=5, progress=False,
    )  # fmt: skip
    results = run_benchmark(options)
    timed = [run for point in results["forward"] for run in point["runs"].values() if run["status"] == "ok"]
    assert timed and all(len(run["samples_ms"]) >= 5 for run in timed)
    ratios = [
        p["runs"]["auto"]["median_ms"] / p["runs"][p["auto_backend"]]["median_ms"]
        for p in results["forward"]
        if p["runs"].get(p["auto_backend"], {}).get("median_ms")
    ]
    (figure,) = [f for f in results["headline"] if f["name"].startswith("model forward: auto / the backend it ran")]
    assert figure["value"] == max(ratios)


def _bench_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "autoexperts", "bench", *args], capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_bench_command_calibrates_then_benchmarks(tiny_model_folder, tmp_path):
    out = tmp_path / "results"
    completed = _bench_cli(
        "--model", str(tiny_model_folder), "--parts", "sweep,overhead", "--tokens", "5,24",
        "--calibration-seconds-per-point", "0.005", "--seconds-per-point", "0.005", "--out", str(out), "--no-progress",
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    (json_path,) = out.glob("*/tiny-qwen3-moe-float32-none.json")
    results = json.loads(json_path.read_text(encoding="utf-8"))
    assert results["calibration"]["wall_seconds"] > 0  # the calibrate command was run and timed
    assert [p["num_tokens"] for p in results["layer_sweep"]["points"]] == [5, 24]
    assert list(out.glob("*/profiles/*/*.json")), "the calibrated profile is kept beside the results"
    assert "calibration wall time (s)" in completed.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--parts", "sweep,nonsense"], "unknown benchmark part"),  # a part that does not exist
        (["--compile", "fast"], "invalid choice"),  # an unknown compile mode
        (["--new-tokens", "0"], "must be a positive integer"),  # a non-positive count
        (["--model", "no-such-preset"], "unknown model"),  # a model that is neither preset, folder nor Hub id
    ],
)
def test_bench_bad_input_is_one_line_and_exit_2(args, message, tmp_path, capsys):
    from autoexperts.cli import main

    try:
        status = main(["bench", *args, "--out", str(tmp_path / "results"), "--no-progress"])
    except SystemExit as exit_:  # argparse's own errors
        status = exit_.code
    stderr = capsys.readouterr().err
    assert status == 2
    assert message in stderr and len(stderr.strip().splitlines()) == 1
    assert not list((tmp_path / "results").glob("*/*.json"))


@pytest.mark.parametrize(
    ("auto_backend", "noise_named", "quoted"),
    [
        ("grouped_mm", True, "+15.0% at 400 tokens"),  # auto ran the oracle's backend: its regret is timing noise
        ("eager", False, "choice regret was +50.0% at 400 tokens"),  # auto chose wrong: eager is 1.5x the oracle
    ],
)
def test_report_tells_noise_from_wrong_choices(auto_backend, noise_named, quoted):
    from autoexperts.bench.report import _diagnosis

    points = [
        _point(400, auto_backend, eager=[30], batched_mm=[], grouped_mm=[20], auto=[23]),
        _point(4, "batched_mm", eager=[4], batched_mm=[1], grouped_mm=[2], auto=[1.01]),
    ]
    sweep = {"points": [p.to_json() for p in points], "summary": sweep_summary(points)}
    text = " ".join(_diagnosis({"layer_sweep": sweep}))
    assert quoted in text
    assert ("not a wrong choice" in text) is noise_named
    assert ("1 of 2" in text) is not noise_named


@pytest.mark.parametrize(
    "pin",
    [
        True,  # bench --pin-allocator: its calibration runs under the same allocator settings
        False,  # glibc's defaults in both
    ],
)
def test_bench_calibrates_under_its_own_allocator_setting(monkeypatch, pin, tmp_path):
    from autoexperts.bench import run as bench_run

    commands = []

    def recorded(command, **kwargs):
        commands.append(command)
        return subprocess.CompletedProcess(command, 0, "")

    monkeypatch.setattr(bench_run.subprocess, "run", recorded)
    options = BenchOptions(pin_allocator=pin, progress=False)
    bench_run._calibrate(options, torch.device("cpu"), torch.float32, tmp_path)
    assert ("--pin-allocator" in commands[0]) == pin and commands[0][2:4] == ["autoexperts", "calibrate"]


@pytest.mark.parametrize(
    ("model", "label"),
    [
        ({"kind": "preset", "name": "qwen3-30b-a3b"}, "qwen3-30b-a3b"),  # a preset keeps its name
        ({"kind": "hub", "name": "Qwen/Qwen3-30B-A3B"}, "Qwen/Qwen3-30B-A3B"),  # a Hub id keeps its owner
        ({"kind": "local", "name": "/home/someone/models/olmoe-half"}, "olmoe-half"),  # not the machine's path
    ],
)
def test_reports_name_a_local_model_by_its_folder(model, label):
    assert model_label({"model": model}) == label
