"""`torch.export` of a model running `auto`, as Transformers' own export tests do: with a profile whose decision
table has two regions, for static shapes and for a dynamic sequence length."""

import warnings

import pytest
import torch

from tests.conftest import CROSSOVER_CURVES, layer_spec, random_input_ids, synthetic_profile, tiny_model


def _reference_logits(model, input_ids, implementation="eager"):
    model.set_experts_implementation(implementation)
    try:
        with torch.no_grad():
            return model(input_ids=input_ids, use_cache=False).logits
    finally:
        model.set_experts_implementation("auto")


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])  # gated; transposed with bias
@pytest.mark.parametrize("seq", [3, 20])  # one call in each region of CROSSOVER_CURVES (batched_mm up to 8 tokens)
def test_static_export_matches_eager(profile_dir, save, model_type, seq):
    model = tiny_model(model_type)
    for mode in ("none", "default"):
        save(synthetic_profile(layer_spec(model), CROSSOVER_CURVES, compile_mode=mode))
    input_ids = random_input_ids(1, seq)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(model, (), {"input_ids": input_ids, "use_cache": False}, strict=False)
    logits = program.module()(input_ids=input_ids, use_cache=False).logits
    torch.testing.assert_close(logits, _reference_logits(model, input_ids), rtol=1e-4, atol=1e-5)


def _backends_in(program) -> set[str]:
    """Which experts backends an exported program runs: batched_mm's `bmm`, grouped_mm's grouped matmul."""
    targets = [str(node.target) for node in program.graph_module.graph.nodes]
    return {name for name, op in (("batched_mm", "bmm"), ("grouped_mm", "grouped_mm")) if any(op in t for t in targets)}


@pytest.mark.parametrize(
    ("largest", "backend"),
    [
        (64, "grouped_mm"),  # prefills up to 64 tokens: the backend of the largest count, never a guard on the count
        (8, "batched_mm"),  # a decode-sized program: all of it lies in batched_mm's region
    ],
)
def test_dynamic_export_runs_every_length_on_the_largest_lengths_backend(profile_dir, save, largest, backend):
    model = tiny_model("qwen3_moe")
    for mode in ("none", "default"):
        save(synthetic_profile(layer_spec(model), CROSSOVER_CURVES, compile_mode=mode))
    seq = torch.export.Dim("seq", min=2, max=largest)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(
            model,
            (),
            {"input_ids": random_input_ids(1, 5), "use_cache": False},
            dynamic_shapes={"input_ids": {1: seq}, "use_cache": None},
            strict=False,
        )
    assert _backends_in(program) == {backend}
    for length in sorted({2, 5, largest}):  # both sides of the profile's crossover where the range has them
        input_ids = random_input_ids(1, length)
        logits = program.module()(input_ids=input_ids, use_cache=False).logits
        torch.testing.assert_close(logits, _reference_logits(model, input_ids), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("seq", "backend"),
    [
        (3, "batched_mm"),  # below the uncompiled profile's crossover
        (20, "grouped_mm"),  # above it
    ],
)
def test_export_uses_the_uncompiled_profile_without_a_warning(profile_dir, save, seq, backend):
    # An exported program runs ATen's kernels uncompiled: the uncompiled profile is export's own, not a borrowed one.
    import autoexperts

    model = tiny_model("qwen3_moe")
    save(synthetic_profile(layer_spec(model), CROSSOVER_CURVES, compile_mode="none"))
    input_ids = random_input_ids(1, seq)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        program = torch.export.export(model, (), {"input_ids": input_ids, "use_cache": False}, strict=False)
    assert not [w for w in caught if issubclass(w.category, autoexperts.ProfileWarning)]
    assert _backends_in(program) == {backend}
    logits = program.module()(input_ids=input_ids, use_cache=False).logits
    torch.testing.assert_close(logits, _reference_logits(model, input_ids), rtol=1e-4, atol=1e-5)
