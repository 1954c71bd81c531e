"""Backends that cannot run a layer's shape here are known before any call: no failed call, no warning, and the
decision says why. The case: torch's grouped GEMM needs 16-byte row strides on some builds (torch 2.15 on CPU)."""

import warnings

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import autoexperts
from autoexperts import capabilities
from autoexperts.layer import LayerSpec
from tests.conftest import TINY_CONFIGS, layer_spec, logits_with, random_input_ids, synthetic_profile

NEEDS_ALIGNMENT = capabilities._probe_grouped_mm("cpu", "float32") == "needs aligned strides"


def _spec(hidden_dim: int, intermediate_dim: int, dtype: str) -> LayerSpec:
    return LayerSpec("Qwen3MoeExperts", 8, hidden_dim, intermediate_dim, 2, True, False, False, False, dtype, "cpu")


@pytest.mark.parametrize(
    ("hidden_dim", "intermediate_dim", "dtype", "misaligned"),
    [
        (37, 32, "float32", "hidden_dim 37 × 4 bytes"),  # an odd hidden size
        (12, 32, "bfloat16", "hidden_dim 12 × 2 bytes"),  # 24-byte rows in a 2-byte dtype
        (64, 12, "float16", "intermediate_dim 12 × 2 bytes"),  # the intermediate side
        (12, 32, "float32", None),  # 48-byte rows are aligned
        (2048, 768, "bfloat16", None),  # a real model's shape
    ],
)
def test_grouped_mm_limit_follows_the_row_strides(hidden_dim, intermediate_dim, dtype, misaligned, monkeypatch):
    monkeypatch.setattr(capabilities, "_probe_grouped_mm", lambda device_type, dtype: "needs aligned strides")
    unrunnable = capabilities.unrunnable_backends(_spec(hidden_dim, intermediate_dim, dtype))
    if misaligned is None:
        assert unrunnable == {}
    else:
        assert list(unrunnable) == ["grouped_mm"] and misaligned in unrunnable["grouped_mm"]


def test_without_the_limit_every_backend_runs(monkeypatch):
    monkeypatch.setattr(capabilities, "_probe_grouped_mm", lambda device_type, dtype: "runs")
    assert capabilities.unrunnable_backends(_spec(37, 32, "float32")) == {}


def test_probe_agrees_with_a_real_grouped_mm_call():
    # The probe's verdict on this torch build, checked against Transformers' grouped_mm on a misaligned layer.
    from transformers.integrations.moe import grouped_mm_experts_forward

    model = _odd_model()
    experts = next(m for m in model.modules() if hasattr(m, "gate_up_proj"))
    hidden_states = torch.randn(5, 37)
    top_k_index = torch.randint(0, 8, (5, 2))
    try:
        grouped_mm_experts_forward(experts, hidden_states, top_k_index, torch.rand(5, 2))
        ran = True
    except RuntimeError:
        ran = False
    assert ran == (not NEEDS_ALIGNMENT)


def _odd_model():
    """A tiny Qwen3-MoE whose hidden size, 37, gives rows of 148 bytes in float32 (no multiple of 16)."""
    config = AutoConfig.for_model("qwen3_moe", **{**TINY_CONFIGS["qwen3_moe"], "hidden_size": 37})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, experts_implementation="auto")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" not in name:
                parameter.normal_(0.0, 0.1)
    return model.eval()


@pytest.mark.parametrize(
    "with_profile",
    [
        False,  # the fallback rule (grouped_mm on CPU) must know it cannot run grouped_mm here
        True,  # a profile that predicts grouped_mm fastest everywhere
    ],
)
def test_odd_hidden_size_runs_without_a_failed_call(with_profile, profile_dir, save):
    model = _odd_model()
    if with_profile:
        curves = {
            "grouped_mm": (lambda n: 0.01 * n, lambda n: 1_000 * n),
            "batched_mm": (lambda n: 2.0 + 0.1 * n, lambda n: 1_000 * n),
            "eager": (lambda n: 1.0 + 0.1 * n, lambda n: 1_000 * n),
        }
        save(synthetic_profile(layer_spec(model), curves))
    input_ids = random_input_ids(2, 7)
    expected = logits_with(model, input_ids, "eager")
    with warnings.catch_warnings(record=True) as caught, autoexperts.record_decisions() as decisions:
        warnings.simplefilter("always")
        auto = logits_with(model, input_ids, "auto")
    assert not [w for w in caught if issubclass(w.category, autoexperts.BackendFailedWarning)]
    assert {d.source for d in decisions} == {"profile" if with_profile else "fallback"}
    if NEEDS_ALIGNMENT:
        assert {d.backend for d in decisions} == {"eager"}
        assert all("16 bytes" in d.reason and "hidden_dim 37" in d.reason for d in decisions)
        assert "16 bytes" in decisions[0].summary()
    torch.testing.assert_close(auto, expected, rtol=1e-4, atol=1e-5)


def test_calibration_leaves_out_what_cannot_run_the_shape(tmp_path, monkeypatch, caplog):
    from autoexperts.calibration.run import calibrate

    monkeypatch.setattr(capabilities, "_probe_grouped_mm", lambda device_type, dtype: "needs aligned strides")
    folder = tmp_path / "odd"
    _odd_model().config.save_pretrained(folder)
    with caplog.at_level("WARNING", logger="autoexperts"):
        profile = calibrate(
            model=str(folder),
            device="cpu",
            tokens=[1, 3],
            out=tmp_path / "profiles",
            progress=False,
            seconds_per_point=0.01,
        )
    assert {m.backend for m in profile.measurements} == {"eager", "batched_mm"}  # no failed grouped_mm point
    assert all(m.status == "ok" for m in profile.measurements)
    assert profile.metadata["sweep"]["backends"] == ["eager", "batched_mm"]
    assert any("not measuring grouped_mm" in r.getMessage() and "16 bytes" in r.getMessage() for r in caplog.records)
