"""Calibration pieces: presets and model sources, the experts layer, peak memory on CPU, and the sweep."""

import json
import math
import os
import signal
import time
import weakref

import pytest
import torch

from autoexperts.calibration import sweep as sweep_module
from autoexperts.calibration.experts_layer import build_experts_layer, routed_inputs
from autoexperts.calibration.memory import peak_call_bytes
from autoexperts.calibration.model_source import resolve_model
from autoexperts.calibration.sweep import SweepOptions, default_token_grid, disturbed_side, run_sweep
from autoexperts.errors import UsageError
from autoexperts.layer import backend_forward, is_experts_module
from autoexperts.presets import PRESETS
from tests.conftest import TINY_CONFIGS

# (experts class, num_experts, hidden_dim, intermediate_dim, top_k) of each public model, from its config.json.
PUBLIC_SHAPES = {
    "qwen1.5-moe-a2.7b": ("Qwen2MoeExperts", 60, 2048, 1408, 4),
    "qwen3-30b-a3b": ("Qwen3MoeExperts", 128, 2048, 768, 8),
    "mixtral-8x7b": ("MixtralExperts", 8, 4096, 14336, 2),
    "olmoe-1b-7b": ("OlmoeExperts", 64, 2048, 1024, 8),
    "gpt-oss-20b": ("GptOssExperts", 32, 2880, 2880, 4),
    "deepseek-v3": ("DeepseekV3Experts", 256, 7168, 2048, 8),
    "solar-open-100b": ("SolarOpenExperts", 128, 4096, 1280, 8),
}


@pytest.mark.parametrize("preset", sorted(PUBLIC_SHAPES))
def test_public_presets_give_the_published_experts_shape(preset):
    source = resolve_model(preset)
    assert source.kind == "preset" and source.hub_id == PRESETS[preset]["hub_id"]
    layer = build_experts_layer(source.config, torch.device("meta"), torch.bfloat16)
    spec = layer.spec
    assert (spec.experts_class, spec.num_experts, spec.hidden_dim, spec.intermediate_dim, spec.top_k) == PUBLIC_SHAPES[
        preset
    ]


def test_hub_id_of_a_preset_needs_no_network():
    source = resolve_model("Qwen/Qwen3-30B-A3B")
    assert (source.kind, source.name, source.hub_id) == ("preset", "qwen3-30b-a3b", "Qwen/Qwen3-30B-A3B")


def test_model_source_from_folder_and_config_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral", **TINY_CONFIGS["mixtral"]}))
    assert resolve_model(str(tmp_path)).config.num_local_experts == 8
    assert resolve_model(str(tmp_path / "config.json")).kind == "local"


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("no-such-preset", "unknown model"),  # neither a preset nor a path
        ("./missing-folder", "unknown model"),  # a path that does not exist
    ],
)
def test_model_source_errors(model, message):
    with pytest.raises(UsageError, match=message):
        resolve_model(model)


def test_non_moe_model_is_a_usage_error():
    from transformers import AutoConfig

    config = AutoConfig.for_model(
        "llama", hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=64
    )
    with pytest.raises(UsageError, match="no experts layer"):
        build_experts_layer(config, torch.device("cpu"), torch.float32)


def test_experts_layer_is_random_and_routing_distinct():
    layer = build_experts_layer(resolve_model("small-moe").config, torch.device("cpu"), torch.float32)
    assert is_experts_module(layer.module)
    assert layer.module.gate_up_proj.std() > 0.01
    hidden_states, top_k_index, top_k_weights = routed_inputs(layer.spec, 32, torch.device("cpu"), torch.float32)
    assert hidden_states.shape == (32, layer.spec.hidden_dim) and top_k_index.dtype == torch.int64
    assert all(len(set(row.tolist())) == layer.spec.top_k for row in top_k_index)
    torch.testing.assert_close(top_k_weights.sum(-1), torch.ones(32))


