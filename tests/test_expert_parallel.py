"""Expert parallelism: an experts layer holding only its rank's experts gets sentinel ids (>= its `num_experts`, with
zero weight) for the other ranks' experts. `auto` delegates to Transformers' backend functions, which handle them."""

import pytest
import torch

import autoexperts
from autoexperts.layer import LayerSpec, backend_forward
from tests.conftest import experts_modules, synthetic_profile, tiny_model

BACKENDS = ["eager", "batched_mm", "grouped_mm"]
LOCAL_EXPERTS = 4  # of the tiny models' 8: this "rank" holds experts 0..3


def _curves_favouring(backend: str) -> dict:
    return {
        name: ((lambda n: 0.01 * n) if name == backend else (lambda n: 1.0 + 0.1 * n), lambda n: 1_000 * n)
        for name in BACKENDS
    }


def _local_experts(model_type: str) -> torch.nn.Module:
    """The model's first experts layer cut to `LOCAL_EXPERTS` experts and flagged expert-parallel, as Transformers'
    expert-parallel sharding leaves it."""
    experts = experts_modules(tiny_model(model_type))[0]
    with torch.no_grad():
        for name, parameter in list(experts.named_parameters()):
            if parameter.dim() >= 2 and parameter.shape[0] == experts.num_experts:
                setattr(experts, name, torch.nn.Parameter(parameter[:LOCAL_EXPERTS].clone()))
    experts.num_experts = LOCAL_EXPERTS
    experts._is_expert_parallel = True
    return experts


def _routed_with_sentinels(hidden_dim: int, num_tokens: int = 12):
    generator = torch.Generator().manual_seed(num_tokens)
    hidden_states = torch.randn(num_tokens, hidden_dim, generator=generator)  # (num_tokens, hidden_dim)
    global_index = torch.rand(num_tokens, 8, generator=generator).topk(2, dim=-1).indices  # (num_tokens, 2), ids 0..7
    is_remote = global_index >= LOCAL_EXPERTS
    top_k_index = global_index.masked_fill(is_remote, LOCAL_EXPERTS)  # remote experts -> the sentinel id
    top_k_weights = torch.rand(num_tokens, 2, generator=generator).masked_fill(is_remote, 0.0)  # zero at sentinels
    assert is_remote.any() and (~is_remote).any()
    return hidden_states, top_k_index, top_k_weights, is_remote


def _outcome(call):
    """The tensor `call()` returns, or the type and message of what it raises."""
    try:
        return call()
    except Exception as error:
        return type(error), str(error)


@pytest.mark.parametrize(
    "model_type",
    [
        "mixtral",  # concatenated gate_up
        "gpt_oss",  # transposed weights with biases
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_auto_equals_chosen_backend_with_sentinel_ids(model_type, backend, profile_dir, save):
    experts = _local_experts(model_type)
    experts.config._experts_implementation_internal = "auto"
    spec = LayerSpec.of(experts, 2)
    save(synthetic_profile(spec, _curves_favouring(backend)))
    hidden_states, top_k_index, top_k_weights, is_remote = _routed_with_sentinels(spec.hidden_dim)
    with autoexperts.record_decisions() as decisions, torch.no_grad():
        auto = _outcome(lambda: experts(hidden_states, top_k_index, top_k_weights))
        chosen = _outcome(
            lambda: backend_forward(backend, type(experts))(experts, hidden_states, top_k_index, top_k_weights)
        )
    if isinstance(chosen, torch.Tensor):
        assert {d.backend for d in decisions} == {backend}
    else:
        # Some eager forwards (GPT-OSS; Mixtral before Transformers 5.2x) reject sentinel ids: auto's runtime
        # failover runs the same call on the next candidate, whose result must then be exact.
        assert backend == "eager" and decisions[0].backend == "eager"
        (replacement,) = [d for d in decisions if d.source == "runtime_fallback"]
        chosen = backend_forward(replacement.backend, type(experts))(experts, hidden_states, top_k_index, top_k_weights)
    assert torch.equal(auto, chosen)
    # The sentinel slots add nothing: the same as routing them to a local expert with zero weight.
    with torch.no_grad():
        local_only = backend_forward("eager", type(experts))(
            experts, hidden_states, top_k_index.masked_fill(is_remote, 0), top_k_weights
        )
    torch.testing.assert_close(auto, local_only, rtol=1e-5, atol=1e-6)
