"""The device model: fitted on shapes, it predicts unseen ones; `auto` uses it between a profile and the fallback."""

import dataclasses
import json
import os
import random
import warnings

import numpy as np
import pytest
import torch

import autoexperts
from autoexperts import dispatch
from autoexperts.calibration.design import DESIGN_SHAPES, TRANSPOSED_BIAS, UNGATED, DesignShape, scale_to_fit, spec_of
from autoexperts.calibration.device_run import calibrate_device_model
from autoexperts.cli import main
from autoexperts.cost_model import Measurement
from autoexperts.device import device_name
from autoexperts.device_model import DeviceModel, ShapePoints
from autoexperts.device_profile import DeviceProfile, load_device_profile, save_device_profile
from autoexperts.errors import UsageError
from autoexperts.selection import device_model_table
from autoexperts.table import build_profile_table
from autoexperts.work import work_features
from tests.conftest import CROSSOVER_CURVES, layer_spec, logits_with, random_input_ids, synthetic_profile, tiny_model

BACKENDS = ["eager", "batched_mm", "grouped_mm"]
TOKENS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def _synthetic_ms(spec, backend, tokens):
    """A device whose backends cost exactly a sum of work: eager pays per expert hit, grouped_mm a fixed sort and
    per row, batched_mm per byte it gathers; all pay for FLOPs at one rate."""
    work = work_features(spec, np.asarray(tokens, dtype=np.float64))
    compute = work["flops"] / 2e7  # 20 GFLOP/s
    if backend == "eager":
        return 0.02 * work["experts_hit"] + compute
    if backend == "grouped_mm":
        return 0.08 + 2e-4 * work["rows"] + compute
    return 0.01 + work["gather_bytes"] / 2e6 + compute  # 2 GB/s


def _synthetic_shapes(specs, jitter=0.02, seed=0):
    """Each spec measured at `TOKENS` by `_synthetic_ms`, three timings each `jitter` apart, peak memory = the bytes
    gathered (batched_mm) or the activations (the others)."""
    rng = random.Random(seed)
    shapes = []
    for spec in specs:
        work = work_features(spec, np.asarray(TOKENS, dtype=np.float64))
        measurements = []
        for backend in BACKENDS:
            peaks = work["gather_bytes"] if backend == "batched_mm" else work["activation_bytes"]
            for i, (n, ms) in enumerate(zip(TOKENS, _synthetic_ms(spec, backend, TOKENS), strict=True)):
                noisy = float(ms) * (1 + rng.uniform(-jitter, jitter) / 4)
                times = (noisy * (1 - jitter), noisy, noisy * (1 + jitter))
                measurements.append(Measurement(backend, n, "ok", noisy, int(peaks[i]), times))
        shapes.append(ShapePoints(spec, tuple(measurements)))
    return shapes


def _design_specs(count=10):
    return [spec_of(scale_to_fit(s, "float32", 4 * 2**20), "float32", "cpu") for s in DESIGN_SHAPES[:count]]


# Shapes that are in no design set: a small Qwen3-MoE, an ungated one with many experts, a GPT-OSS-like one.
UNSEEN = [
    spec_of(DesignShape(8, 64, 32, 2), "float32", "cpu"),
    spec_of(DesignShape(128, 256, 64, 8, UNGATED), "float32", "cpu"),
    spec_of(DesignShape(32, 160, 160, 4, TRANSPOSED_BIAS), "float32", "cpu"),
]


def _true_choice(spec, tokens):
    times = np.stack([_synthetic_ms(spec, b, tokens) for b in BACKENDS])
    return [BACKENDS[i] for i in times.argmin(axis=0)]


@pytest.fixture(scope="module")
def synthetic_model():
    return DeviceModel.fit(_synthetic_shapes(_design_specs()), BACKENDS)


def test_leave_one_shape_out_picks_the_form_the_device_follows(synthetic_model):
    # The synthetic device is exactly additive in the work: leave-one-shape-out must find that form, and with it
    # every held-out design shape's choices cost what the oracle's do.
    assert synthetic_model.form == "additive"
    additive = next(r for r in synthetic_model.loso if r["form"] == "additive")
    assert additive["shapes"] == 10
    assert 1.0 <= additive["worst_regret"] < 1.01
    assert additive["median_abs_log_error"] < 0.02