def test_cpu_peak_memory_tracks_batched_mm_weight_copies():
    layer = build_experts_layer(resolve_model("small-moe").config, torch.device("cpu"), torch.float32)
    spec = layer.spec
    for num_tokens in (1, 8):
        inputs = routed_inputs(spec, num_tokens, torch.device("cpu"), torch.float32)
        fn = backend_forward("batched_mm", type(layer.module))
        peak = peak_call_bytes(lambda: fn(layer.module, *inputs), torch.device("cpu"))  # noqa: B023
        # batched_mm holds the gathered gate_up copies (tokens x top_k x 2I x H) while it gathers the down ones.
        gathered_up = num_tokens * spec.top_k * 2 * spec.intermediate_dim * spec.hidden_dim * 4
        assert gathered_up <= peak <= num_tokens * spec.top_k * spec.expert_bytes * 1.5


def test_default_token_grid_is_log_spaced():
    assert default_token_grid(16) == [1, 2, 3, 4, 6, 8, 12, 16]
    assert default_token_grid()[-1] == 4096


@pytest.fixture
def small_layer():
    return build_experts_layer(resolve_model("small-moe").config, torch.device("cpu"), torch.float32)


def _wrap_backend(monkeypatch, name, wrapper):
    """Makes the sweep run `wrapper(real_forward, *args)` for backend `name`."""
    from autoexperts.calibration import sweep

    real = sweep.backend_forward  # may already be wrapped for another backend

    def patched(backend, experts_class):
        forward = real(backend, experts_class)
        return forward if backend != name else lambda *args: wrapper(forward, *args)

    monkeypatch.setattr(sweep, "backend_forward", patched)


def test_sweep_records_failures_and_goes_on(monkeypatch, small_layer):
    allocated = []  # weak references to what each failing call held when it ran out of memory

    def out_of_memory_from_4_tokens(forward, module, hidden_states, *rest):
        if hidden_states.shape[0] >= 4:
            workspace = torch.ones(1 << 20)  # memory the failed call holds until its error is dropped
            allocated.append(weakref.ref(workspace))
            raise RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")  # simulated OOM
        return forward(module, hidden_states, *rest)

    def check_released(forward, module, hidden_states, *rest):
        assert all(ref() is None for ref in allocated), "the failed call's memory is still held"
        return forward(module, hidden_states, *rest)

    _wrap_backend(monkeypatch, "batched_mm", out_of_memory_from_4_tokens)
    _wrap_backend(monkeypatch, "grouped_mm", check_released)
    layer = small_layer
    options = SweepOptions(
        tokens=[1, 2, 4, 8],
        backends=["batched_mm", "grouped_mm"],
        seconds_per_point=0.01,
        slow_factor=float("inf"),  # timing noise on a busy machine must not stop batched_mm first
        progress=False,
    )
    results = {(m.backend, m.num_tokens): m for m in run_sweep(layer, torch.device("cpu"), torch.float32, options)}
    assert [results["batched_mm", n].status for n in (1, 2, 4, 8)] == ["ok", "ok", "oom", "skipped"]
    assert all(results["grouped_mm", n].status == "ok" for n in (1, 2, 4, 8))
    assert all(len(results["grouped_mm", n].times_ms) >= 3 for n in (1, 2, 4, 8))
    assert len(allocated) == 1  # tried once at 4 tokens, infeasible from there on


def test_sweep_skips_points_predicted_over_the_memory_limit(small_layer):
    layer = small_layer
    # batched_mm copies ~1.5 MiB of weights per token here; grouped_mm needs a few KiB.
    options = SweepOptions(
        tokens=[1, 2, 64],
        backends=["batched_mm", "grouped_mm"],
        memory_limit_bytes=16 * 2**20,
        seconds_per_point=0.01,
        progress=False,
    )
    results = {(m.backend, m.num_tokens): m for m in run_sweep(layer, torch.device("cpu"), torch.float32, options)}
    assert results["batched_mm", 64].status == "skipped" and "memory limit" in results["batched_mm", 64].error
    assert results["grouped_mm", 64].status == "ok"


