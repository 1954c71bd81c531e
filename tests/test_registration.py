"""`import autoexperts` registers "auto" with Transformers, idempotently, without touching CUDA."""

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

import autoexperts
from tests.conftest import experts_modules, tiny_config, tiny_model


def test_import_registers_auto():
    assert ALL_EXPERTS_FUNCTIONS["auto"] is autoexperts.auto_experts_forward


def test_register_is_idempotent():
    before = list(ALL_EXPERTS_FUNCTIONS.keys())
    autoexperts.register()
    autoexperts.register()
    assert list(ALL_EXPERTS_FUNCTIONS.keys()) == before
    assert ALL_EXPERTS_FUNCTIONS["auto"] is autoexperts.auto_experts_forward


def test_from_config_accepts_auto():
    model = AutoModelForCausalLM.from_config(tiny_config("qwen3_moe"), experts_implementation="auto")
    assert model.config._experts_implementation == "auto"


def test_from_pretrained_accepts_auto(tmp_path):
    tiny_model("mixtral", "eager").save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="auto")
    assert model.config._experts_implementation == "auto"


def test_set_experts_implementation_switches_to_auto_and_back(profile_dir):
    model = tiny_model("olmoe", "eager")
    model.set_experts_implementation("auto")
    assert model.get_experts_implementation()[""] == "auto"
    with autoexperts.record_decisions() as decisions, pytest.warns(autoexperts.ProfileMissingWarning):
        model(input_ids=torch.tensor([[1, 2, 3]]))
    assert len(decisions) == len(experts_modules(model))
    model.set_experts_implementation("grouped_mm")
    assert model.get_experts_implementation()[""] == "grouped_mm"


def test_unknown_implementation_still_rejected():
    with pytest.raises(ValueError, match="not supported"):
        AutoModelForCausalLM.from_config(tiny_config("qwen3_moe"), experts_implementation="autoo")


def test_import_does_not_initialise_cuda():
    code = "import torch, autoexperts; print(torch.cuda.is_initialized())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
