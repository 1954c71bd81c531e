"""FP8 experts have their own registry in Transformers: `auto` is registered there and runs Transformers' default FP8
backend, saying so once (it calibrates unquantized kernels only)."""

import pytest
import torch

import autoexperts

fp8 = pytest.importorskip("transformers.integrations.finegrained_fp8")


def _fp8_experts(implementation: str, activation_scheme: str = "dynamic") -> torch.nn.Module:
    """An FP8 experts layer as Transformers' FP8 quantizer builds it, with float32 weights (Transformers' FP8 kernels
    need a GPU; with unquantized weights its eager loop runs plain matmuls) that are not all zero."""
    from transformers.integrations.moe import use_experts_implementation

    from tests.conftest import tiny_config

    config = tiny_config("mixtral")
    config._experts_implementation = implementation
    experts_class = use_experts_implementation(fp8.FP8Experts, experts_interface=fp8.ALL_FP8_EXPERTS_FUNCTIONS)
    experts = experts_class(config=config, block_size=(16, 16), activation_scheme=activation_scheme)
    generator = torch.Generator().manual_seed(0)
    for parameter in experts.parameters():
        parameter.data = torch.randn(parameter.shape, generator=generator) * 0.1
    return experts


def _inputs(num_tokens: int = 6):
    generator = torch.Generator().manual_seed(1)
    hidden_states = torch.randn(num_tokens, 64, generator=generator)  # (num_tokens, hidden_dim)
    top_k_index = torch.rand(num_tokens, 8, generator=generator).topk(2, dim=-1).indices  # (num_tokens, 2)
    top_k_weights = torch.rand(num_tokens, 2, generator=generator).softmax(dim=-1)  # (num_tokens, 2)
    return hidden_states, top_k_index, top_k_weights


def test_auto_runs_transformers_default_fp8_backend_and_warns_once(monkeypatch):
    calls = []

    def spy(module, hidden_states, top_k_index, top_k_weights):  # stands in for the FP8 grouped_mm (GPU kernels)
        calls.append((module, hidden_states.shape, top_k_index.shape))
        return hidden_states * 2.0

    monkeypatch.setitem(fp8.FP8ExpertsInterface._global_mapping, "grouped_mm", spy)
    autoexperts.reset()
    experts = _fp8_experts("auto")
    hidden_states, top_k_index, top_k_weights = _inputs()
    with pytest.warns(autoexperts.ProfileMissingWarning, match="FP8") as caught:
        for _ in range(3):
            output = experts(hidden_states, top_k_index, top_k_weights)
    assert len([w for w in caught if issubclass(w.category, autoexperts.ProfileMissingWarning)]) == 1
    assert "grouped_mm" in str(caught[0].message) and caught[0].filename == __file__
    assert len(calls) == 3 and calls[0][0] is experts and calls[0][1] == (6, 64)
    torch.testing.assert_close(output, hidden_states * 2.0)


@pytest.mark.filterwarnings("ignore::autoexperts.ProfileMissingWarning")
def test_auto_runs_eager_for_static_activation_scales():
    # Transformers' FP8 grouped_mm rejects static activation scales; auto runs the eager loop, which handles them.
    assert autoexperts.fp8.fp8_backend(_fp8_experts("auto", activation_scheme="static")) == "eager"
    assert autoexperts.fp8.fp8_backend(_fp8_experts("auto")) == "grouped_mm"
    inputs = _inputs()
    expected = _fp8_experts("eager", activation_scheme="static")(*inputs)
    torch.testing.assert_close(_fp8_experts("auto", activation_scheme="static")(*inputs), expected)
    assert expected.abs().max() > 0


def test_fp8_registry_keeps_its_own_backends():
    assert fp8.ALL_FP8_EXPERTS_FUNCTIONS["auto"] is autoexperts.fp8.fp8_auto_experts_forward
    assert "grouped_mm" in autoexperts.fp8.fp8_backends() and "auto" not in autoexperts.fp8.fp8_backends()
    # The unquantized registry still dispatches auto.
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    assert ALL_EXPERTS_FUNCTIONS["auto"] is autoexperts.auto_experts_forward


def test_eager_forward_under_nested_dispatch_wrappers():
    # Transformers' FP8 quantizer decorates FP8Experts once per converted layer: the wrappers nest, and the eager
    # forward is the class's own under all of them (one step down would dispatch to auto again).
    from transformers.integrations.moe import use_experts_implementation

    from autoexperts.layer import eager_forward

    class Experts(torch.nn.Module):
        def forward(self, hidden_states, top_k_index, top_k_weights):
            return hidden_states

    own_forward = Experts.forward
    for _ in range(3):
        use_experts_implementation(Experts)
    assert Experts.forward is not own_forward and eager_forward(Experts) is own_forward