@pytest.mark.parametrize("spec", UNSEEN, ids=["qwen3-like", "ungated-128-experts", "gpt-oss-like"])
def test_the_fitted_model_recovers_the_crossovers_of_an_unseen_shape(synthetic_model, spec):
    table = build_profile_table(spec, synthetic_model.for_spec(spec), BACKENDS, float("inf"), source="device_model")
    # Off the calibration grid and beyond it; the synthetic truth has its crossovers in this range.
    tokens = [1, 5, 7, 10, 13, 20, 27, 40, 55, 80, 111, 150, 300, 700, 3000]
    truth = _true_choice(spec, tokens)
    assert len(set(truth)) >= 2, "the case must have a crossover to recover"
    predicted = [table.region_for(n).backend for n in tokens]
    times = {b: _synthetic_ms(spec, b, tokens) for b in BACKENDS}
    cost = sum(times[b][i] for i, b in enumerate(predicted))
    oracle = sum(times[b][i] for i, b in enumerate(truth))
    # Right wherever the truth is not a near-tie, and within 2 % of the oracle in total.
    for i, n in enumerate(tokens):
        best, chosen = times[truth[i]][i], times[predicted[i]][i]
        assert chosen <= best * 1.05, f"{n} tokens: {predicted[i]} chosen, {truth[i]} is {chosen / best:.2f}x faster"
    assert cost <= oracle * 1.02
    assert {r.source for r in table.regions} == {"device_model"}


def test_held_out_folds_in_worker_processes_give_what_one_process_gives():
    # A calibration fits the folds in worker processes; the forms' results and the kept form must not depend on it.
    shapes = _synthetic_shapes(_design_specs(5), jitter=0.1, seed=3)
    one = DeviceModel.fit(shapes, BACKENDS, n_jobs=1)
    workers = DeviceModel.fit(shapes, BACKENDS, n_jobs=2)
    assert workers.loso == one.loso and workers.form == one.form
    assert {r["shapes"] for r in one.loso} == {5}


def test_relative_form_predicts_the_same_whatever_the_order_of_the_backends():
    # Every backend has as many points: the reference backend is a tie, which a refit from the JSON (backends in
    # another order) must break the same way.
    shapes = _synthetic_shapes(_design_specs(6))
    forward = DeviceModel.of_form(shapes, BACKENDS, "relative")
    backward = DeviceModel.of_form(shapes, BACKENDS[::-1], "relative")
    tokens = np.array([1, 7, 100, 5000])
    for spec in UNSEEN:
        for backend in BACKENDS:
            np.testing.assert_allclose(
                forward.latency_ms(spec, backend, tokens), backward.latency_ms(spec, backend, tokens)
            )


def test_memory_predictions_keep_the_budget(synthetic_model):
    spec = UNSEEN[0]
    gathered = work_features(spec, np.array([4.0]))["gather_bytes"][0]
    # batched_mm's predicted peak is the bytes it gathers: at this budget it fits up to 4 tokens and no further.
    budget = gathered * 1.1
    np.testing.assert_allclose(synthetic_model.peak_bytes(spec, "batched_mm", np.array([4.0])), [gathered], rtol=1e-3)
    table = build_profile_table(spec, synthetic_model.for_spec(spec), BACKENDS, budget)
    assert table.region_for(1).backend == "batched_mm"
    assert all(table.region_for(n).backend != "batched_mm" for n in (5, 8, 100, 10_000))


def test_the_default_backend_is_kept_within_the_models_own_error(synthetic_model):
    # A margin of 100 %: no predicted saving is large enough to leave the fallback rule's backend (CPU: grouped_mm).
    spec = UNSEEN[1]
    synthetic_model.fits["loso"] = [dict(r, median_abs_log_ratio_error=np.log(2.0)) for r in synthetic_model.loso]
    try:
        table = device_model_table(spec, synthetic_model.for_spec(spec), BACKENDS, float("inf"))
    finally:
        synthetic_model.fits["loso"] = [dict(r, median_abs_log_ratio_error=0.0) for r in synthetic_model.loso]
    assert [(r.backend, r.source) for r in table.regions] == [("grouped_mm", "device_model")]


def save_synthetic_device_model(folder, model=None, **metadata):
    """A synthetic device model of this CPU saved in `folder`; `metadata` replaces fields of its record."""
    shapes = _synthetic_shapes(_design_specs())
    model = model or DeviceModel.fit(shapes, BACKENDS)
    profile = DeviceProfile(
        device_name=device_name(torch.device("cpu")),
        device_type="cpu",
        dtype="float32",
        compile_mode="none",
        shapes=shapes,
        model=model,
        metadata={"created": "2026-12-03T00:00:00+00:00", "versions": {}, "sweep": {"wall_seconds": 1.0}, **metadata},
    )
    return dataclasses.replace(profile, json_path=save_device_profile(profile, folder))


