"""`autoexperts.tune`: calibrating a model's own experts layers on its own warm-up, in place."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

import autoexperts
from autoexperts.calibration.sweep import default_token_grid
from autoexperts.errors import CalibrationInterrupted
from autoexperts.tuning import MAX_SEEN_COUNTS, MIN_MAX_TOKENS, tuning_tokens
from tests.conftest import TINY_CONFIGS, experts_modules, tiny_model

FAST = {"seconds_per_point": 0.005}
BATCH, PROMPT = 2, 9  # a 2 x 9 prefill: 18 tokens, a count off the default grid


def _prompt() -> torch.Tensor:
    return torch.randint(1, 100, (BATCH, PROMPT), generator=torch.Generator().manual_seed(3))


def _generate(model, new_tokens: int = 3) -> torch.Tensor:
    return model.generate(_prompt(), max_new_tokens=new_tokens, do_sample=False)


@pytest.fixture
def model(profile_dir):
    return tiny_model("qwen3_moe")


@pytest.mark.parametrize(
    ("calls", "expected"),
    [
        # decode steps only: the grid up to MIN_MAX_TOKENS
        ({1: 40}, [n for n in default_token_grid() if n <= MIN_MAX_TOKENS]),
        # a 100-token prefill: the grid up to the first count reaching 200 (256), and 100 itself
        ({100: 2, 2: 20}, sorted([n for n in default_token_grid() if n <= 256] + [100])),
        # a count on the grid adds nothing
        ({48: 3}, [n for n in default_token_grid() if n <= 96]),
    ],
)
def test_recorded_counts_choose_the_measured_counts(calls, expected):
    assert tuning_tokens(calls) == expected


def test_only_the_most_frequent_counts_off_the_grid_are_added():
    calls = {n: n for n in range(100, 120)}  # 20 counts off the grid, 119 the most frequent
    tokens = tuning_tokens(calls)
    extra = sorted(set(tokens) - set(default_token_grid(1024)))
    assert extra == list(range(120 - MAX_SEEN_COUNTS, 120))
    assert max(tokens) == 256  # the first grid count reaching 2 x 119


def test_tune_measures_the_warm_up_and_auto_uses_the_profile_at_once(model, profile_dir):
    with autoexperts.tune(model, **FAST) as report:
        _generate(model)
        assert report.layers == []  # filled when the block ends
    (layer,) = report.layers  # both decoder layers share one spec
    assert layer.layers == [name for name, m in model.named_modules() if m in experts_modules(model)]
    assert layer.calls_by_tokens == {BATCH * PROMPT: 2, BATCH: 4}  # a prefill and two decode steps, per layer
    planned = tuning_tokens(layer.calls_by_tokens)
    refined = set(layer.tokens_measured) - set(planned)  # counts inside a crossover's grid step, measured again
    assert set(planned) <= set(layer.tokens_measured) and all(planned[0] < n < planned[-1] for n in refined)
    assert BATCH * PROMPT in layer.tokens_measured  # off the grid, measured because the block ran it
    assert layer.profile.is_file() and layer.profile.is_relative_to(profile_dir)
    assert layer.regions[0].first == 1 and math.isinf(layer.regions[-1].last)

    with autoexperts.record_decisions() as decisions:
        _generate(model)
    assert decisions and {d.source for d in decisions} <= {"profile", "over_budget"}
    assert {d.profile for d in decisions} == {str(layer.profile)}
    sweep = json.loads(layer.profile.read_text())["sweep"]
    assert sweep["routing"]["kind"] == "captured" and sweep["routing"]["source"] == "autoexperts.tune, in place"
    assert "refined" in sweep  # its crossovers placed as calibrate's are


def test_an_exception_in_the_block_measures_and_writes_nothing(model, profile_dir):
    with pytest.raises(RuntimeError, match="user code failed"), autoexperts.tune(model, **FAST) as report:
        _generate(model)
        raise RuntimeError("user code failed")
    assert report.layers == []
    assert not any(path.is_file() for path in profile_dir.rglob("*"))
    assert all(not m._forward_pre_hooks for m in experts_modules(model))  # the recording hooks are gone


class _LargestAllocation(TorchDispatchMode):
    """The largest new storage (bytes) any ATen op returns while active: views of their inputs (a transpose, also
    under inference mode, where views are not tracked as such) are left out."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        existing = {tensor.untyped_storage().data_ptr() for tensor in inputs}
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in existing:
                self.largest = max(self.largest, tensor.untyped_storage().nbytes())
        return out


