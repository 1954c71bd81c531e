"""Expert parallelism: an experts layer holding only its rank's experts gets sentinel ids (>= its `num_experts`, with
zero weight) for the other ranks' experts. `auto` delegates to Transformers' backend functions, which handle them."""

import dataclasses

import pytest
import torch

import autoexperts
from autoexperts.calibration.experts_layer import build_experts_layer, routed_inputs
from autoexperts.calibration.run import calibrate
from autoexperts.expert_parallel import tp_expert_style
from autoexperts.layer import LayerSpec, backend_forward
from autoexperts.profile import load_profile
from autoexperts.report import describe_profile
from tests.conftest import experts_modules, synthetic_profile, tiny_config, tiny_model

BACKENDS = ["eager", "batched_mm", "grouped_mm"]
LOCAL_EXPERTS = 4  # of the tiny models' 8: this "rank" holds experts 0..3


def _curves_favouring(backend: str) -> dict:
    return {
        name: ((lambda n: 0.01 * n) if name == backend else (lambda n: 1.0 + 0.1 * n), lambda n: 1_000 * n)
        for name in BACKENDS
    }


def _local_experts(model_type: str) -> torch.nn.Module:
    """The model's first experts layer cut to `LOCAL_EXPERTS` experts and flagged expert-parallel, as Transformers'
    expert-parallel sharding leaves it."""
    experts = experts_modules(tiny_model(model_type))[0]
    with torch.no_grad():
        for name, parameter in list(experts.named_parameters()):
            if parameter.dim() >= 2 and parameter.shape[0] == experts.num_experts:
                setattr(experts, name, torch.nn.Parameter(parameter[:LOCAL_EXPERTS].clone()))
    experts.num_experts = LOCAL_EXPERTS
    experts._is_expert_parallel = True
    return experts


def _routed_with_sentinels(hidden_dim: int, num_tokens: int = 12):
    generator = torch.Generator().manual_seed(num_tokens)
    hidden_states = torch.randn(num_tokens, hidden_dim, generator=generator)  # (num_tokens, hidden_dim)
    global_index = torch.rand(num_tokens, 8, generator=generator).topk(2, dim=-1).indices  # (num_tokens, 2), ids 0..7
    is_remote = global_index >= LOCAL_EXPERTS
    top_k_index = global_index.masked_fill(is_remote, LOCAL_EXPERTS)  # remote experts -> the sentinel id
    top_k_weights = torch.rand(num_tokens, 2, generator=generator).masked_fill(is_remote, 0.0)  # zero at sentinels
    assert is_remote.any() and (~is_remote).any()
    return hidden_states, top_k_index, top_k_weights, is_remote


def _outcome(call):
    """The tensor `call()` returns, or the type and message of what it raises."""
    try:
        return call()
    except Exception as error:
        return type(error), str(error)


