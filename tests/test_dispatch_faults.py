"""`auto` under faults: damaged and stale profiles, a backend that raises, and many threads at once.

Every case runs a tiny model's forward and compares it with the backend that should have run (exactly) and with
eager (closely).
"""

import random
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

import autoexperts
from autoexperts import dispatch
from autoexperts.errors import BackendFailedWarning, ProfileWarning
from autoexperts.profile import save_profile
from tests.conftest import (
    CROSSOVER_CURVES,
    experts_modules,
    layer_spec,
    logits_with,
    random_input_ids,
    rewrite_record,
    synthetic_profile,
    tiny_model,
)

# One damaged or foreign profile of each kind, and what `auto` does with it at 3 tokens (the synthetic profile
# picks batched_mm there; the CPU fallback rule, grouped_mm).
DAMAGES = {
    "truncated joblib": (lambda p: p.with_suffix(".joblib").write_bytes(b"\x80\x04\x95"), "profile", "does not match"),
    "empty joblib": (lambda p: p.with_suffix(".joblib").write_bytes(b""), "profile", "does not match"),
    "missing joblib": (lambda p: p.with_suffix(".joblib").unlink(), "profile", "is missing"),
    "invalid JSON": (lambda p: p.write_text('{"kind": "autoexperts-profile", '), "fallback", "invalid JSON"),
    "empty JSON": (lambda p: p.write_text(""), "fallback", "invalid JSON"),
    "future schema": (lambda p: rewrite_record(p, schema_version=99), "fallback", "newer than"),
    "another device": (lambda p: rewrite_record(p, device__name="Elsewhere GPU"), "fallback", "measured on"),
    "another dtype": (lambda p: rewrite_record(p, dtype="float16"), "fallback", "dtype 'float16'"),
    "another shape": (lambda p: rewrite_record(p, experts__intermediate_dim=48), "fallback", "intermediate_dim 48"),
    "another compile mode": (lambda p: rewrite_record(p, compile_mode="max-autotune"), "fallback", "compile mode"),
    "another scikit-learn": (
        lambda p: rewrite_record(p, versions={"scikit-learn": "0.1"}),
        "profile",
        "scikit-learn 0.1",
    ),
    "stale torch": (lambda p: rewrite_record(p, versions={"torch": "1.0.0"}), "profile", "torch 1.0.0"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_profile_never_breaks_a_forward(damage, profile_dir, save):
    corrupt, source, reason = DAMAGES[damage]
    model = tiny_model("qwen3_moe")
    json_path = save(synthetic_profile(layer_spec(model), CROSSOVER_CURVES))
    corrupt(json_path)
    dispatch.reset()
    input_ids = random_input_ids(1, 3)
    with warnings.catch_warnings(record=True) as caught, autoexperts.record_decisions() as decisions:
        warnings.simplefilter("always")
        auto = logits_with(model, input_ids, "auto")
        logits_with(model, random_input_ids(1, 5), "auto")  # a second call warns no more
    profile_warnings = [str(w.message) for w in caught if issubclass(w.category, ProfileWarning)]
    if source == "fallback":  # the missing-profile warning follows the one about the file
        assert "no profile for" in profile_warnings.pop()
    assert len(profile_warnings) == 1, profile_warnings
    assert str(json_path) in profile_warnings[0] and reason in profile_warnings[0]
    assert {d.source for d in decisions} == {source}
    expected = "batched_mm" if source == "profile" else "grouped_mm"
    assert {d.backend for d in decisions if d.num_tokens == 3} == {expected}
    assert torch.equal(auto, logits_with(model, input_ids, expected))
    torch.testing.assert_close(auto, logits_with(model, input_ids, "eager"), rtol=1e-4, atol=1e-5)


def test_next_matching_profile_is_used_when_the_first_is_damaged(profile_dir, save, tmp_path, monkeypatch):
    model = tiny_model("mixtral")
    profile = synthetic_profile(layer_spec(model), CROSSOVER_CURVES)
    broken = save(profile)
    broken.write_text("{")
    shipped = tmp_path / "shipped"
    monkeypatch.setattr(autoexperts.settings, "shipped_profile_dir", lambda: shipped)
    good = save_profile(profile, shipped)
    dispatch.reset()
    with pytest.warns(ProfileWarning, match="invalid JSON"), autoexperts.record_decisions() as decisions:
        logits_with(model, random_input_ids(1, 3), "auto")
    assert {(d.source, d.profile) for d in decisions} == {("profile", str(good))}


@pytest.mark.filterwarnings("ignore::autoexperts.ProfileMissingWarning")
@pytest.mark.parametrize(("policy", "source"), [("use", "profile"), ("fallback", "fallback"), ("", "profile")])
def test_stale_profile_setting(policy, source, profile_dir, save, monkeypatch):
    # "" is unset: the default uses stale profiles
    model = tiny_model("qwen3_moe")
    json_path = save(synthetic_profile(layer_spec(model), CROSSOVER_CURVES))
    rewrite_record(json_path, versions={"transformers": "4.0.0"})
    monkeypatch.setenv("AUTOEXPERTS_STALE_PROFILES", policy)
    dispatch.reset()
    with (
        pytest.warns(autoexperts.StaleProfileWarning, match="transformers 4.0.0"),
        autoexperts.record_decisions() as decisions,
    ):
        logits_with(model, random_input_ids(1, 3), "auto")
    assert {d.source for d in decisions} == {source}


def test_malformed_stale_setting_names_the_variable(monkeypatch):
    from autoexperts.settings import stale_profiles_policy

    monkeypatch.setenv("AUTOEXPERTS_STALE_PROFILES", "sometimes")
    with pytest.raises(ValueError, match=r"^AUTOEXPERTS_STALE_PROFILES: 'sometimes'"):
        stale_profiles_policy()


# Runtime faults: the chosen backend raises.

# The crossover profile plus a "flaky_mm" backend predicted fastest everywhere.
FLAKY_CURVES = {**CROSSOVER_CURVES, "flaky_mm": (lambda n: 0.01 * n, lambda n: 100 * n)}


class _Flaky:
    """A backend that raises like an unsupported dtype would, counting its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, module, hidden_states, top_k_index, top_k_weights):
        self.calls += 1
        raise RuntimeError(f"flaky_mm does not support {hidden_states.dtype}")


@pytest.mark.parametrize(
    ("seq", "replacement"),
    [
        (3, "batched_mm"),  # the next fastest within budget below the crossover
        (20, "grouped_mm"),  # ... and above it
    ],
)
def test_failing_backend_falls_back_to_the_next_candidate(seq, replacement, profile_dir, save, monkeypatch):
    flaky = _Flaky()
    monkeypatch.setitem(ALL_EXPERTS_FUNCTIONS, "flaky_mm", flaky)
    model = tiny_model("olmoe")
    save(synthetic_profile(layer_spec(model), FLAKY_CURVES))
    input_ids = random_input_ids(1, seq)
    with pytest.warns(BackendFailedWarning) as caught, autoexperts.record_decisions() as decisions:
        auto = logits_with(model, input_ids, "auto")
        again = logits_with(model, input_ids, "auto")
    messages = [str(w.message) for w in caught if issubclass(w.category, BackendFailedWarning)]
    assert len(messages) == 1 and "flaky_mm raised" in messages[0] and "does not support" in messages[0]
    assert flaky.calls == 1  # never chosen again for this layer shape: not for the second layer, not later
    # First layer: the failed decision, then the replacement; from then on the rebuilt table's choice.
    assert [(d.backend, d.source) for d in decisions] == [
        ("flaky_mm", "profile"),
        (replacement, "runtime_fallback"),
        *[(replacement, "profile")] * 3,
    ]
    expected = logits_with(model, input_ids, replacement)
    assert torch.equal(auto, expected) and torch.equal(again, expected)
    torch.testing.assert_close(auto, logits_with(model, input_ids, "eager"), rtol=1e-4, atol=1e-5)


def test_failing_fallback_choice_runs_eager(profile_dir, monkeypatch):
    # No profile: the CPU fallback rule picks grouped_mm; when it raises, eager (the module's own forward) runs.
    flaky = _Flaky()
    monkeypatch.setitem(ALL_EXPERTS_FUNCTIONS, "grouped_mm", flaky)
    model = tiny_model("mixtral")
    input_ids = random_input_ids(2, 5)
    expected = logits_with(model, input_ids, "eager")
    with pytest.warns(BackendFailedWarning, match="eager ran in its place"), warnings.catch_warnings():
        warnings.simplefilter("ignore", autoexperts.ProfileMissingWarning)
        with autoexperts.record_decisions() as decisions:
            auto = logits_with(model, input_ids, "auto")
    assert torch.equal(auto, expected) and flaky.calls == 1
    assert [d.backend for d in decisions] == ["grouped_mm", "eager", "eager"]


def test_error_of_every_candidate_propagates_and_excludes_nothing(profile_dir, save, monkeypatch):
    # When eager fails too, the input itself is at fault: the error surfaces and no backend is blamed.
    flaky = _Flaky()
    monkeypatch.setitem(ALL_EXPERTS_FUNCTIONS, "batched_mm", flaky)
    monkeypatch.setitem(ALL_EXPERTS_FUNCTIONS, "grouped_mm", flaky)
    model = tiny_model("qwen3_moe")
    save(synthetic_profile(layer_spec(model), CROSSOVER_CURVES))
    experts_class = type(experts_modules(model)[0])
    monkeypatch.setattr(experts_class.forward, "__wrapped__", flaky)
    with pytest.raises(RuntimeError, match="does not support"):
        logits_with(model, random_input_ids(1, 3), "auto")
    state = experts_modules(model)[0].__dict__[dispatch._STATE_ATTR]
    assert [d.failed for d in state.dispatch.values()] == [{}]


# Threads.


def test_decision_cache_is_safe_under_threads(profile_dir, save):
    model = tiny_model("qwen3_moe")
    save(synthetic_profile(layer_spec(model), CROSSOVER_CURVES))
    token_counts = list(range(1, 25))
    expected = {n: logits_with(model, random_input_ids(1, n), "eager") for n in token_counts}
    with autoexperts.record_decisions() as alone:  # the choices one thread makes
        for n in token_counts:
            logits_with(model, random_input_ids(1, n), "auto")
    chosen_alone = {(d.num_tokens, d.backend) for d in alone}
    assert {backend for _, backend in chosen_alone} == {"batched_mm", "grouped_mm"}
    dispatch.reset()  # the threads race to build the table and fill the cache
    jobs = token_counts * 4
    random.Random(0).shuffle(jobs)

    def forward(n):
        with torch.no_grad():
            return n, model(input_ids=random_input_ids(1, n)).logits

    with autoexperts.record_decisions() as decisions, ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(forward, jobs))
    for n, logits in results:
        torch.testing.assert_close(logits, expected[n], rtol=1e-4, atol=1e-5)
    assert len(decisions) == 2 * len(jobs)  # two experts layers per forward
    assert {(d.num_tokens, d.backend) for d in decisions} == chosen_alone
    assert len(dispatch.state._tables) == 1  # one table for the shared layer spec, built once
    # Each token count is decided once: every later call gets the same cached Decision.
    assert len({id(d) for d in decisions}) <= len(token_counts) * 2


class _NeedsKernels:
    """A registered backend whose package is missing here (as sonicmoe or deepgemm on most machines)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, module, hidden_states, top_k_index, top_k_weights):
        self.calls += 1
        raise ImportError("sonic-moe requires the kernels package")


@pytest.mark.parametrize(
    "chosen",
    [
        "eager",  # a profile picks eager and it raises: batched_mm and grouped_mm may replace it, never the others
        "grouped_mm",  # the fallback rule's choice raises, then eager, then batched_mm
    ],
)
def test_when_every_runnable_backend_fails_the_chosen_backends_error_surfaces(chosen, profile_dir, save, monkeypatch):
    uninstalled = _NeedsKernels()
    monkeypatch.setitem(ALL_EXPERTS_FUNCTIONS, "sonicmoe_like", uninstalled)
    model = tiny_model("mixtral")
    if chosen == "eager":
        curves = {name: (lambda n: 1.0 + 0.1 * n, lambda n: 1_000 * n) for name in ("batched_mm", "grouped_mm")}
        save(synthetic_profile(layer_spec(model), {**curves, "eager": (lambda n: 0.01 * n, lambda n: 1_000 * n)}))
    experts = experts_modules(model)[0]
    model.set_experts_implementation("auto")
    hidden_states = torch.randn(4, model.config.hidden_size + 8)  # the wrong width: no backend can run it
    top_k_index = torch.randint(0, 8, (4, 2))
    top_k_weights = torch.rand(4, 2)
    forward = dispatch.backend_forward(chosen, type(experts))
    with pytest.raises(Exception) as direct:
        forward(experts, hidden_states, top_k_index, top_k_weights)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", autoexperts.ProfileMissingWarning)
        with pytest.raises(type(direct.value)) as raised:
            dispatch.auto_experts_forward(experts, hidden_states, top_k_index, top_k_weights)
    assert str(raised.value) == str(direct.value)  # the chosen backend's own error, not the last resort's
    notes = " ".join(getattr(raised.value, "__notes__", []))
    others = {"eager", "batched_mm", "grouped_mm"} - {chosen}
    assert all(name in notes for name in others) or not hasattr(raised.value, "add_note")
    assert uninstalled.calls == 0 and "kernels" not in notes  # a backend that cannot run here is never tried