def test_sweep_stops_timing_a_backend_far_slower_than_the_fastest(monkeypatch, small_layer):
    def slow(forward, *args):
        time.sleep(0.1)  # far slower than grouped_mm (under a millisecond here), even on a loaded machine
        return forward(*args)

    _wrap_backend(monkeypatch, "eager", slow)
    layer = small_layer
    # A factor of 2 keeps the margin wide: on a loaded machine grouped_mm has taken 13 ms at 8 tokens here.
    options = SweepOptions(
        tokens=[1, 2, 4, 8], backends=["eager", "grouped_mm"], seconds_per_point=0.01, progress=False, slow_factor=2.0
    )
    results = {
        (m.backend, m.num_tokens): m.status for m in run_sweep(layer, torch.device("cpu"), torch.float32, options)
    }
    assert [results["eager", n] for n in (1, 2, 4, 8)] == ["ok", "ok", "slow", "slow"]


def test_sweep_keeps_timing_a_slow_backend_whose_calls_are_cheap(monkeypatch, small_layer):
    def slow(forward, *args):
        time.sleep(0.02)  # far slower than grouped_mm, but 3 calls fit well within the point's 0.5 s
        return forward(*args)

    _wrap_backend(monkeypatch, "eager", slow)
    options = SweepOptions(
        tokens=[1, 2, 4, 8], backends=["eager", "grouped_mm"], seconds_per_point=0.5, max_repeats=3, progress=False,
        slow_factor=2.0,
    )  # fmt: skip
    results = {
        (m.backend, m.num_tokens): m.status for m in run_sweep(small_layer, torch.device("cpu"), torch.float32, options)
    }
    # A flat latency (here 20 ms at every count) may still cross a growing one: it is measured at every count.
    assert [results["eager", n] for n in (1, 2, 4, 8)] == ["ok", "ok", "ok", "ok"]


def test_ctrl_c_swallowed_by_a_finalizer_still_stops_the_sweep(monkeypatch, small_layer):
    class Doomed:
        pass

    def interrupted_in_finalizer(forward, module, hidden_states, *args):
        if hidden_states.shape[0] == 4:  # as when Ctrl-C lands in the CPU memory tracker's weakref callbacks
            weakref.finalize(Doomed(), signal.raise_signal, signal.SIGINT)  # Python prints "Exception ignored"
        return forward(module, hidden_states, *args)

    _wrap_backend(monkeypatch, "eager", interrupted_in_finalizer)
    saved = []
    options = SweepOptions(
        tokens=[1, 2, 4, 8], backends=["eager", "grouped_mm"], seconds_per_point=0.01, progress=False,
        on_point=lambda points: saved.append({m.num_tokens for m in points}),
        slow_factor=math.inf,  # eager must reach 4 tokens: a loaded machine can make it "slow" at 1 and 2
    )  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        run_sweep(small_layer, torch.device("cpu"), torch.float32, options)
    # The interrupted count is not saved (its memory bookkeeping may be cut short), the counts before it are.
    assert saved[-1] == {1, 2}
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_profile_records_the_allocator_settings_it_was_measured_under(tmp_path, monkeypatch):
    from autoexperts.calibration.run import calibrate
    from autoexperts.report import describe_profile

    # glibc reads them at start-up; on CPU they move the crossovers (README), so a calibration records them.
    for name in [n for n in os.environ if n.startswith("MALLOC_") or n == "GLIBC_TUNABLES"]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "4294967296")
    profile = calibrate(
        model="small-moe", device="cpu", tokens=[1, 4], out=tmp_path, progress=False, seconds_per_point=0.01
    )
    assert profile.metadata["device"]["allocator_settings"] == {"MALLOC_TRIM_THRESHOLD_": "4294967296"}
    assert "allocator MALLOC_TRIM_THRESHOLD_=4294967296" in describe_profile(profile, 2**30, "test")


# Interrupted calibrations: the checkpoint and --resume.

CALIBRATION = {
    "model": "small-moe",
    "device": "cpu",
    "tokens": [1, 2, 4, 8],
    "backends": ["eager", "grouped_mm"],
    "progress": False,
    "seconds_per_point": 0.01,
}


def _interrupt_at(monkeypatch, num_tokens):
    """Makes grouped_mm raise KeyboardInterrupt (as Ctrl-C would) at `num_tokens`; returns the counts it ran."""
    seen = []

    def interrupt(forward, module, hidden_states, *rest):
        seen.append(hidden_states.shape[0])
        if hidden_states.shape[0] == num_tokens:
            raise KeyboardInterrupt
        return forward(module, hidden_states, *rest)

    _wrap_backend(monkeypatch, "grouped_mm", interrupt)
    return seen