def test_tuning_measures_the_real_weights_without_copying_them(profile_dir):
    # Experts of 4 MiB a matrix: far above any transient of tuning (the routing fit's draw is 1 MiB) but a copy.
    config = {**TINY_CONFIGS["qwen3_moe"], "hidden_size": 512, "moe_intermediate_size": 256, "head_dim": 128}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen3_moe", **config), experts_implementation="auto")
    experts = experts_modules(model)
    before = {
        (i, n): (p.data_ptr(), p.detach().clone()) for i, m in enumerate(experts) for n, p in m.named_parameters()
    }
    weight_bytes = min(p.numel() * p.element_size() for m in experts for p in m.parameters() if p.dim() == 3)
    # batched_mm copies one expert per (token, slot) by design: that transient is the backend's, not tuning's.
    tuning = autoexperts.tune(model, backends=["eager", "grouped_mm"], **FAST)
    tuning.__enter__()
    _generate(model)
    watch = _LargestAllocation()
    with watch:
        tuning.__exit__(None, None, None)
    assert 0 < watch.largest < weight_bytes
    for (i, name), (pointer, values) in before.items():
        parameter = dict(experts[i].named_parameters())[name]
        assert parameter.data_ptr() == pointer and torch.equal(parameter, values), name


def test_continuous_batching_with_auto_gives_eagers_tokens(model):
    prompts = [torch.randint(1, 100, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 17, 33)]
    config = GenerationConfig(max_new_tokens=5, do_sample=False, eos_token_id=-1, pad_token_id=0)
    with autoexperts.tune(model, **FAST) as report:
        model.generate_batch(prompts, generation_config=config)
    (layer,) = report.layers
    assert 5 + 17 + 33 in layer.calls_by_tokens  # the first step prefills the three prompts together
    with autoexperts.record_decisions() as decisions:
        tuned = model.generate_batch(prompts, generation_config=config)
    assert decisions and {d.profile for d in decisions} == {str(layer.profile)}
    model.set_experts_implementation("eager")
    reference = model.generate_batch(prompts, generation_config=config)
    assert {k: v.generated_tokens for k, v in tuned.items()} == {k: v.generated_tokens for k, v in reference.items()}