@pytest.mark.parametrize(("batch", "seq"), [(1, 1), (1, 3), (2, 40)])  # decode, small prefill, larger prefill
def test_auto_uses_the_device_model_end_to_end(profile_dir, synthetic_model, batch, seq):
    save_synthetic_device_model(profile_dir, synthetic_model)
    dispatch.reset()
    model = tiny_model("qwen3_moe")
    spec = layer_spec(model)
    expected = device_model_table(spec, synthetic_model.for_spec(spec), BACKENDS, float("inf"))
    input_ids = random_input_ids(batch, seq)
    with warnings.catch_warnings(record=True) as caught, autoexperts.record_decisions() as decisions:
        warnings.simplefilter("always")
        auto = logits_with(model, input_ids, "auto")
    assert decisions and {d.source for d in decisions} == {"device_model"}
    chosen = {d.backend for d in decisions}
    assert chosen == {expected.region_for(batch * seq).backend}
    assert torch.equal(auto, logits_with(model, input_ids, chosen.pop()))
    torch.testing.assert_close(auto, logits_with(model, input_ids, "eager"), rtol=1e-4, atol=1e-5)
    messages = [str(w.message) for w in caught if issubclass(w.category, autoexperts.ProfileMissingWarning)]
    assert len(messages) == 1 and "device model" in messages[0] and "calibrate --model" in messages[0]


def test_an_exact_profile_comes_before_the_device_model(profile_dir, save, synthetic_model):
    save_synthetic_device_model(profile_dir, synthetic_model)
    model = tiny_model("qwen3_moe")
    save(synthetic_profile(layer_spec(model), CROSSOVER_CURVES))
    with autoexperts.record_decisions() as decisions, torch.no_grad():
        model(input_ids=random_input_ids(1, 20))
    assert {(d.backend, d.source) for d in decisions} == {("grouped_mm", "profile")}


@pytest.mark.parametrize(
    ("metadata", "says"),
    [
        ({"versions": {"torch": "0.0.1"}}, "torch 0.0.1"),  # measured with another torch
        # measured with glibc's thresholds pinned, used in a process with the defaults (no MALLOC_* set here)
        ({"device": {"allocator_settings": {"mallopt_mmap_threshold": "1073741824"}}}, "allocator settings"),
    ],
)
@pytest.mark.parametrize(("policy", "source"), [("use", "device_model"), ("fallback", "fallback")])
def test_a_stale_device_model_is_said_so_and_skipped_on_request(
    profile_dir, synthetic_model, monkeypatch, metadata, says, policy, source
):
    for name in [n for n in os.environ if n.startswith("MALLOC_") or n == "GLIBC_TUNABLES"]:
        monkeypatch.delenv(name)
    monkeypatch.setenv(autoexperts.settings.STALE_PROFILES_ENV, policy)
    save_synthetic_device_model(profile_dir, synthetic_model, **metadata)
    model = tiny_model("qwen3_moe")
    with (
        pytest.warns(autoexperts.StaleProfileWarning, match=says) as caught,
        autoexperts.record_decisions() as decisions,
        torch.no_grad(),
    ):
        model(input_ids=random_input_ids(1, 3))
        model(input_ids=random_input_ids(1, 3))
    assert {d.source for d in decisions} == {source}
    stale = [w for w in caught if issubclass(w.category, autoexperts.StaleProfileWarning)]
    assert len(stale) == 1 and ("skipping it" in str(stale[0].message)) == (policy == "fallback")


def test_the_memory_budget_applies_to_the_device_model(profile_dir, synthetic_model):
    save_synthetic_device_model(profile_dir, synthetic_model)
    model = tiny_model("qwen3_moe")
    spec = layer_spec(model)
    unlimited = device_model_table(spec, synthetic_model.for_spec(spec), BACKENDS, float("inf"))
    assert unlimited.region_for(1).backend == "batched_mm", "the case needs batched_mm chosen at one token"
    autoexperts.set_memory_budget("1B")  # one byte (a bare 1 would be all free memory): nothing fits
    with autoexperts.record_decisions() as decisions, torch.no_grad():
        model(input_ids=random_input_ids(1, 1))
    assert {d.source for d in decisions} == {"over_budget"}
    assert "batched_mm" not in {d.backend for d in decisions}


