"""`auto` on every MoE model type of the installed Transformers: forced to each backend by synthetic profiles, it
matches `eager`. The model types are discovered from the installed Transformers (see `tests/tiny_moe.py`)."""

import functools
import time
import warnings

import pytest
import torch

import autoexperts
from autoexperts.layer import LayerSpec, is_experts_module
from tests.conftest import synthetic_profile
from tests.tiny_moe import build_tiny_model, moe_model_types

BACKENDS = ["eager", "batched_mm", "grouped_mm"]
# Tiny configs that still hold big encoders (vision/audio towers the generic rule does not shrink) are left out: the
# text backbone of the same family is its own model type and is covered.
MAX_PARAMETERS = 30_000_000
# Models whose whole forward is slow on CPU (reference kernels of linear attention or Mamba) are checked at their
# experts layers, to keep the suite fast.
SLOW_FORWARD_SECONDS = 0.5


def _curves_favouring(backend: str) -> dict:
    """Synthetic latency curves under which `backend` is the fastest at every token count."""
    return {
        name: ((lambda n: 0.01 * n) if name == backend else (lambda n: 1.0 + 0.1 * n), lambda n: 1_000 * n)
        for name in BACKENDS
    }


def _output_tensor(output) -> torch.Tensor:
    for name in ("logits", "last_hidden_state"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    return output[0]


def _model_forward(model) -> torch.Tensor:
    input_ids = torch.randint(1, 100, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return _output_tensor(model(input_ids=input_ids, use_cache=False))


def _experts_forward(model) -> torch.Tensor:
    """Every experts layer called directly with the same routed inputs (for models whose full forward needs
    non-text inputs or fails on a tiny config for reasons unrelated to the experts)."""
    outputs = []
    for index, experts in enumerate(m for m in model.modules() if is_experts_module(m)):
        spec = LayerSpec.of(experts, 2)
        generator = torch.Generator().manual_seed(index)
        hidden_states = torch.randn(10, spec.hidden_dim, generator=generator)  # (num_tokens, hidden_dim)
        top_k_index = torch.rand(10, spec.num_experts, generator=generator).topk(2, dim=-1).indices  # (10, 2)
        top_k_weights = torch.rand(10, 2, generator=generator).softmax(dim=-1)  # (10, 2)
        with torch.no_grad():
            outputs.append(experts(hidden_states, top_k_index, top_k_weights))
    return torch.cat(outputs)


@functools.cache
def _built(model_type: str):
    """The tiny model and how to run it, built once per session (or the reason it cannot be tested)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = build_tiny_model(model_type, max_parameters=MAX_PARAMETERS)
    except Exception as error:
        if "tiny config still has" in str(error):
            return None, None, f"{error} (encoders or layers the generic rule does not shrink)"
        if "Unrecognized configuration class" in str(error) and "AutoModel:" in str(error):
            return None, None, "a sub-config with no Auto model of its own (covered through its parent model type)"
        return None, None, f"the generic tiny config cannot be built: {str(error).splitlines()[0][:300]}"
    if not any(is_experts_module(m) for m in model.modules()):
        return None, None, "builds no experts layer (a vision/audio sub-model, or no MoE layer in this variant)"
    try:
        started = time.perf_counter()
        _model_forward(model)
    except Exception:
        return model, _experts_forward, None
    slow = time.perf_counter() - started > SLOW_FORWARD_SECONDS
    return model, _experts_forward if slow else _model_forward, None


def _run(model, forward, implementation):
    model.set_experts_implementation(implementation)
    return forward(model)


@pytest.mark.parametrize("model_type", moe_model_types())
def test_auto_matches_eager_on_every_moe_model(model_type, profile_dir, save):
    model, forward, reason = _built(model_type)
    if reason:
        pytest.skip(reason)
    expected = _run(model, forward, "eager")
    # A first run finds the experts specs `auto` sees (top_k included) from its decisions.
    with warnings.catch_warnings(), autoexperts.record_decisions() as decisions:
        warnings.simplefilter("ignore", autoexperts.ProfileMissingWarning)
        _run(model, forward, "auto")
    specs = {d.layer for d in decisions}
    assert specs, "auto made no decision: the experts layers did not run through it"
    for backend in BACKENDS:
        for spec in specs:
            save(synthetic_profile(spec, _curves_favouring(backend)))
        with autoexperts.record_decisions() as decisions:
            actual = _run(model, forward, "auto")
        assert {(d.backend, d.source) for d in decisions} == {(backend, "profile")}
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4, msg=f"auto -> {backend}")


def test_layouts_that_differ_are_covered():
    """The discovered models include the layouts the issue names, so the test above exercises each of them."""
    flags = set()
    for model_type in ("gpt_oss", "nemotron_h", "muse_spark_text"):
        if model_type not in moe_model_types():
            continue
        model, _, reason = _built(model_type)
        assert reason is None, f"{model_type}: {reason}"
        for experts in (m for m in model.modules() if is_experts_module(m)):
            spec = LayerSpec.of(experts, 2)
            flags.add((model_type, spec.is_transposed, spec.has_bias, spec.has_gate, spec.has_post_expert_norm))
            if model_type == "gpt_oss":
                assert experts.is_concatenated is False  # gate and up interleaved
    assert ("gpt_oss", True, True, True, False) in flags  # transposed weights, biases, interleaved gate
    assert ("nemotron_h", False, False, False, False) in flags  # no gate: up_proj and an activation
    if "muse_spark_text" in moe_model_types():  # Transformers >= 5.2x: a norm after each expert
        assert ("muse_spark_text", False, False, True, True) in flags


def _text_logits(model, input_ids) -> torch.Tensor:
    with torch.no_grad():
        return _output_tensor(model(input_ids=input_ids, use_cache=False))


def test_vision_language_model_gives_auto_to_its_text_backbone_only(profile_dir, save):
    if "qwen3_vl_moe" not in moe_model_types():
        pytest.skip("this Transformers has no qwen3_vl_moe")
    from transformers import AutoModelForImageTextToText

    from tests.tiny_moe import tiny_config

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(
        tiny_config("qwen3_vl_moe"), experts_implementation={"text_config": "auto", "vision_config": "eager"}
    ).eval()
    implementations = model.get_experts_implementation()
    assert implementations["text_config"] == "auto" and implementations[""] != "auto"
    input_ids = torch.randint(1, 100, (1, 6), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(), autoexperts.record_decisions() as decisions:
        warnings.simplefilter("ignore", autoexperts.ProfileMissingWarning)
        auto = _text_logits(model, input_ids)
    assert {d.layer.experts_class for d in decisions} == {"Qwen3VLMoeTextExperts"}
    model.set_experts_implementation({"text_config": "eager"})
    torch.testing.assert_close(auto, _text_logits(model, input_ids), rtol=1e-4, atol=1e-4)


def test_deepseek_v3_fp32_router_weights_in_bfloat16(profile_dir, save):
    """DeepSeek-V3 routes in float32: `top_k_weights` reach the experts in float32 while the hidden states are bf16."""
    if "deepseek_v3" not in moe_model_types():
        pytest.skip("this Transformers has no deepseek_v3")
    model = build_tiny_model("deepseek_v3").to(torch.bfloat16)
    weight_dtypes = []
    for experts in (m for m in model.modules() if is_experts_module(m)):
        experts.register_forward_pre_hook(lambda module, args: weight_dtypes.append((args[0].dtype, args[2].dtype)))
    expected = _run(model, _model_forward, "eager")
    assert set(weight_dtypes) == {(torch.bfloat16, torch.float32)}
    with warnings.catch_warnings(), autoexperts.record_decisions() as decisions:
        warnings.simplefilter("ignore", autoexperts.ProfileMissingWarning)
        _run(model, _model_forward, "auto")
    specs = {d.layer for d in decisions}
    for backend in BACKENDS:
        for spec in specs:
            save(synthetic_profile(spec, _curves_favouring(backend)))
        with autoexperts.record_decisions() as decisions:
            actual = _run(model, _model_forward, "auto")
        assert {d.backend for d in decisions} == {backend}
        torch.testing.assert_close(actual, expected, rtol=2e-2, atol=2e-2, msg=f"auto -> {backend}")
