"""`auto` under `torch.compile(fullgraph=True, dynamic=True)`: no graph break, one graph per decision region, the
profile of the mode being traced, and calibration in a compile mode."""

import warnings

import pytest
import torch

import autoexperts
from autoexperts import compile_mode as modes
from autoexperts import selection
from autoexperts.calibration.run import calibrate
from autoexperts.layer import backend_forward
from tests.conftest import CROSSOVER_CURVES, experts_modules, layer_spec, synthetic_profile, tiny_model

# Token counts spread over both regions of CROSSOVER_CURVES (batched_mm up to 8 tokens, grouped_mm beyond).
SEQUENCE_LENGTHS = [1, 2, 3, 5, 8, 9, 12, 17, 30, 33, 64]

# Eager wins everywhere in this uncompiled profile; under compilation eager cannot run, grouped_mm is next best.
EAGER_FASTEST_CURVES = {
    "eager": (lambda n: 0.01 * n, lambda n: 500 * n),
    "batched_mm": (lambda n: 1.0 * n, lambda n: 1_000_000 * n),
    "grouped_mm": (lambda n: 0.5 + 0.05 * n, lambda n: 1_000 * n),
}


class GraphRecorder:
    """A `torch.compile` backend that keeps every graph Dynamo hands over and runs it uncompiled."""

    def __init__(self):
        self.graphs = []

    def __call__(self, graph_module, example_inputs):
        self.graphs.append(graph_module)
        return graph_module.forward

    def backends_of(self, index: int) -> set[str]:
        """Which experts backends graph `index` runs: batched_mm's `torch.bmm`, grouped_mm's grouped matmul (on
        CPU in float32, Transformers' `grouped_mm_fallback` custom op under compilation)."""
        found = set()
        for node in self.graphs[index].graph.nodes:
            target = str(node.target)
            if "bmm" in target:
                found.add("batched_mm")
            if "grouped_mm" in target:
                found.add("grouped_mm")
        return found


def _input_ids(seq: int) -> torch.Tensor:
    return torch.randint(0, 128, (1, seq), generator=torch.Generator().manual_seed(seq))


def _eager_logits(model, input_ids):
    model.set_experts_implementation("eager")
    try:
        with torch.no_grad():
            return model(input_ids=input_ids).logits
    finally:
        model.set_experts_implementation("auto")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def test_graphs_follow_decision_regions(profile_dir, save):
    model = tiny_model("qwen3_moe")
    save(synthetic_profile(layer_spec(model), CROSSOVER_CURVES, compile_mode="default"))
    recorder = GraphRecorder()
    compiled = torch.compile(model, backend=recorder, fullgraph=True, dynamic=True)
    traced_with = []  # the token count of the call that traced each graph
    with autoexperts.record_decisions() as decisions, torch.no_grad():
        for seq in SEQUENCE_LENGTHS:
            graphs_before = len(recorder.graphs)
            torch.testing.assert_close(
                compiled(input_ids=_input_ids(seq)).logits, _eager_logits(model, _input_ids(seq))
            )
            traced_with += [seq] * (len(recorder.graphs) - graphs_before)
    # Two decision regions, plus the graph Dynamo specialises for size 1: not one graph per token count.
    assert len(recorder.graphs) <= 2 + 1
    for index, seq in enumerate(traced_with):
        assert recorder.backends_of(index) == {"batched_mm" if seq <= 8 else "grouped_mm"}
    assert {"batched_mm" if seq <= 8 else "grouped_mm" for seq in traced_with} == {"batched_mm", "grouped_mm"}
    # Hooks only see uncompiled calls (here: the eager references, which do not run auto).
    assert decisions == []


def test_inductor_fullgraph_matches_eager(profile_dir, save):
    model = tiny_model("mixtral")
    save(synthetic_profile(layer_spec(model), CROSSOVER_CURVES, compile_mode="default"))
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for seq in (3, 20):  # one call in each region
            logits = compiled(input_ids=_input_ids(seq)).logits
            torch.testing.assert_close(logits, _eager_logits(model, _input_ids(seq)), rtol=1e-4, atol=1e-4)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2 + 1


