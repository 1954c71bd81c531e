"""A model that ran `auto` saves, copies and reloads like one that ran a fixed backend, and the copy decides again."""

import copy
import io
import pickle

import pytest
import torch

import autoexperts
from tests.conftest import layer_spec, logits_with, random_input_ids, synthetic_profile, tiny_model

BACKENDS = ["eager", "batched_mm", "grouped_mm"]


def _curves_favouring(backend: str) -> dict:
    return {
        name: ((lambda n: 0.01 * n) if name == backend else (lambda n: 1.0 + 0.1 * n), lambda n: 1_000 * n)
        for name in BACKENDS
    }


def _torch_save_load(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


COPIES = {
    "torch.save": _torch_save_load,
    "copy.deepcopy": copy.deepcopy,
    "pickle": lambda model: pickle.loads(pickle.dumps(model)),
}


@pytest.mark.parametrize("how", sorted(COPIES))
@pytest.mark.parametrize(
    "backend",
    [
        "eager",  # the class's own forward, a function pickle cannot name: the reported failure
        "grouped_mm",  # a registered function
    ],
)
def test_a_model_that_ran_auto_copies_and_decides_again(how, backend, profile_dir, save):
    model = tiny_model("qwen3_moe")
    save(synthetic_profile(layer_spec(model), _curves_favouring(backend)))
    input_ids = random_input_ids(2, 5)
    with autoexperts.record_decisions() as decisions:
        before = logits_with(model, input_ids, "auto")
    assert {d.backend for d in decisions} == {backend}

    copied = COPIES[how](model)

    assert copied is not model
    with autoexperts.record_decisions() as decisions:
        after = logits_with(copied, input_ids, "auto")
    assert [(d.backend, d.source) for d in decisions] == [(backend, "profile")] * 2  # both layers, decided again
    assert torch.equal(after, before)
    assert torch.equal(logits_with(model, input_ids, "auto"), before)  # the original still runs as before


def test_save_pretrained_and_reload_with_auto(profile_dir, save, tmp_path):
    model = tiny_model("mixtral")
    save(synthetic_profile(layer_spec(model), _curves_favouring("eager")))
    input_ids = random_input_ids(1, 6)
    before = logits_with(model, input_ids, "auto")
    model.save_pretrained(tmp_path / "checkpoint")
    reloaded = type(model).from_pretrained(tmp_path / "checkpoint", experts_implementation="auto").eval()
    with autoexperts.record_decisions() as decisions:
        after = logits_with(reloaded, input_ids, "auto")
    assert {(d.backend, d.source) for d in decisions} == {("eager", "profile")}
    assert torch.equal(after, before)
