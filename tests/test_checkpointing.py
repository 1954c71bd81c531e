"""`auto` under gradient checkpointing: the recomputation in backward runs what the forward ran, and a framework's
control flow through an experts call (checkpoint's early stop) is never taken for a backend failure."""

import warnings

import pytest
import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

import autoexperts
from autoexperts import dispatch
from tests.conftest import experts_modules, layer_spec, synthetic_profile, tiny_model

BACKENDS = ["eager", "batched_mm", "grouped_mm"]
# Transformers 5.24 renames gradient_checkpointing_enable (5.17 has only the old name, which users still call).
pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")


def _curves_favouring(backend: str) -> dict:
    """Synthetic latency curves under which `backend` is the fastest at every token count."""
    return {
        name: ((lambda n: 0.01 * n) if name == backend else (lambda n: 1.0 + 0.1 * n), lambda n: 1_000 * n)
        for name in BACKENDS
    }


def _checkpointed(model_type: str, use_reentrant: bool):
    model = tiny_model(model_type).train()
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    return model


def _loss_and_gradients(model, implementation: str, between=lambda: None) -> dict[str, torch.Tensor]:
    """Gradients of a language-model loss w.r.t. every experts weight; `between` runs after the forward, before the
    backward (when the checkpoints recompute)."""
    model.set_experts_implementation(implementation)
    model.zero_grad(set_to_none=True)
    input_ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    loss = model(input_ids=input_ids, labels=input_ids).loss
    between()
    loss.backward()
    grads = {"loss": loss.detach()}
    for index, experts in enumerate(experts_modules(model)):
        for name, parameter in experts.named_parameters():
            grads[f"experts{index}.{name}"] = parameter.grad
    return grads


def _assert_close_gradients(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, gradient in expected.items():
        assert gradient is not None and gradient.abs().sum() > 0, name  # the gradient reached this tensor
        torch.testing.assert_close(actual[name], gradient, rtol=1e-4, atol=1e-5, msg=name)


class _Spy:
    """Wraps a backend, recording whether each call was a forward or a recomputation inside backward."""

    def __init__(self, name: str, forward):
        self.name, self.forward, self.calls = name, forward, []

    def __call__(self, module, *args):
        self.calls.append((self.name, torch._C._current_graph_task_id() != -1))
        return self.forward(module, *args)


@pytest.mark.filterwarnings("ignore::autoexperts.ProfileMissingWarning")
@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize(
    "model_type",
    [
        "qwen3_moe",  # gate_up concatenated, softmax router
        "mixtral",  # the MoE every library supports
        "olmoe",  # another router and naming
        "gpt_oss",  # transposed weights, biases, interleaved gate
    ],
)
def test_checkpointed_training_matches_eager(model_type, use_reentrant, profile_dir):
    # No profile: the fallback rule's choice (grouped_mm on CPU) is recomputed in backward.
    model = _checkpointed(model_type, use_reentrant)
    expected = _loss_and_gradients(model, "eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error", autoexperts.BackendFailedWarning)  # no failover may be involved
        actual = _loss_and_gradients(model, "auto")
    _assert_close_gradients(actual, expected)


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpointed_training_with_each_backend(backend, use_reentrant, profile_dir, save):
    model = _checkpointed("qwen3_moe", use_reentrant)
    save(synthetic_profile(layer_spec(model), _curves_favouring(backend)))
    expected = _loss_and_gradients(model, "eager")
    with autoexperts.record_decisions() as decisions:
        actual = _loss_and_gradients(model, "auto")
    _assert_close_gradients(actual, expected)
    # One decision per layer and forward: the recomputation is not a new forward and calls no hook.
    assert [(d.backend, d.source) for d in decisions] == [(backend, "profile")] * 2


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_recomputation_replays_the_forward_backend_after_the_table_changed(
    use_reentrant, profile_dir, save, monkeypatch
):
    # Between forward and backward a new profile makes grouped_mm the choice; the recomputation still runs the
    # forward's batched_mm (a non-reentrant checkpoint would otherwise find other saved tensors and fail).
    spies = {name: _Spy(name, ALL_EXPERTS_FUNCTIONS[name]) for name in ("batched_mm", "grouped_mm")}
    for name, spy in spies.items():
        monkeypatch.setitem(ALL_EXPERTS_FUNCTIONS, name, spy)
    model = _checkpointed("mixtral", use_reentrant)
    save(synthetic_profile(layer_spec(model), _curves_favouring("batched_mm")))
    expected = _loss_and_gradients(model, "eager")

    def new_profile():
        save(synthetic_profile(layer_spec(model), _curves_favouring("grouped_mm")))  # also resets auto's tables

    actual = _loss_and_gradients(model, "auto", between=new_profile)
    _assert_close_gradients(actual, expected)
    calls = spies["batched_mm"].calls + spies["grouped_mm"].calls
    assert sorted(calls) == [("batched_mm", False)] * 2 + [("batched_mm", True)] * 2  # 2 layers: forward, recompute
    spies["batched_mm"].calls.clear()
    _loss_and_gradients(model, "auto")  # the next step decides anew
    assert {name for name, _ in spies["grouped_mm"].calls} == {"grouped_mm"} and not spies["batched_mm"].calls


class _FailsAfterSaving:
    """A backend that records work for backward (saves tensors) and then raises, like a kernel rejecting a shape."""

    def __init__(self):
        self.calls = 0

    def __call__(self, module, hidden_states, top_k_index, top_k_weights):
        self.calls += 1
        (hidden_states * top_k_weights.sum()).sum()  # a node that saves tensors under checkpointing
        raise RuntimeError("flaky_mm cannot run this shape")


def test_failover_inside_a_checkpointed_forward_is_replayed(profile_dir, save, monkeypatch):
    flaky = _FailsAfterSaving()
    monkeypatch.setitem(ALL_EXPERTS_FUNCTIONS, "flaky_mm", flaky)
    model = _checkpointed("qwen3_moe", use_reentrant=False)
    curves = {**_curves_favouring("grouped_mm"), "flaky_mm": (lambda n: 0.001 * n, lambda n: 100 * n)}
    save(synthetic_profile(layer_spec(model), curves))
    expected = _loss_and_gradients(model, "eager")
    with pytest.warns(autoexperts.BackendFailedWarning, match="flaky_mm raised"):
        actual = _loss_and_gradients(model, "auto")
    _assert_close_gradients(actual, expected)
    assert flaky.calls == 2  # the first layer's forward, then its recomputation (the second layer never chose it)


def test_framework_control_flow_is_not_a_backend_failure():
    from torch.utils.checkpoint import CheckpointError

    assert dispatch.is_framework_control_flow(CheckpointError("recomputed tensors differ"))
    assert dispatch.is_framework_control_flow(KeyboardInterrupt())
    assert not dispatch.is_framework_control_flow(RuntimeError("strides should be multiple of 16 bytes"))
    assert not dispatch.is_framework_control_flow(torch.OutOfMemoryError("CUDA out of memory"))