def test_a_training_model_is_tuned_on_its_forward_and_trains_on(model):
    model.train()
    ids = _prompt()
    with autoexperts.tune(model, **FAST) as report:
        model(input_ids=ids, labels=ids).loss.backward()
    assert report.layers and model.training
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()  # training goes on, now with the tuned table
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_ctrl_c_during_the_sweep_keeps_a_checkpoint_that_the_next_tune_resumes(model, profile_dir, monkeypatch):
    from autoexperts.calibration import sweep

    real = sweep._measure_point
    measured = []  # the token count of every point measured

    def recorded(functions, memory_functions, module, inputs, *rest):
        measured.append(inputs[0].shape[0])
        return real(functions, memory_functions, module, inputs, *rest)

    def interrupted_at_the_third_count(*args):
        if len(measured) == 2:
            raise KeyboardInterrupt  # as Ctrl-C would, while the third count (3 tokens) is measured
        return recorded(*args)

    monkeypatch.setattr(sweep, "_measure_point", interrupted_at_the_third_count)
    with pytest.raises(CalibrationInterrupted) as caught, autoexperts.tune(model, **FAST):
        _generate(model)
    checkpoint = caught.value.checkpoint
    assert measured == [1, 2] and checkpoint is not None and checkpoint.is_file() and caught.value.points > 0
    assert not list(profile_dir.rglob("*.json"))  # no profile, half-written or whole

    monkeypatch.setattr(sweep, "_measure_point", recorded)
    measured.clear()
    with autoexperts.tune(model, **FAST) as report:
        _generate(model)
    assert report.layers[0].profile.is_file() and not checkpoint.exists()
    assert measured[0] == 3 and not {1, 2} & set(measured)  # the checkpoint's counts were kept, not measured again
    assert {1, 2, 3} <= set(report.layers[0].tokens_measured)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"backends": ["nope"]}, "unknown backend"),  # a typo of a backend
        ({"backends": "grouped_mm"}, "sequence of backend names"),  # one name, not a list
        ({"backends": ["eager", "eager"]}, "repeats eager"),  # the same backend twice
        ({"seconds_per_point": 0}, "positive"),  # no time to measure
        ({"seconds_per_point": "fast"}, "must be a number"),  # not a number
        ({"compile": "max-autotune"}, "unknown compile mode"),  # a mode calibrate does not measure
        ({"compile": "default", "backends": ["eager"]}, "cannot run under torch.compile"),  # eager breaks graphs
    ],
)
def test_bad_arguments_raise_before_anything_runs(model, kwargs, message):
    with pytest.raises(ValueError, match=message) as caught, autoexperts.tune(model, **kwargs):
        pytest.fail("the block must not run")
    assert "\n" not in str(caught.value)
    assert all(not m._forward_pre_hooks for m in experts_modules(model))


def test_an_unwritable_out_is_refused_before_anything_runs(model, tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    with pytest.raises(ValueError, match="cannot write profiles"), autoexperts.tune(model, out=not_a_folder / "sub"):
        pytest.fail("the block must not run")


@pytest.mark.parametrize(
    "not_moe",
    [
        torch.nn.Linear(4, 4),  # a plain module
        "a model id",  # not a module at all
    ],
)
def test_tune_on_a_model_without_experts_layers_says_so(not_moe):
    with pytest.raises(ValueError, match="no experts layer"), autoexperts.tune(not_moe):
        pytest.fail("the block must not run")


def test_a_block_without_experts_calls_says_so(model, profile_dir):
    with pytest.raises(ValueError, match="ran no experts call"), autoexperts.tune(model, **FAST):
        pass
    assert not list(profile_dir.rglob("*.json"))


def test_another_folder_is_written_and_auto_is_told_it_does_not_read_it(model, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    warns = pytest.warns(autoexperts.ProfileWarning, match="auto does not read")
    with warns, autoexperts.tune(model, out=elsewhere, **FAST) as report:
        _generate(model)
    assert report.layers[0].profile.is_relative_to(elsewhere)


@pytest.mark.slow
def test_compile_measures_the_compiled_backends(model, profile_dir):
    with autoexperts.tune(model, compile="default", **FAST) as report:
        _generate(model, new_tokens=2)
    (layer,) = report.layers
    assert layer.profile.name.endswith("-default.json")
    record = json.loads(layer.profile.read_text())
    assert record["compile_mode"] == "default" and "eager" not in record["sweep"]["backends"]


def test_a_model_running_a_fixed_backend_is_tuned_from_its_module_inputs(profile_dir):
    model = tiny_model("olmoe", "grouped_mm")  # auto never runs in the block: the pre-hook records the calls
    with autoexperts.tune(model, **FAST) as report:
        _generate(model)
    (layer,) = report.layers
    assert layer.calls_by_tokens == {BATCH * PROMPT: 2, BATCH: 4} and layer.profile.is_file()
    assert model.get_experts_implementation()[""] == "grouped_mm"  # tune leaves the model's choice alone
    model.set_experts_implementation("auto")
    with autoexperts.record_decisions() as decisions:
        _generate(model)
    assert {d.profile for d in decisions} == {str(layer.profile)}
