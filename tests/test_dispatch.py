"""`auto` on tiny models: its output is exactly the chosen backend's, close to eager, and a profile steers it."""

import pytest
import torch

import autoexperts
from autoexperts.selection import FALLBACK_BATCHED_MAX_TOKENS
from tests.conftest import CROSSOVER_CURVES, layer_spec, logits_with, random_input_ids, synthetic_profile, tiny_model

MODEL_TYPES = [
    "mixtral",  # concatenated gate_up, no bias
    "qwen3_moe",  # separate moe_intermediate_size
    "olmoe",  # q/k norm, many small experts
    "gpt_oss",  # transposed weights, biases, interleaved gate with clamped activation
]


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize(("batch", "seq"), [(1, 1), (2, 7), (3, 40)])  # decode, small prefill, larger prefill
def test_auto_equals_chosen_backend_and_eager(model_type, batch, seq, profile_dir, save):
    model = tiny_model(model_type)
    save(synthetic_profile(layer_spec(model), CROSSOVER_CURVES))
    input_ids = random_input_ids(batch, seq)
    with autoexperts.record_decisions() as decisions:
        auto = logits_with(model, input_ids, "auto")
    chosen = {d.backend for d in decisions}
    assert len(chosen) == 1 and {d.source for d in decisions} == {"profile"}
    expected_backend = "batched_mm" if batch * seq < 8 else "grouped_mm"
    assert chosen == {expected_backend}
    assert torch.equal(auto, logits_with(model, input_ids, expected_backend))
    torch.testing.assert_close(auto, logits_with(model, input_ids, "eager"), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("num_tokens", "expected"),
    [
        (1, "batched_mm"),  # smallest call
        (7, "batched_mm"),  # just below the crossover, between measured points
        (9, "grouped_mm"),  # just above
        (100, "grouped_mm"),  # interpolated between 64 and 128
        (5000, "grouped_mm"),  # beyond the measured range
    ],
)
def test_synthetic_profile_steers_choice(num_tokens, expected, profile_dir, save):
    model = tiny_model("qwen3_moe")
    save(synthetic_profile(layer_spec(model), CROSSOVER_CURVES))
    with autoexperts.record_decisions() as decisions, torch.no_grad():
        model(input_ids=random_input_ids(1, num_tokens))
    assert {(d.num_tokens, d.backend, d.source) for d in decisions} == {(num_tokens, expected, "profile")}
    decision = decisions[0]
    assert set(decision.predicted) == {"eager", "batched_mm", "grouped_mm"}
    assert decision.predicted[expected].latency_ms == min(p.latency_ms for p in decision.predicted.values())
    assert decision.profile is not None and decision.profile.endswith(".json")


@pytest.mark.parametrize(
    ("budget", "expected"),
    [
        (None, "batched_mm"),  # default budget: batched_mm's 4 MB of copies fit
        ("3MB", "grouped_mm"),  # batched_mm's predicted 4 MB exceeds the budget: next fastest that fits
        ("1KB", "eager"),  # nothing fits: the least memory-hungry runs, flagged over_budget
    ],
)
def test_memory_budget_changes_choice(budget, expected, profile_dir, save):
    model = tiny_model("mixtral")
    save(synthetic_profile(layer_spec(model), CROSSOVER_CURVES))
    autoexperts.set_memory_budget(budget)
    with autoexperts.record_decisions() as decisions, torch.no_grad():
        model(input_ids=random_input_ids(1, 4))
    assert {d.backend for d in decisions} == {expected}
    assert {d.source for d in decisions} == {"over_budget" if budget == "1KB" else "profile"}
    if budget is not None:
        assert decisions[0].budget_bytes == autoexperts.settings.parse_memory_budget(budget)[1]


def test_memory_budget_from_environment(profile_dir, save, monkeypatch):
    model = tiny_model("mixtral")
    save(synthetic_profile(layer_spec(model), CROSSOVER_CURVES))
    monkeypatch.setenv("AUTOEXPERTS_MEMORY_BUDGET", "3MB")
    autoexperts.reset()
    with autoexperts.record_decisions() as decisions, torch.no_grad():
        model(input_ids=random_input_ids(1, 4))
    assert {d.backend for d in decisions} == {"grouped_mm"}


def test_fallback_without_profile_warns_once(profile_dir):
    model = tiny_model("qwen3_moe")
    with pytest.warns(autoexperts.ProfileMissingWarning) as caught, autoexperts.record_decisions() as decisions:
        for seq in (3, 5, 3):
            with torch.no_grad():
                model(input_ids=random_input_ids(1, seq))
    missing = [w for w in caught if issubclass(w.category, autoexperts.ProfileMissingWarning)]
    assert len(missing) == 1
    assert "autoexperts calibrate --model" in str(missing[0].message) and "--dtype float32" in str(missing[0].message)
    assert missing[0].filename == __file__  # points at the user's line that ran the model, not at the library
    # On CPU the fallback rule is Transformers' default, grouped_mm.
    assert {(d.backend, d.source) for d in decisions} == {("grouped_mm", "fallback")}


