"""Routing (issue 15): capturing a model's expert popularity, drawing sweep inputs from a routing, the profile's
record of it, and clear errors for bad `--routing` values."""

import json

import pytest
import torch

import autoexperts
from autoexperts.bench.run import BenchOptions, run_benchmark
from autoexperts.calibration.experts_layer import routed_inputs
from autoexperts.calibration.routing import Routing
from autoexperts.calibration.run import calibrate
from autoexperts.errors import UsageError
from autoexperts.profile import load_profile
from tests.conftest import experts_modules, layer_spec, random_input_ids, tiny_config, tiny_model

CPU = torch.device("cpu")


def _router_counts(model, run) -> list[list[int]]:
    """Per MoE block, each expert's count of tokens, from the router's own top-k recomputed from its inputs (the
    reference the capture must match: a separate computation, not the experts modules' inputs)."""
    counts = []

    def hook(module, args):
        hidden_states = args[0].reshape(-1, module.hidden_dim)  # (num_tokens, hidden_dim)
        logits = torch.nn.functional.linear(hidden_states, module.weight)  # (num_tokens, num_experts)
        index = logits.topk(module.top_k, dim=-1).indices  # (num_tokens, top_k)
        counts[routers.index(module)] += torch.bincount(index.flatten(), minlength=module.num_experts)

    routers = [m for name, m in model.named_modules() if name.endswith("mlp.gate")]
    counts = [torch.zeros(r.num_experts, dtype=torch.int64) for r in routers]
    handles = [r.register_forward_pre_hook(hook) for r in routers]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return [c.tolist() for c in counts]


def test_captured_popularity_is_the_routers_own_top_k(tmp_path):
    model = tiny_model("qwen3_moe", "eager")
    input_ids = random_input_ids(3, 11)

    def forward():
        with torch.no_grad():
            model(input_ids=input_ids)

    expected = _router_counts(model, forward)
    with autoexperts.record_routing(model) as routing:
        forward()
    record = json.loads(routing.save(tmp_path / "routing.json").read_text())
    assert [layer["expert_counts"] for layer in record["layers"]] == expected
    for layer in record["layers"]:
        assert (layer["num_experts"], layer["top_k"], layer["tokens"]) == (8, 2, 33)
        assert layer["calls_by_tokens"] == {"33": 1}
        assert sum(layer["expert_counts"]) == 33 * 2


def test_capture_counts_every_call_of_generate():
    model = tiny_model("qwen3_moe", "eager")
    with autoexperts.record_routing(model) as routing:
        model.generate(random_input_ids(2, 9), max_new_tokens=3, do_sample=False)
    for layer in routing.to_json()["layers"]:
        assert layer["calls_by_tokens"] == {"2": 2, "18": 1}  # one 2 x 9 prefill, two decode steps of 2 tokens
        assert layer["tokens"] == 22 and sum(layer["expert_counts"]) == 44


def test_capture_leaves_no_hook_and_auto_unchanged(profile_dir):
    model = tiny_model("qwen3_moe", "auto")
    input_ids = random_input_ids(2, 7)
    with autoexperts.record_decisions() as before, torch.no_grad():
        reference = model(input_ids=input_ids).logits
    with pytest.raises(RuntimeError, match="stop"), autoexperts.record_routing(model):  # left by an exception
        raise RuntimeError("stop")
    with autoexperts.record_routing(model) as routing, torch.no_grad():
        during = model(input_ids=input_ids).logits
    assert routing.to_json()["layers"]  # it did record
    for module in experts_modules(model):
        assert not module._forward_pre_hooks and not module._forward_hooks
    with autoexperts.record_decisions() as after, torch.no_grad():
        logits = model(input_ids=input_ids).logits
    torch.testing.assert_close(during, reference, rtol=0, atol=0)
    torch.testing.assert_close(logits, reference, rtol=0, atol=0)
    assert [(d.num_tokens, d.backend, d.source) for d in after] == [(d.num_tokens, d.backend, d.source) for d in before]


def test_record_routing_needs_an_moe_model():
    with pytest.raises(ValueError, match="no experts layer"), autoexperts.record_routing(torch.nn.Linear(2, 2)):
        pass


def _captured_file(tmp_path, counts_per_layer, num_experts=8, top_k=2, tokens=1000) -> str:
    layers = [
        {"name": f"model.layers.{i}.mlp.experts", "num_experts": num_experts, "top_k": top_k, "tokens": tokens,
         "expert_counts": counts}
        for i, counts in enumerate(counts_per_layer)
    ]  # fmt: skip
    path = tmp_path / "routing.json"
    path.write_text(json.dumps({"kind": "autoexperts-routing", "schema_version": 1, "layers": layers}))
    return str(path)