@pytest.mark.parametrize(
    "model_type",
    [
        "mixtral",  # concatenated gate_up
        "gpt_oss",  # transposed weights with biases
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_auto_equals_chosen_backend_with_sentinel_ids(model_type, backend, profile_dir, save):
    experts = _local_experts(model_type)
    experts.config._experts_implementation_internal = "auto"
    spec = LayerSpec.of(experts, 2)
    save(synthetic_profile(spec, _curves_favouring(backend)))
    hidden_states, top_k_index, top_k_weights, is_remote = _routed_with_sentinels(spec.hidden_dim)
    with autoexperts.record_decisions() as decisions, torch.no_grad():
        auto = _outcome(lambda: experts(hidden_states, top_k_index, top_k_weights))
        chosen = _outcome(
            lambda: backend_forward(backend, type(experts))(experts, hidden_states, top_k_index, top_k_weights)
        )
    if isinstance(chosen, torch.Tensor):
        assert {d.backend for d in decisions} == {backend}
    else:
        # Some eager forwards (GPT-OSS; Mixtral before Transformers 5.2x) reject sentinel ids: auto's runtime
        # failover runs the same call on the next candidate, whose result must then be exact.
        assert backend == "eager" and decisions[0].backend == "eager"
        (replacement,) = [d for d in decisions if d.source == "runtime_fallback"]
        chosen = backend_forward(replacement.backend, type(experts))(experts, hidden_states, top_k_index, top_k_weights)
    assert torch.equal(auto, chosen)
    # The sentinel slots add nothing: the same as routing them to a local expert with zero weight.
    with torch.no_grad():
        local_only = backend_forward("eager", type(experts))(
            experts, hidden_states, top_k_index.masked_fill(is_remote, 0), top_k_weights
        )
    torch.testing.assert_close(auto, local_only, rtol=1e-5, atol=1e-6)


# A rank's layer: what auto keys its decisions on, and what `calibrate --ep-size` measures.


@pytest.mark.parametrize(
    ("top_k", "expert_shards"),
    [
        (2, 2),  # all-reduce: the whole batch at the model's top-2, the other rank's experts as sentinels
        (1, 1),  # all-to-all: only this rank's (token, expert) pairs, top-1: a plain layer of 4 experts
    ],
)
def test_a_ranks_layer_is_keyed_by_its_local_shape(top_k, expert_shards):
    spec = LayerSpec.of(_local_experts("qwen3_moe"), top_k)
    assert (spec.num_experts, spec.top_k, spec.expert_shards) == (LOCAL_EXPERTS, top_k, expert_shards)
    assert ("-ep2-" in spec.file_stem("none")) == (expert_shards > 1)
    # A whole layer is keyed as before expert parallelism was known (its profiles keep their names and fields).
    whole = LayerSpec.of(experts_modules(tiny_model("qwen3_moe"))[0], 2)
    assert whole.expert_shards == 1 and "expert_shards" not in whole.shape_fields()
    assert whole.file_stem("none") == "qwen3moeexperts-e8-h64-i32-k2-float32-none"


def test_sweep_inputs_of_a_ranks_all_reduce_layer_route_the_other_ranks_share_to_the_sentinel():
    whole = LayerSpec.of(experts_modules(tiny_model("qwen3_moe"))[0], 2)
    spec = dataclasses.replace(whole, num_experts=2, expert_shards=4)  # 1 of 4 ranks, 2 of the 8 experts each
    _, top_k_index, top_k_weights = routed_inputs(spec, 4000, torch.device("cpu"), torch.float32)
    sentinel = top_k_index == spec.num_experts
    assert int(top_k_index.min()) >= 0 and int(top_k_index.max()) == spec.num_experts
    # 3/4 of uniform routes go to other ranks' experts (8000 routes: the share is 0.75 +- 0.02 with overwhelming odds).
    assert abs(float(sentinel.float().mean()) - 0.75) < 0.02
    assert torch.all(top_k_weights[sentinel] == 0) and torch.all(top_k_weights[~sentinel] > 0)


TP_INTERMEDIATE = 16 if tp_expert_style(tiny_config("qwen3_moe")) == "intermediate" else 32


@pytest.mark.parametrize(
    ("options", "stem", "top_k", "shards"),
    [
        ({"ep_size": 2, "ep_implementation": "all_to_all"}, "e4-h64-i32-k1-float32", 1, 1),  # own pairs, top-1
        ({"ep_size": 2, "tp_size": 2}, "e4-h64-i32-k2-ep2-float32", 2, 2),  # auto: ep == tp runs all-reduce
        # tensor parallelism: the experts whole (Transformers 5.25), or every expert's intermediate halved (its plan
        # had expert rules up to 5.24)
        ({"tp_size": 2}, f"e8-h64-i{TP_INTERMEDIATE}-k2-float32", 2, 1),
    ],
)
def test_calibrate_measures_the_layer_one_rank_runs(tmp_path, options, stem, top_k, shards):
    folder = tmp_path / "model"
    tiny_model("qwen3_moe", experts_implementation="eager").save_pretrained(folder)
    profile = calibrate(
        model=str(folder), device="cpu", tokens=[1, 8], out=tmp_path / "profiles", progress=False,
        seconds_per_point=0.01, **options,
    )  # fmt: skip
    assert profile.json_path.name == f"qwen3moeexperts-{stem}-none.json"
    assert (profile.spec.top_k, profile.spec.expert_shards) == (top_k, shards)
    recorded = load_profile(profile.json_path)
    assert recorded.spec == profile.spec
    assert recorded.metadata["parallel"]["ep_size"] == options.get("ep_size", 1)
    shown = describe_profile(recorded, 2**30, "test")
    assert f"parallel  tp_size {options.get('tp_size', 1)}, ep_size {options.get('ep_size', 1)}" in shown


def test_processes_of_one_torchrun_launch_measure_a_layer_once(tmp_path, monkeypatch):
    from autoexperts.calibration import run

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test-launch")  # as torchrun sets it for every rank it starts
    sweeps = []
    real_sweep = run.run_sweep
    monkeypatch.setattr(run, "run_sweep", lambda *args: sweeps.append(1) or real_sweep(*args))
    kwargs = {"model": "small-moe", "device": "cpu", "tokens": [1, 8], "out": tmp_path, "progress": False}
    first = calibrate(seconds_per_point=0.01, ep_size=2, **kwargs)
    second = calibrate(seconds_per_point=0.01, ep_size=2, **kwargs)  # a later rank: the layer is measured already
    assert len(sweeps) == 1 and second.json_path == first.json_path
    assert second.measurements == first.measurements
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "another-launch")  # a new launch measures again
    calibrate(seconds_per_point=0.01, ep_size=2, **kwargs)
    assert len(sweeps) == 2
    # The launch is recorded on its own: a whole layer calibrated under torchrun claims no parallel layout.
    whole = calibrate(seconds_per_point=0.01, **kwargs)
    assert "launch" in whole.metadata and "parallel" not in whole.metadata


def _with_expert_tp_rules(config, style: str):
    """`config` with a tensor-parallel plan for its routed experts' weights, as Transformers before 5.25 had."""
    rules = {f"layers.*.mlp.experts.{name}": style for name in ("gate_up_proj", "down_proj")}
    config.base_model_tp_plan = {**(config.base_model_tp_plan or {}), **rules}
    return config


@pytest.mark.parametrize(
    "model_type",
    [
        "qwen3_moe",  # gated, (E, 2I, H) and (E, H, I)
        "gpt_oss",  # transposed with biases, (E, H, 2I) and (E, I, H)
    ],
)
def test_a_tensor_parallel_plan_for_the_experts_splits_their_intermediate_size(model_type):
    whole = build_experts_layer(tiny_config(model_type), torch.device("meta"), torch.float32)
    config = _with_expert_tp_rules(tiny_config(model_type), "local_colwise")
    local = build_experts_layer(config, torch.device("meta"), torch.float32, tp_size=2)
    assert local.spec == dataclasses.replace(whole.spec, intermediate_dim=whole.spec.intermediate_dim // 2)
    # The installed Transformers' own plan: from 5.25 the experts belong to the expert-parallel plan and stay whole
    # under tensor parallelism; before, a model whose plan had expert rules got them split.
    own = build_experts_layer(tiny_config(model_type), torch.device("meta"), torch.float32, tp_size=2).spec
    splits = tp_expert_style(tiny_config(model_type)) == "intermediate"
    assert own == (local.spec if splits else whole.spec)


@pytest.mark.parametrize(
    ("style", "expected"),
    [
        (None, None),  # no rule for the routed experts (shared_experts rules do not count)
        ("local_colwise", "intermediate"),  # each rank a slice of every expert
        ("moe_tp_experts", "masked"),  # Transformers' deprecated style: whole experts per rank, sentinel ids
    ],
)
def test_tp_expert_style(style, expected):
    config = tiny_config("qwen3_moe")
    config.base_model_tp_plan = {"layers.*.mlp.shared_experts.up_proj": "colwise"}
    if style is not None:
        _with_expert_tp_rules(config, style)
    assert tp_expert_style(config) == expected