@pytest.mark.parametrize(
    "upstream_break",
    [
        False,  # the experts module compiled on its own: its inputs are graph inputs, every dimension symbolic
        True,  # a graph break just before the experts call (as any break upstream in a model makes it a frame)
    ],
)
def test_experts_call_as_its_own_frame_traces_without_graph_break(profile_dir, save, upstream_break):
    model = tiny_model("qwen3_moe")
    save(synthetic_profile(layer_spec(model), CROSSOVER_CURVES, compile_mode="default"))
    experts = experts_modules(model)[0]
    hidden_dim, top_k = layer_spec(model).hidden_dim, layer_spec(model).top_k

    def call(hidden_states, top_k_index, top_k_weights):
        if upstream_break:
            torch._dynamo.graph_break()
        return experts(hidden_states, top_k_index, top_k_weights)

    recorder = GraphRecorder()
    compiled = torch.compile(call, backend=recorder, fullgraph=not upstream_break, dynamic=True)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for num_tokens in (3, 20):  # one call in each region
            hidden_states = torch.randn(num_tokens, hidden_dim, generator=generator)
            top_k_index = torch.stack(
                [torch.randperm(experts.num_experts, generator=generator)[:top_k] for _ in range(num_tokens)]
            )
            top_k_weights = torch.rand(num_tokens, top_k, generator=generator)
            expected = backend_forward("eager", type(experts))(experts, hidden_states, top_k_index, top_k_weights)
            torch.testing.assert_close(compiled(hidden_states, top_k_index, top_k_weights), expected)
    if not upstream_break:
        assert not torch._dynamo.utils.counters["graph_break"]
    # Every graph holds the whole experts call: one backend's matmuls each, none split at the table lookup.
    assert [recorder.backends_of(i) for i in range(len(recorder.graphs))] == [{"batched_mm"}, {"grouped_mm"}]


def test_without_compiled_profile_borrows_uncompiled_one_without_eager_and_warns_once(profile_dir, save):
    model = tiny_model("qwen3_moe")
    save(synthetic_profile(layer_spec(model), EAGER_FASTEST_CURVES, compile_mode="none"))
    recorder = GraphRecorder()
    compiled = torch.compile(model, backend=recorder, fullgraph=True, dynamic=True)
    with pytest.warns(autoexperts.ProfileMissingWarning) as caught, torch.no_grad():
        for seq in (2, 5, 1):  # three traces (sizes 2 and 1 specialise)
            torch.testing.assert_close(
                compiled(input_ids=_input_ids(seq)).logits, _eager_logits(model, _input_ids(seq))
            )
    messages = [str(w.message) for w in caught if issubclass(w.category, autoexperts.ProfileMissingWarning)]
    assert len(messages) == 1
    assert "compile mode default" in messages[0] and "--compile default" in messages[0]
    assert all(recorder.backends_of(i) == {"grouped_mm"} for i in range(len(recorder.graphs)))
    # Uncompiled, the same profile picks eager.
    with autoexperts.record_decisions() as decisions, torch.no_grad():
        model(input_ids=_input_ids(5))
    assert {d.backend for d in decisions} == {"eager"}


def test_without_any_profile_compiled_run_uses_fallback_rule_and_warns_once(profile_dir):
    model = tiny_model("olmoe")
    recorder = GraphRecorder()
    compiled = torch.compile(model, backend=recorder, fullgraph=True, dynamic=True)
    with pytest.warns(autoexperts.ProfileMissingWarning) as caught, torch.no_grad():
        for seq in (4, 9):
            compiled(input_ids=_input_ids(seq))
    messages = [str(w.message) for w in caught if issubclass(w.category, autoexperts.ProfileMissingWarning)]
    assert len(messages) == 1 and "fallback rule" in messages[0]
    assert recorder.backends_of(0) == {"grouped_mm"}  # the CPU fallback rule


@torch.compiler.assume_constant_result
def _probe_mode() -> str:
    return modes.traced_compile_mode()


def _mode_probe(x: torch.Tensor) -> torch.Tensor:
    return x * 3 if _probe_mode() == "none" else x + 1  # a constant branch: which mode was seen at trace time