def _shares(top_k_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Each expert's share of the tokens: the fraction of rows it appears in."""
    return torch.bincount(top_k_index.flatten(), minlength=num_experts).double() / top_k_index.shape[0]


# With 40000 tokens and a fixed seed, a share's standard error is at most 0.0025: 0.012 is about 5 of them.
TOLERANCE = 0.012


@pytest.mark.parametrize(
    ("text", "num_experts", "top_k"),
    [
        ("zipf:1.2", 16, 1),  # top-1: each expert's share is its normalised weight
        ("zipf:1.2", 16, 4),  # top-4: the argmax slot follows the normalised weights exactly
        ("zipf:3", 8, 2),  # steep: one expert takes most argmax slots
    ],
)
def test_zipf_draws_follow_the_weights(text, num_experts, top_k):
    routing = Routing.parse(text)
    index = routing.draw(40000, num_experts, top_k, torch.Generator().manual_seed(7))
    weights = torch.arange(1, num_experts + 1, dtype=torch.float64) ** -routing.exponent
    first = _shares(index[:, :1], num_experts)  # the highest-scoring slot, as a router's top-k orders it
    assert (first - weights / weights.sum()).abs().max() < TOLERANCE


def test_uniform_draws_are_the_original_draw_and_even():
    spec = layer_spec(tiny_model("qwen3_moe"))
    _, index, _ = routed_inputs(spec, 40000, CPU, torch.float32, seed=3)
    generator = torch.Generator().manual_seed(3 + 40000)  # the draw autoexperts made before routings existed
    torch.randn(40000, spec.hidden_dim, generator=generator)
    reference = torch.rand(40000, spec.num_experts, generator=generator).topk(spec.top_k, dim=-1).indices
    assert torch.equal(index, reference)
    assert (_shares(index, spec.num_experts) - spec.top_k / spec.num_experts).abs().max() < TOLERANCE


@pytest.mark.parametrize(
    "counts",
    [
        [[900, 500, 300, 150, 80, 40, 20, 10]],  # one layer, steep (expert 0 in 90 % of the tokens)
        [[10, 20, 40, 80, 150, 300, 500, 900], [300, 300, 250, 250, 250, 250, 200, 200]],  # mean of sorted curves
        [[1000, 1000, 0, 0, 0, 0, 0, 0]],  # exactly top_k experts ever hit
    ],
)
def test_captured_draws_give_each_expert_its_share(tmp_path, counts):
    routing = Routing.parse(_captured_file(tmp_path, counts)).for_shape(8, 2)
    expected = torch.tensor([sorted(c, reverse=True) for c in counts], dtype=torch.float64).mean(0) / 1000
    assert routing.popularity == pytest.approx(expected.tolist())
    index = routing.draw(40000, 8, 2, torch.Generator().manual_seed(5))
    assert (_shares(index, 8) - expected).abs().max() < TOLERANCE


@pytest.mark.parametrize("text", ["uniform", "zipf:1.5", "zipf:6", "captured"])  # steep: still distinct
def test_draws_are_distinct_per_token_and_deterministic_per_seed(tmp_path, text):
    if text == "captured":
        text = _captured_file(tmp_path, [[900, 500, 300, 150, 80, 40, 20, 10]])
    routing = Routing.parse(text)
    spec = layer_spec(tiny_model("qwen3_moe"))
    _, index, weights = routed_inputs(spec, 500, CPU, torch.float32, seed=1, routing=routing)
    assert index.shape == (500, 2) and weights.abs().sum() > 0
    assert (index.sort(dim=-1).values.diff(dim=-1) > 0).all()  # no expert twice in a row
    _, again, _ = routed_inputs(spec, 500, CPU, torch.float32, seed=1, routing=routing)
    _, other, _ = routed_inputs(spec, 500, CPU, torch.float32, seed=2, routing=routing)
    assert torch.equal(index, again) and not torch.equal(index, other)


@pytest.mark.parametrize(
    "text",
    ["uniform", "zipf:0", "zipf:1.25", "captured"],  # each kind round-trips through the profile's JSON
)
def test_routing_json_round_trip(tmp_path, text):
    if text == "captured":
        text = _captured_file(tmp_path, [[900, 500, 300, 150, 80, 40, 20, 10]])
    routing = Routing.parse(text).for_shape(8, 2)
    again = Routing.from_json(json.loads(json.dumps(routing.to_json())))
    assert again.to_json() == routing.to_json() and again.text() == text


def test_profile_records_the_routing_and_show_prints_it(tmp_path, profile_dir, capsys):
    from autoexperts.cli import main

    folder = tmp_path / "tiny-qwen3-moe"
    tiny_config("qwen3_moe").save_pretrained(folder)
    routing_file = _captured_file(tmp_path, [[900, 500, 300, 150, 80, 40, 20, 10]] * 2)
    for text in ("zipf:1.5", routing_file):
        profile = calibrate(str(folder), "cpu", "float32", [1, 4], out=profile_dir, progress=False,
                            seconds_per_point=0.005, routing=text)  # fmt: skip
        expected = Routing.parse(text).for_shape(8, 2)
        loaded = load_profile(profile.json_path)
        assert loaded.metadata["sweep"]["routing"] == expected.to_json()
        assert main(["show", str(profile.json_path)]) == 0
        shown = [line for line in capsys.readouterr().out.splitlines() if line.startswith("routing")]
        assert shown == [f"routing   {expected.describe()}"]
    assert loaded.metadata["sweep"]["routing"]["layers"] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]


