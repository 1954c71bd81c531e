"""`auto` under autograd: gradients with respect to inputs and expert weights equal eager's, for each backend `auto`
may choose (forced by synthetic profiles), on CPU in float32."""

import logging
import re

import pytest
import torch
import transformers

import autoexperts
from tests.conftest import experts_modules, layer_spec, synthetic_profile, tiny_model

BACKENDS = ["eager", "batched_mm", "grouped_mm"]


def _curves_favouring(backend: str) -> dict:
    """Synthetic latency curves under which `backend` is the fastest at every token count."""
    return {
        name: ((lambda n: 0.01 * n) if name == backend else (lambda n: 1.0 + 0.1 * n), lambda n: 1_000 * n)
        for name in BACKENDS
    }


def _gradients(model, implementation: str) -> dict[str, torch.Tensor]:
    """Gradients of a fixed random projection of the logits w.r.t. the input embeddings and every experts weight."""
    model.set_experts_implementation(implementation)
    model.zero_grad(set_to_none=True)
    generator = torch.Generator().manual_seed(0)
    inputs_embeds = torch.randn(2, 7, model.config.hidden_size, generator=generator, requires_grad=True)
    logits = model(inputs_embeds=inputs_embeds).logits  # (2, 7, vocab_size)
    projection = torch.randn(logits.shape, generator=generator)
    (logits * projection).sum().backward()
    grads = {"inputs_embeds": inputs_embeds.grad}
    for index, experts in enumerate(experts_modules(model)):
        for name, parameter in experts.named_parameters():
            grads[f"experts{index}.{name}"] = parameter.grad
    return grads


@pytest.mark.parametrize(
    "model_type",
    [
        "mixtral",  # concatenated gate_up, no bias
        "gpt_oss",  # transposed weights, biases, interleaved gate
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_auto_gradients_equal_eager(model_type, backend, profile_dir, save):
    model = tiny_model(model_type).train()
    save(synthetic_profile(layer_spec(model), _curves_favouring(backend)))
    expected = _gradients(model, "eager")
    with autoexperts.record_decisions() as decisions:
        actual = _gradients(model, "auto")
    assert {(d.backend, d.source) for d in decisions} == {(backend, "profile")}
    assert expected.keys() == actual.keys()
    for name, gradient in expected.items():
        assert gradient is not None and gradient.abs().sum() > 0, name  # the gradient reached this tensor
        torch.testing.assert_close(actual[name], gradient, rtol=1e-4, atol=1e-5, msg=name)


def _compiled_gradients(model, implementation: str) -> dict[str, torch.Tensor]:
    """`_gradients` with the model's forward compiled (inductor, fullgraph)."""
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, fullgraph=True)
    try:
        return _gradients(model, implementation)
    finally:
        del model.forward  # back to the class's forward
        torch._dynamo.reset()


@pytest.mark.parametrize(
    "backend",
    [
        "batched_mm",  # a profile that picks batched_mm at these 14 tokens
        "grouped_mm",  # and one that picks grouped_mm (eager cannot run under fullgraph compilation)
    ],
)
def test_compiled_training_gradients_equal_eager(backend, profile_dir, save, caplog):
    caplog.set_level(logging.DEBUG, logger="autoexperts.dispatch")  # the table each trace uses is logged once
    model = tiny_model("qwen3_moe").train()
    for mode in ("none", "default"):
        save(synthetic_profile(layer_spec(model), _curves_favouring(backend), compile_mode=mode))
    expected = _gradients(model, "eager")
    try:
        _compiled_gradients(model, backend)
    except torch._dynamo.exc.BackendCompilerFailed as error:  # Transformers' own backend, not auto's doing
        inner = getattr(error, "inner_exception", error)
        pytest.skip(f"transformers {transformers.__version__}'s {backend} fails compiled training here: {inner!r:.200}")
    caplog.clear()
    actual = _compiled_gradients(model, "auto")
    traced = [r.getMessage() for r in caplog.records if r.getMessage().startswith("compiled (default)")]
    # The first region (up to millions of tokens) holds the 14 tokens of this call.
    first_regions = [re.search(r"\): up to \S+ tokens -> (\w+)", message).group(1) for message in traced]
    assert first_regions and set(first_regions) == {backend}, traced
    for name, gradient in expected.items():
        assert gradient is not None and gradient.abs().sum() > 0, name
        torch.testing.assert_close(actual[name], gradient, rtol=1e-4, atol=1e-5, msg=name)