@pytest.mark.parametrize(
    ("compile_kwargs", "expected"),
    [
        ({}, "default"),  # torch.compile's default Inductor mode
        ({"mode": "max-autotune-no-cudagraphs"}, "max-autotune-no-cudagraphs"),
        ({"mode": "reduce-overhead"}, "reduce-overhead"),  # CUDA graphs (skipped on CPU, still told apart)
        ({"backend": "aot_eager"}, "default"),  # not Inductor: counts as default
    ],
)
def test_traced_compile_mode_is_detected(compile_kwargs, expected, monkeypatch):
    seen = []
    monkeypatch.setattr(modes, "traced_compile_mode", _recording(modes.traced_compile_mode, seen))
    out = torch.compile(_mode_probe, fullgraph=True, **compile_kwargs)(torch.ones(3))
    assert seen == [expected]
    assert torch.equal(out, torch.full((3,), 2.0))  # the traced branch was a compile mode, not "none"
    assert modes.traced_compile_mode() == "none"  # outside a trace


def _recording(function, seen):
    def wrapper():
        seen.append(function())
        return seen[-1]

    return wrapper


@pytest.mark.parametrize(
    ("compile_mode", "device_type", "expected"),
    [
        ("none", "cpu", ["eager", "batched_mm", "grouped_mm"]),  # uncompiled: everything runs
        ("default", "cpu", ["batched_mm", "grouped_mm"]),  # eager's data-dependent loop breaks the graph
        ("reduce-overhead", "cpu", ["batched_mm", "grouped_mm"]),  # no CUDA graphs on CPU
        ("reduce-overhead", "cuda", ["batched_mm"]),  # grouped_mm cannot be captured in a CUDA graph
        ("max-autotune", "cuda", ["batched_mm"]),  # also CUDA graphs
        ("max-autotune-no-cudagraphs", "cuda", ["batched_mm", "grouped_mm"]),
    ],
)
def test_runnable_backends(compile_mode, device_type, expected):
    assert selection.runnable_backends(["eager", "batched_mm", "grouped_mm"], compile_mode, device_type) == expected


def test_eager_backend_really_breaks_fullgraph():
    """The reason `eager` is never a compiled candidate (if Transformers makes it traceable, revisit that rule)."""
    from autoexperts.calibration.experts_layer import build_experts_layer, routed_inputs
    from autoexperts.layer import backend_forward
    from tests.conftest import tiny_config

    layer = build_experts_layer(tiny_config("mixtral"), torch.device("cpu"), torch.float32)
    eager = torch.compile(backend_forward("eager", type(layer.module)), backend="eager", fullgraph=True, dynamic=True)
    with pytest.raises(Exception, match=r"data-dependent|nonzero|Dynamic"):
        eager(layer.module, *routed_inputs(layer.spec, 5, torch.device("cpu"), torch.float32))


def test_calibrate_in_a_compile_mode(profile_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        profile = calibrate(
            model="small-moe",
            device="cpu",
            tokens=[1, 2, 3, 5, 8],
            out=profile_dir,
            progress=False,
            seconds_per_point=0.01,
            compile_mode="default",
        )
    assert profile.compile_mode == "default" and profile.json_path.name.endswith("-default.json")
    assert profile.metadata["sweep"]["compile"] == {"mode": "default", "dynamic": True, "fullgraph": True}
    assert set(profile.cost_model.backends) == {"batched_mm", "grouped_mm"}  # eager cannot run fullgraph
    # Every compiled call ran ("slow" only means timing stopped for a backend far behind the other).
    assert {m.status for m in profile.measurements} <= {"ok", "slow"}
    assert {(m.backend, m.num_tokens) for m in profile.measurements if m.status == "ok"} >= {
        (backend, n) for backend in ("batched_mm", "grouped_mm") for n in (1, 2)
    }
    # Dynamic shapes: per backend one graph for 1 token and one for all other counts, not one per count.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2 * 2


def test_calibrate_rejects_eager_in_a_compile_mode(profile_dir):
    from autoexperts.errors import UsageError

    with pytest.raises(UsageError, match=r"eager cannot run under torch\.compile"):
        calibrate(model="small-moe", device="cpu", backends=["eager"], out=profile_dir, compile_mode="default")