def test_bench_draws_the_routing_and_compares_the_uniform_calibration(tmp_path, profile_dir):
    folder = tmp_path / "tiny-qwen3-moe"
    tiny_config("qwen3_moe").save_pretrained(folder)
    uniform, skewed = tmp_path / "uniform", tmp_path / "skewed"
    for out, text in ((uniform, "uniform"), (skewed, "zipf:2")):
        calibrate(str(folder), "cpu", "float32", [1, 2, 4, 8], out=out, progress=False, seconds_per_point=0.005,
                  routing=text)  # fmt: skip
    options = BenchOptions(
        model=str(folder), device="cpu", out=tmp_path / "results", profile_dir=skewed, sweep_tokens=[3, 6],
        parts=("sweep",), seconds_per_point=0.005, progress=False, routing=Routing.parse("zipf:2"),
        compare_profile_dir=uniform,
    )  # fmt: skip
    results = run_benchmark(options)
    assert results["routing"]["text"] == "zipf:2"
    assert results["files"]["json"].endswith("-routing-zipf2.json")
    compared = results["layer_sweep"]["compared_profile"]
    assert compared["routing"]["kind"] == "uniform" and len(compared["picks"]) == 2
    own = compared["totals"]["profile"]["oracle_picks"]
    assert own == results["layer_sweep"]["summary"]["oracle_picks"]


@pytest.mark.parametrize(
    ("routing", "message"),
    [
        ("zipf:-1", "finite number >= 0"),  # a negative exponent
        ("zipf:x", "is not a number"),  # not a number
        ("zipf:inf", "finite number >= 0"),  # not finite
        ("missing.json", "neither uniform, zipf:S nor a routing file"),  # no such file
        ("not-routing.json", "not an autoexperts routing file"),  # a JSON file of something else
        ("no-match.json", "has no layer with 16 experts and top-4 (it has 4 experts top-2)"),  # another shape
    ],
)
@pytest.mark.parametrize("command", ["calibrate", "bench"])
def test_bad_routing_exits_2_with_one_line(tmp_path, capsys, routing, message, command):
    from autoexperts.cli import main

    (tmp_path / "not-routing.json").write_text(json.dumps({"kind": "autoexperts-profile"}))
    (tmp_path / "no-match.json").write_bytes(
        (tmp_path / _captured_file(tmp_path, [[500, 400, 300, 200]], num_experts=4)).read_bytes()
    )
    out = tmp_path / "out"
    if routing.endswith(".json"):
        routing = str(tmp_path / routing)
    args = [command, "--model", "small-moe", "--device", "cpu", "--routing", routing, "--out", str(out)]
    args.append("--no-progress")
    status = _exit_status(main, args)
    err = capsys.readouterr().err
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err
    if command == "calibrate":
        assert not list(out.rglob("*.json"))  # nothing measured, nothing written


def _exit_status(main, args) -> int:
    try:
        return main(args)
    except SystemExit as exit_:  # argparse's errors exit
        return exit_.code


def test_routing_for_a_shape_with_more_slots_than_experts_is_a_usage_error():
    with pytest.raises(UsageError, match="cannot route 4 distinct experts"):
        Routing.parse("zipf:1").for_shape(2, 4)


def test_resuming_with_another_routing_is_refused(tmp_path, profile_dir, monkeypatch):
    from autoexperts.calibration import run as run_module
    from autoexperts.errors import CalibrationInterrupted

    def interrupted_sweep(layer, device, dtype, options):
        options.on_point([])  # the checkpoint of a sweep cut off before its first point
        raise KeyboardInterrupt

    folder = tmp_path / "tiny-qwen3-moe"
    tiny_config("qwen3_moe").save_pretrained(folder)
    real_sweep = run_module.run_sweep
    monkeypatch.setattr(run_module, "run_sweep", interrupted_sweep)
    options = {"tokens": [1, 2], "out": profile_dir, "progress": False, "seconds_per_point": 0.005}
    with pytest.raises(CalibrationInterrupted):
        calibrate(str(folder), "cpu", "float32", routing="zipf:2", **options)
    monkeypatch.setattr(run_module, "run_sweep", real_sweep)
    with pytest.raises(UsageError, match="routing"):
        calibrate(str(folder), "cpu", "float32", routing="uniform", resume=True, **options)
    profile = calibrate(str(folder), "cpu", "float32", routing="zipf:2", resume=True, **options)
    assert profile.metadata["sweep"]["routing"]["text"] == "zipf:2"