def _files(folder):
    return sorted(p.name for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def interrupted(tmp_path, monkeypatch):
    """A calibration interrupted at 4 tokens: (its error, its output folder)."""
    from autoexperts.calibration.run import calibrate
    from autoexperts.errors import CalibrationInterrupted

    with monkeypatch.context() as patch:
        _interrupt_at(patch, 4)
        with pytest.raises(CalibrationInterrupted) as caught:
            calibrate(**CALIBRATION, out=tmp_path)
    return caught.value, tmp_path


def test_interrupted_calibration_keeps_its_points_and_nothing_half_written(interrupted):
    error, out = interrupted
    assert error.checkpoint is not None and error.points == 4  # 2 backends x token counts 1 and 2
    assert _files(out) == [error.checkpoint.name]  # no profile, no temporary file
    record = json.loads(error.checkpoint.read_text())
    assert {(m["backend"], m["num_tokens"]) for m in record["measurements"]} == {
        (b, n) for b in ("eager", "grouped_mm") for n in (1, 2)
    }


def test_resume_measures_only_the_rest(interrupted, monkeypatch):
    from autoexperts.calibration.run import calibrate

    error, out = interrupted
    kept = json.loads(error.checkpoint.read_text())["measurements"]
    seen = _interrupt_at(monkeypatch, -1)  # counts the token counts grouped_mm runs at; never interrupts
    profile = calibrate(**CALIBRATION, out=out, resume=True)
    assert set(seen) == {4, 8}  # 1 and 2 come from the checkpoint
    assert not error.checkpoint.exists() and profile.metadata["sweep"]["resumed_points"] == 4
    assert [m.to_json() for m in profile.measurements if m.num_tokens <= 2] == kept
    assert {(m.num_tokens, m.status) for m in profile.measurements} == {(n, "ok") for n in (1, 2, 4, 8)}
    assert _files(out) == sorted([profile.json_path.name, profile.json_path.with_suffix(".joblib").name])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"backends": ["grouped_mm"]}, "backends"),  # other backends than the checkpoint's
        ({"seconds_per_point": 0.02, "checkpoint_torch": "0.0.1"}, "versions"),  # measured with another torch
        ({"checkpoint_text": "{not json"}, "cannot resume"),  # a damaged checkpoint
    ],
)
def test_resume_refuses_a_checkpoint_for_something_else(interrupted, change, message):
    from autoexperts.calibration.run import calibrate

    error, out = interrupted
    change = dict(change)
    if "checkpoint_torch" in change:
        record = json.loads(error.checkpoint.read_text())
        record["versions"]["torch"] = change.pop("checkpoint_torch")
        error.checkpoint.write_text(json.dumps(record))
    if "checkpoint_text" in change:
        error.checkpoint.write_text(change.pop("checkpoint_text"))
    with pytest.raises(UsageError, match=message):
        calibrate(**{**CALIBRATION, **change}, out=out, resume=True)
    assert error.checkpoint.exists()  # kept: the user decides


def test_without_resume_a_checkpoint_is_replaced(interrupted, monkeypatch):
    from autoexperts.calibration.run import calibrate

    error, out = interrupted
    seen = _interrupt_at(monkeypatch, -1)
    profile = calibrate(**CALIBRATION, out=out)
    assert set(seen) == {1, 2, 4, 8} and profile.metadata["sweep"]["resumed_points"] == 0
    assert not error.checkpoint.exists()


def test_crash_mid_sweep_keeps_the_checkpoint(tmp_path, monkeypatch):
    from autoexperts.calibration import sweep
    from autoexperts.calibration.run import calibrate

    real_inputs = sweep.routed_inputs

    def crash_at_4(spec, num_tokens, *args, **kwargs):
        if num_tokens == 4:
            raise RuntimeError("device lost")  # a crash outside any backend call
        return real_inputs(spec, num_tokens, *args, **kwargs)

    monkeypatch.setattr(sweep, "routed_inputs", crash_at_4)
    with pytest.raises(RuntimeError, match="device lost"):
        calibrate(**CALIBRATION, out=tmp_path)
    assert [name.rsplit(".", 1)[-1] for name in _files(tmp_path)] == ["checkpoint"]


