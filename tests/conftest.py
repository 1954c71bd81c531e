"""Shared fixtures: an isolated profile folder, tiny MoE models built with `from_config`, synthetic profiles."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import autoexperts
from autoexperts import dispatch
from autoexperts.cost_model import CostModel, Measurement
from autoexperts.device import device_name
from autoexperts.layer import LayerSpec, is_experts_module
from autoexperts.profile import Profile, save_profile

REPOSITORY = Path(__file__).resolve().parent.parent
# What `import autoexperts`, the command's help and its argument errors must not load.
HEAVY_MODULES = ("torch", "transformers", "sklearn", "joblib")


def load_script(name: str):
    """A script of the repository's `calibrate/` folder (outside the package), imported as a module; its imports of
    sibling scripts resolve as they do for `python calibrate/<name>.py`."""
    folder = str(REPOSITORY / "calibrate")
    spec = importlib.util.spec_from_file_location(f"calibrate_{name}", Path(folder) / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
    return module


# Tiny configs of the MoE families the tests cover; every dimension is a multiple of 8 (CPU grouped_mm needs
# 16-byte aligned strides).
_COMMON = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
}
TINY_CONFIGS = {
    "mixtral": {**_COMMON, "intermediate_size": 32, "num_local_experts": 8, "num_experts_per_tok": 2},
    "qwen3_moe": {
        **_COMMON,
        "head_dim": 16,
        "intermediate_size": 64,
        "moe_intermediate_size": 32,
        "num_experts": 8,
        "num_experts_per_tok": 2,
    },
    "olmoe": {**_COMMON, "intermediate_size": 32, "num_experts": 8, "num_experts_per_tok": 2},
    "gpt_oss": {
        **_COMMON,
        "head_dim": 16,
        "intermediate_size": 32,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "layer_types": ["sliding_attention", "full_attention"],
    },
}


def tiny_config(model_type: str):
    return AutoConfig.for_model(model_type, **TINY_CONFIGS[model_type])


def tiny_model(model_type: str, experts_implementation: str = "auto", dtype=torch.float32, seed: int = 0):
    """A tiny random model of `model_type` with non-trivial weights (the default init leaves some at zero)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type), experts_implementation=experts_implementation)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" not in name:
                parameter.normal_(0.0, 0.1)
    return model.to(dtype).eval()


def random_input_ids(batch: int, seq: int) -> torch.Tensor:
    """Token ids for the tiny models, a fixed draw per shape."""
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(batch * 100 + seq))


def logits_with(model: torch.nn.Module, input_ids: torch.Tensor, implementation: str) -> torch.Tensor:
    """The model's logits with `implementation` as its experts backend."""
    model.set_experts_implementation(implementation)
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def rewrite_record(json_path, **changes) -> None:
    """Edits a profile JSON in place; `a__b=value` sets `record["a"]["b"]`."""
    record = json.loads(json_path.read_text())
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        target = record
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    json_path.write_text(json.dumps(record))


def experts_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if is_experts_module(m)]


def layer_spec(model: torch.nn.Module) -> LayerSpec:
    return LayerSpec.of(experts_modules(model)[0], model.config.num_experts_per_tok)


def synthetic_profile(
    spec: LayerSpec, curves: dict, tokens=(1, 2, 4, 8, 16, 32, 64, 128), compile_mode: str = "none"
) -> Profile:
    """A profile for `spec` on this CPU whose measurements follow `curves[backend] = (ms(n), bytes(n))`."""
    measurements = [
        Measurement(backend, n, "ok", float(ms(n)), int(mem(n)), (float(ms(n)),))
        for backend, (ms, mem) in curves.items()
        for n in tokens
    ]
    return Profile(
        spec=spec,
        device_name=device_name(torch.device(spec.device_type)),
        compile_mode=compile_mode,
        measurements=measurements,
        metadata={"versions": {}, "sweep": {"tokens": list(tokens)}},
        cost_model=CostModel.fit(measurements),
    )


# A crossover at 8 tokens: batched_mm is cheaper below, grouped_mm above; eager is never the fastest.
CROSSOVER_CURVES = {
    "batched_mm": (lambda n: 0.1 * n, lambda n: 1_000_000 * n),
    "grouped_mm": (lambda n: 0.8 + 0.001 * n, lambda n: 1_000 * n),
    "eager": (lambda n: 5.0 + 0.1 * n, lambda n: 500 * n),
}


@pytest.fixture
def profile_dir(tmp_path, monkeypatch):
    """An empty profile folder that `auto` reads (and calibrate writes); decision tables start afresh."""
    folder = tmp_path / "profiles"
    monkeypatch.setenv("AUTOEXPERTS_PROFILE_DIR", str(folder))
    monkeypatch.setattr(autoexperts.settings, "shipped_profile_dir", lambda: tmp_path / "no-shipped-profiles")
    autoexperts.set_memory_budget(None)
    autoexperts.reset()
    yield folder
    autoexperts.set_memory_budget(None)
    autoexperts.reset()


@pytest.fixture
def save(profile_dir):
    """Saves a profile into the isolated folder and makes `auto` look again."""

    def _save(profile: Profile):
        path = save_profile(profile, profile_dir)
        dispatch.reset()
        return path

    return _save


def replace_spec(spec: LayerSpec, **changes) -> LayerSpec:
    return dataclasses.replace(spec, **changes)


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` skip themselves on machines without a CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def run_in_fresh_python(code: str) -> dict:
    """Runs `code` in a fresh interpreter of this checkout and returns the JSON it printed last."""
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPOSITORY, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def cli_in_fresh_python(args: list[str], before: str = "") -> dict:
    """`autoexperts.cli.main(args)` in a fresh interpreter (after the statements `before`): its exit status, its
    stdout and stderr, and which of `HEAVY_MODULES` it loaded."""
    code = f"""
import contextlib, io, json, sys
{before}
import autoexperts.cli
out, err = io.StringIO(), io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
        status = autoexperts.cli.main({args!r})
    except SystemExit as exit_:
        status = exit_.code
heavy = sorted(name for name in {HEAVY_MODULES!r} if name in sys.modules)
print(json.dumps({{"status": status, "heavy": heavy, "out": out.getvalue(), "err": err.getvalue()}}))
"""
    return run_in_fresh_python(code)


@pytest.fixture
def tiny_model_folder(tmp_path):
    """A folder holding a tiny Qwen3-MoE config, as `--model` takes it."""
    folder = tmp_path / "tiny-qwen3-moe"
    tiny_config("qwen3_moe").save_pretrained(folder)
    return folder
