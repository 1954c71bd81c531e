"""On a CUDA device: calibration with CUDA events and allocator peaks, and auto dispatch on CUDA tensors."""

import math

import pytest
import torch

import autoexperts
from autoexperts.calibration.design import matmul_flops_per_second
from autoexperts.calibration.run import calibrate
from autoexperts.table import build_profile_table
from autoexperts.timing import timed_call_ms
from tests.conftest import CROSSOVER_CURVES, layer_spec, synthetic_profile, tiny_model
from tests.test_crossovers import BACKENDS, GRID, SWITCH, near_tie  # noqa: F401 (near_tie: a fixture)

pytestmark = pytest.mark.cuda


def test_calibration_on_cuda_measures_time_and_allocator_peak(profile_dir):
    profile = calibrate(model="small-moe", device="cuda", dtype="bfloat16", tokens=[1, 8, 64], progress=False)
    ok = [m for m in profile.measurements if m.status == "ok"]
    assert {m.backend for m in ok} >= {"batched_mm", "grouped_mm"}
    assert all(m.median_ms > 0 and m.peak_bytes > 0 for m in ok)
    batched = {m.num_tokens: m.peak_bytes for m in ok if m.backend == "batched_mm"}
    assert batched[64] > 8 * batched[1]  # weight copies grow with the tokens
    assert profile.device_name == torch.cuda.get_device_name()


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])  # plain layout; transposed with biases
def test_auto_on_cuda_equals_chosen_backend(model_type, profile_dir, save):
    model = tiny_model(model_type, dtype=torch.bfloat16).cuda()
    spec = layer_spec(model)
    save(synthetic_profile(spec, CROSSOVER_CURVES))
    for seq in (3, 40):
        input_ids = torch.randint(0, 128, (1, seq), device="cuda")
        with autoexperts.record_decisions() as decisions, torch.no_grad():
            model.set_experts_implementation("auto")
            auto = model(input_ids=input_ids).logits
        (backend,) = {d.backend for d in decisions}
        assert {d.source for d in decisions} == {"profile"}
        with torch.no_grad():
            model.set_experts_implementation(backend)
            assert torch.equal(auto, model(input_ids=input_ids).logits)


def test_matmul_probe_reads_the_rate_of_a_directly_timed_large_matmul_on_cuda():
    # The old probe (a synchronize after each 512 x 512 matmul) read 9.66 TFLOP/s on an H200, ~1 % of its bf16 rate.
    device = torch.device("cuda")
    probe = matmul_flops_per_second(device, torch.bfloat16)
    size = 16384
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    torch.mm(a, b)
    milliseconds = sorted(timed_call_ms(lambda: torch.mm(a, b), device) for _ in range(5))[2]
    assert 0.67 <= probe / (2.0 * size**3 / (milliseconds / 1e3)) <= 1.5


@pytest.mark.usefixtures("near_tie")
def test_a_crossover_lands_where_the_latencies_cross_timed_with_cuda_events(profile_dir, tmp_path):
    # The synthetic near-tie of test_crossovers (the backends sleep on the host), timed with CUDA events.
    profile = calibrate(model="small-moe", device="cuda", dtype="bfloat16", tokens=GRID, backends=BACKENDS,
                        out=tmp_path, progress=False, seconds_per_point=0.05, refine=True)  # fmt: skip
    table = build_profile_table(profile.spec, profile.cost_model, BACKENDS, math.inf)
    assert [(r.first, r.backend) for r in table.regions] == [(1, "batched_mm"), (SWITCH, "grouped_mm")]