# Three tiny design shapes, one per layout, measured for real on this CPU up to 32 tokens.
TINY_DESIGN = (
    DesignShape(8, 64, 32, 2),
    DesignShape(16, 128, 64, 4, UNGATED),
    DesignShape(8, 64, 64, 2, TRANSPOSED_BIAS),
)


@pytest.fixture(scope="module")
def real_sweep(tmp_path_factory):
    folder = tmp_path_factory.mktemp("device-model")
    profile = calibrate_device_model(
        device="cpu", dtype="float32", out=folder, progress=False, max_tokens=32, shapes=TINY_DESIGN
    )
    return folder, profile


def test_leave_one_shape_out_on_a_small_real_sweep(real_sweep):
    folder, profile = real_sweep
    assert len(profile.shapes) == 3
    for result in profile.model.loso:
        # Every form held out each of the three shapes, and chose no better than the measured oracle. (No upper
        # bound: the sweep times a slow backend while its calls are cheap, and a form fitted on two tiny shapes may
        # pick it; on a loaded machine one form's worst case read 16x.)
        assert result["shapes"] == 3, result
        assert 1.0 <= result["median_regret"] <= result["worst_regret"] < float("inf")
    # The form kept is the one with the lowest mean held-out regret (rounded as the fit rounds it).
    best = min(round(r["mean_regret"], 4) for r in profile.model.loso)
    kept = next(r for r in profile.model.loso if r["form"] == profile.model.form)
    assert round(kept["mean_regret"], 4) == best
    record = json.loads(profile.json_path.read_text())
    assert record["kind"] == "autoexperts-device-model" and len(record["shapes"]) == 3
    assert profile.json_path.with_suffix(".joblib").is_file()
    assert not list(folder.rglob("*.checkpoint")), "a finished calibration leaves no checkpoint"


def test_a_saved_device_model_loads_with_the_same_predictions(real_sweep):
    _, profile = real_sweep
    loaded = load_device_profile(profile.json_path)
    tokens = np.array([1, 7, 100, 5000])
    for spec in UNSEEN:
        for backend in profile.model.backends:
            np.testing.assert_allclose(
                loaded.model.latency_ms(spec, backend, tokens), profile.model.latency_ms(spec, backend, tokens)
            )
    assert loaded.model.form == profile.model.form and loaded.model.margin() == profile.model.margin()


def test_show_prints_a_device_model(real_sweep, capsys):
    _, profile = real_sweep
    assert main(["show", str(profile.json_path)]) == 0
    out = capsys.readouterr().out
    assert "leave one shape out" in out and f"form          {profile.model.form}" in out
    assert out.count("grouped_mm") >= 3  # a table per design shape


def test_show_prints_a_device_models_allocator_settings_and_that_they_differ(tmp_path, monkeypatch, capsys):
    for name in [n for n in os.environ if n.startswith("MALLOC_") or n == "GLIBC_TUNABLES"]:
        monkeypatch.delenv(name)
    settings = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "4294967296"}
    profile = save_synthetic_device_model(tmp_path, device={"allocator_settings": settings})
    assert main(["show", str(profile.json_path)]) == 0
    out = capsys.readouterr().out
    assert "allocator     MALLOC_MMAP_THRESHOLD_=1073741824, MALLOC_TRIM_THRESHOLD_=4294967296" in out
    assert "STALE" in out and "(running glibc's defaults)" in out
    for name, value in settings.items():  # run under the settings it was measured with: not stale
        monkeypatch.setenv(name, value)
    assert main(["show", str(profile.json_path)]) == 0
    assert "STALE" not in capsys.readouterr().out


def test_resume_without_a_checkpoint_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="no checkpoint"):
        calibrate_device_model(device="cpu", out=tmp_path, progress=False, resume=True, shapes=TINY_DESIGN)


@pytest.mark.parametrize(
    "extra",
    [
        ["--model", "small-moe"],  # the design shapes replace the model
        ["--tokens", "1,2,4"],  # and the token grid
        ["--backends", "eager"],  # every backend is fitted
    ],
)
def test_device_model_rejects_options_it_does_not_take(extra, tmp_path, capsys):
    assert main(["calibrate", "--device-model", "--out", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device-model" in err[0] and extra[0] in err[0]
    assert not list(tmp_path.iterdir()), "nothing is written"