@pytest.mark.parametrize(
    "name_or_path, named",
    [
        ("Qwen/Qwen3-30B-A3B", "Qwen/Qwen3-30B-A3B"),  # a hub id: named as is
        ("/nonexistent/autoexperts-test-model", "<model id or config folder>"),  # a folder gone since (a temp dir)
    ],
)
def test_missing_profile_hint_names_a_model_that_can_be_calibrated(profile_dir, name_or_path, named):
    model = tiny_model("qwen3_moe")
    model.config._name_or_path = name_or_path
    with pytest.warns(autoexperts.ProfileMissingWarning) as caught, torch.no_grad():
        model(input_ids=random_input_ids(1, 3))
    assert f"autoexperts calibrate --model {named} --device cpu" in str(caught[0].message)


@pytest.mark.parametrize(
    "compile_mode, expected",
    [
        ("none", "--dtype float32"),  # uncompiled: no --compile
        ("default", "--compile default"),  # a calibrated mode: named as is
        ("reduce-overhead", "--compile default (mode reduce-overhead is not calibrated"),  # CUDA graphs: says why
        ("export", "--dtype float32"),  # torch.export runs uncompiled kernels: the plain calibration serves it
    ],
)
def test_calibrate_hint_names_the_mode_that_serves_the_run(compile_mode, expected):
    from autoexperts.layer import is_experts_module
    from autoexperts.selection import LayerKey, calibrate_hint

    model = tiny_model("qwen3_moe")
    experts = next(m for m in model.modules() if is_experts_module(m))
    hint = calibrate_hint(LayerKey.of(experts, torch.device("cpu"), 2, compile_mode))
    assert expected in hint
    assert ("--compile" in hint) == (compile_mode in ("default", "reduce-overhead"))


def test_fallback_rule_on_cuda_respects_budget():
    from autoexperts.selection import fallback_table as build_fallback_table

    spec = autoexperts.LayerSpec("X", 8, 64, 32, 2, True, False, False, False, "bfloat16", "cuda")
    generous = build_fallback_table(spec, ["eager", "batched_mm", "grouped_mm"], budget_bytes=2**40)
    assert generous.region_for(1).backend == "batched_mm"
    assert generous.region_for(FALLBACK_BATCHED_MAX_TOKENS).backend == "batched_mm"
    assert generous.region_for(FALLBACK_BATCHED_MAX_TOKENS + 1).backend == "grouped_mm"
    # Room for the weight copies of 3 tokens only: batched_mm up to 3 tokens.
    tight = build_fallback_table(spec, ["eager", "batched_mm", "grouped_mm"], budget_bytes=3 * 2 * spec.expert_bytes)
    assert [(r.first, r.backend) for r in tight.regions] == [(1, "batched_mm"), (4, "grouped_mm")]


def test_decisions_are_cached_per_token_count(profile_dir, save):
    model = tiny_model("qwen3_moe")
    save(synthetic_profile(layer_spec(model), CROSSOVER_CURVES))
    with autoexperts.record_decisions() as decisions, torch.no_grad():
        model(input_ids=random_input_ids(1, 3))
        model(input_ids=random_input_ids(1, 3))
    assert len(decisions) == 4  # two layers, two calls
    assert decisions[0] is decisions[1] is decisions[2] is decisions[3]


def test_model_dtype_change_builds_a_new_table(profile_dir, save):
    model = tiny_model("qwen3_moe")
    save(synthetic_profile(layer_spec(model), CROSSOVER_CURVES))
    with autoexperts.record_decisions() as decisions, torch.no_grad():
        model(input_ids=random_input_ids(1, 3))
        model.to(torch.bfloat16)
        with pytest.warns(autoexperts.ProfileMissingWarning, match="bfloat16"):
            model(input_ids=random_input_ids(1, 3))
    assert [d.layer.dtype for d in decisions] == ["float32", "float32", "bfloat16", "bfloat16"]
    # No bfloat16 profile: the second pair comes from the fallback rule.
    assert [d.source for d in decisions] == ["profile", "profile", "fallback", "fallback"]


def test_generate_with_auto_matches_eager_and_records_prefill_and_decode(profile_dir, save):
    model = tiny_model("qwen3_moe")
    save(synthetic_profile(layer_spec(model), CROSSOVER_CURVES))
    input_ids = random_input_ids(2, 6)
    settings = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    model.set_experts_implementation("eager")
    expected = model.generate(input_ids, **settings)
    model.set_experts_implementation("auto")
    with autoexperts.record_decisions() as decisions:
        generated = model.generate(input_ids, **settings)
    assert torch.equal(generated, expected)
    assert model.get_experts_implementation()[""] == "auto"
    # Prefill: 2 x 6 = 12 tokens (grouped_mm); decode steps: 2 tokens each (batched_mm).
    assert {(d.num_tokens, d.backend) for d in decisions} == {(12, "grouped_mm"), (2, "batched_mm")}
