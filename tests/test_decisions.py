"""Seeing decisions: hooks, record_decisions, the autoexperts logger and AUTOEXPERTS_LOG."""

import logging
import os
import subprocess
import sys

import pytest
import torch

import autoexperts
from tests.conftest import CROSSOVER_CURVES, experts_modules, layer_spec, synthetic_profile, tiny_model


@pytest.fixture
def steered_model(profile_dir, save):
    model = tiny_model("qwen3_moe")
    save(synthetic_profile(layer_spec(model), CROSSOVER_CURVES))
    return model


def _run(model, seq):
    with torch.no_grad():
        model(input_ids=torch.arange(seq).unsqueeze(0) % 128)


def test_hook_sees_every_dispatch_until_removed(steered_model):
    seen = []
    handle = autoexperts.add_dispatch_hook(seen.append)
    _run(steered_model, 3)
    _run(steered_model, 3)
    handle.remove()
    _run(steered_model, 3)
    layers = len(experts_modules(steered_model))
    assert len(seen) == 2 * layers
    assert all(isinstance(d, autoexperts.Decision) for d in seen)
    assert {(d.backend, d.num_tokens, d.source) for d in seen} == {("batched_mm", 3, "profile")}
    handle.remove()  # removing twice is harmless


def test_same_function_added_twice_is_called_twice(steered_model):
    calls = []
    first = autoexperts.add_dispatch_hook(calls.append)
    second = autoexperts.add_dispatch_hook(calls.append)
    _run(steered_model, 2)
    first.remove()
    _run(steered_model, 2)
    second.remove()
    layers = len(experts_modules(steered_model))
    assert len(calls) == 3 * layers


def test_hook_rejects_non_callable():
    with pytest.raises(TypeError, match="callable"):
        autoexperts.add_dispatch_hook("not a function")


def test_record_decisions_collects_in_order(steered_model):
    with autoexperts.record_decisions() as decisions:
        _run(steered_model, 2)
        _run(steered_model, 20)
    layers = len(experts_modules(steered_model))
    assert [d.num_tokens for d in decisions] == [2] * layers + [20] * layers
    assert [d.backend for d in decisions] == ["batched_mm"] * layers + ["grouped_mm"] * layers
    assert decisions[0].layer.experts_class == "Qwen3MoeExperts"
    _run(steered_model, 2)
    assert len(decisions) == 2 * layers  # nothing recorded after the block


def test_decision_summary_is_one_readable_line(steered_model):
    with autoexperts.record_decisions() as decisions:
        _run(steered_model, 5)
    text = decisions[0].summary()
    assert "\n" not in text
    assert "num_tokens=5 -> batched_mm [profile]" in text and "grouped_mm" in text


def test_one_debug_record_per_new_decision(steered_model, caplog):
    with caplog.at_level(logging.DEBUG, logger="autoexperts"):
        for seq in (3, 3, 3, 30, 30):
            _run(steered_model, seq)
    dispatch_records = [r for r in caplog.records if r.name == "autoexperts.dispatch"]
    debug = [r for r in dispatch_records if r.levelno == logging.DEBUG]
    # Two layers share one spec, so one record per new token count.
    assert [r.getMessage().split("num_tokens=")[1].split()[0] for r in debug] == ["3", "30"]
    assert [r for r in dispatch_records if r.levelno >= logging.INFO and "num_tokens" in r.getMessage()] == []


def test_package_logger_has_null_handler():
    handlers = logging.getLogger("autoexperts").handlers
    assert any(isinstance(h, logging.NullHandler) for h in handlers)


@pytest.mark.slow
@pytest.mark.parametrize(
    "setup",
    [
        "",  # no logging configured by the application
        "import logging; logging.basicConfig(level=logging.DEBUG)",  # a root handler too (as the CLI sets one up)
    ],
)
def test_autoexperts_log_prints_each_new_decision_once(tmp_path, setup):
    code = (
        setup
        + """
import torch
from tests.conftest import tiny_model
model = tiny_model("mixtral")
with torch.no_grad():
    for seq in (4, 4, 9):
        model(input_ids=torch.zeros(1, seq, dtype=torch.long))
"""
    )
    env = {**os.environ, "AUTOEXPERTS_LOG": "1", "AUTOEXPERTS_PROFILE_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    printed = [line for line in result.stderr.splitlines() if "num_tokens=" in line]
    assert all(line.startswith("[autoexperts]") for line in printed), printed
    assert [line.split("num_tokens=")[1].split()[0] for line in printed] == ["4", "9"]
    assert all("-> grouped_mm [fallback]" in line for line in printed)