@pytest.mark.parametrize(
    ("previous", "current", "token_ratio", "side"),
    [
        ({"eager": 1.0, "grouped_mm": 2.0}, {"eager": 1.4, "grouped_mm": 2.6}, 1.5, 0),  # steady growth
        ({"eager": 1.0, "grouped_mm": 2.0}, {"eager": 900.0, "grouped_mm": 300.0}, 1.5, 1),  # a stall here
        ({"eager": 900.0, "grouped_mm": 300.0}, {"eager": 1.4, "grouped_mm": 2.6}, 1.5, -1),  # a stall before
        ({"eager": 1.0, "grouped_mm": 2.0}, {"eager": 900.0, "grouped_mm": 2.1}, 1.5, 0),  # one backend alone
        ({"eager": 1.0}, {"eager": 9.0}, 8.0, 0),  # counts far apart: a real 9x is possible
        ({"eager": 1.0}, {"grouped_mm": 9.0}, 1.5, 0),  # no backend in common
    ],
)
def test_a_stalled_count_is_told_from_a_steady_one(previous, current, token_ratio, side):
    assert disturbed_side(previous, current, token_ratio) == side


@pytest.mark.parametrize("stalled", [3, 2])  # the later of two counts stalls; the earlier one does
def test_sweep_measures_a_stalled_count_again(monkeypatch, small_layer, stalled):
    measure = sweep_module._measure_point
    stalls = [1]  # the first measurement of `stalled` tokens reads 1000x slow, as when the machine pauses

    def stalling(functions, memory_functions, module, inputs, backends, device, options):
        times, peaks, failures = measure(functions, memory_functions, module, inputs, backends, device, options)
        if inputs[0].shape[0] == stalled and stalls[0]:
            stalls[0] -= 1
            times = {b: [t * 1000 + 50 for t in samples] for b, samples in times.items()}
        return times, peaks, failures

    monkeypatch.setattr(sweep_module, "_measure_point", stalling)
    options = SweepOptions(tokens=[2, 3], backends=["eager", "grouped_mm"], seconds_per_point=0.01, progress=False)
    results = run_sweep(small_layer, torch.device("cpu"), torch.float32, options)
    assert stalls == [0], "the case must stall once"
    medians = {(m.backend, m.num_tokens): m.median_ms for m in results}
    for backend in options.backends:  # measured again: no longer 1000x its neighbour
        assert medians[backend, stalled] < 20 * medians[backend, 5 - stalled]


def test_a_stalled_count_measured_again_does_not_run_a_backend_that_failed_there_again(monkeypatch, small_layer):
    measure = sweep_module._measure_point
    stalls, failed_calls = [1], []  # the first measurement of 3 tokens reads 1000x slow, as when the machine pauses

    def batched_mm_fails_at_3(forward, module, hidden_states, *rest):
        if hidden_states.shape[0] == 3:
            failed_calls.append(3)
            raise RuntimeError("simulated failure")
        return forward(module, hidden_states, *rest)

    def stalling(functions, memory_functions, module, inputs, backends, device, options):
        times, peaks, failures = measure(functions, memory_functions, module, inputs, backends, device, options)
        if inputs[0].shape[0] == 3 and stalls[0]:
            stalls[0] -= 1
            times = {b: [t * 1000 + 50 for t in samples] for b, samples in times.items()}
        return times, peaks, failures

    _wrap_backend(monkeypatch, "batched_mm", batched_mm_fails_at_3)
    monkeypatch.setattr(sweep_module, "_measure_point", stalling)
    options = SweepOptions(
        tokens=[2, 3, 4], backends=["batched_mm", "grouped_mm"], seconds_per_point=0.01, progress=False
    )
    results = {
        (m.backend, m.num_tokens): m for m in run_sweep(small_layer, torch.device("cpu"), torch.float32, options)
    }
    assert stalls == [0], "the case must stall once"
    assert failed_calls == [3]  # once, not again when the stalled count was measured again
    assert [results["batched_mm", n].status for n in (2, 3, 4)] == ["ok", "error", "skipped"]
