"""`auto` through `generate()`: Transformers' decode-time switch (grouped_mm -> batched_mm on non-CPU devices) leaves
it alone, every decode step is dispatched by `auto`, and `auto` is still in place afterwards."""

import contextlib

import pytest
import torch

import autoexperts
from tests.conftest import CROSSOVER_CURVES, experts_modules, layer_spec, synthetic_profile, tiny_model

SETTINGS = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}


@pytest.fixture
def decode_switch_on_cpu(monkeypatch):
    """Makes generate()'s decode-time switch act as on a GPU: it only reads `model.device` when it starts."""
    from transformers.generation.utils import GenerationMixin

    original = GenerationMixin._optimize_model_for_decode

    @contextlib.contextmanager
    def as_if_on_cuda(self):
        manager = original(self)
        with monkeypatch.context() as patch:
            patch.setattr(type(self), "device", property(lambda module: torch.device("cuda")))
            manager.__enter__()
        try:
            yield
        finally:
            manager.__exit__(None, None, None)

    monkeypatch.setattr(GenerationMixin, "_optimize_model_for_decode", as_if_on_cuda)


def _implementations_seen(model) -> list[str]:
    """The experts implementation each experts call ran with, collected by forward pre-hooks."""
    seen = []
    for experts in experts_modules(model):
        experts.register_forward_pre_hook(lambda module, args: seen.append(module.config._experts_implementation))
    return seen


def _input_ids():
    return torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))


def test_decode_switch_rewrites_grouped_mm(decode_switch_on_cpu):
    """The control: with the switch active, a grouped_mm model decodes with batched_mm (so the fixture works)."""
    model = tiny_model("qwen3_moe", "grouped_mm")
    seen = _implementations_seen(model)
    model.generate(_input_ids(), **SETTINGS)
    assert "batched_mm" in seen
    assert model.get_experts_implementation()[""] == "grouped_mm"  # restored afterwards


def test_decode_switch_leaves_auto_alone(decode_switch_on_cpu, profile_dir, save):
    model = tiny_model("qwen3_moe")
    save(synthetic_profile(layer_spec(model), CROSSOVER_CURVES))
    seen = _implementations_seen(model)
    with autoexperts.record_decisions() as decisions:
        model.generate(_input_ids(), **SETTINGS)
    assert set(seen) == {"auto"}
    assert model.get_experts_implementation()[""] == "auto"
    layers = len(experts_modules(model))
    # One prefill of 2 x 6 tokens, then max_new_tokens - 1 decode steps of 2 tokens, each through every layer.
    assert [d.num_tokens for d in decisions] == [12] * layers + [2] * layers * (SETTINGS["max_new_tokens"] - 1)
    assert [d.backend for d in decisions[layers:]] == ["batched_mm"] * layers * (SETTINGS["max_new_tokens"] - 1)
