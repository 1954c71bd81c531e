"""Decision tables from a cost model: regions, memory cut-offs beyond the measured range, failures."""

import math

import pytest

from autoexperts.layer import LayerSpec
from autoexperts.table import build_profile_table
from tests.conftest import CROSSOVER_CURVES, synthetic_profile

SPEC = LayerSpec("TinyExperts", 8, 64, 32, 2, True, False, False, False, "float32", "cpu")
BACKENDS = ["eager", "batched_mm", "grouped_mm"]


def _table(curves, budget=math.inf, tokens=(1, 2, 4, 8, 16, 32, 64, 128)):
    return build_profile_table(SPEC, synthetic_profile(SPEC, curves, tokens).cost_model, BACKENDS, budget)


def test_regions_cover_every_token_count_once():
    table = _table(CROSSOVER_CURVES)
    assert table.regions[0].first == 1 and math.isinf(table.regions[-1].last)
    for before, after in zip(table.regions, table.regions[1:], strict=False):
        assert after.first == before.last + 1
        assert after.backend != before.backend or after.source != before.source


def test_crossover_region_boundary():
    table = _table(CROSSOVER_CURVES)
    assert [(r.first, r.backend) for r in table.regions] == [(1, "batched_mm"), (9, "grouped_mm")]


@pytest.mark.parametrize(
    ("budget", "switch_at"),
    [
        (300_000, 301),  # grouped_mm's 1000 B/token line leaves the budget beyond the measured range
        (100_000, 101),  # ... and inside it
    ],
)
def test_budget_cut_off_switches_to_backend_that_fits(budget, switch_at):
    table = _table(CROSSOVER_CURVES, budget=budget)
    region = table.region_for(switch_at)
    assert table.region_for(switch_at - 1).backend == "grouped_mm"
    assert (region.first, region.backend, region.source) == (switch_at, "eager", "profile")


def test_nothing_fits_picks_least_memory_over_budget():
    table = _table(CROSSOVER_CURVES, budget=10)
    assert {(r.backend, r.source) for r in table.regions} == {("eager", "over_budget")}


def test_failed_backend_is_not_chosen_beyond_its_failure():
    profile = synthetic_profile(SPEC, CROSSOVER_CURVES)
    from autoexperts.cost_model import CostModel, Measurement

    measurements = [m for m in profile.measurements if not (m.backend == "batched_mm" and m.num_tokens >= 4)]
    measurements.append(Measurement("batched_mm", 4, "oom", error="out of memory"))
    table = build_profile_table(SPEC, CostModel.fit(measurements), BACKENDS, math.inf)
    assert [(r.first, r.backend) for r in table.regions] == [(1, "batched_mm"), (4, "grouped_mm")]
    assert table.predictions(4)["batched_mm"].feasible is False


def test_candidates_not_measured_are_ignored_and_none_measured_is_an_error():
    profile = synthetic_profile(SPEC, CROSSOVER_CURVES)
    table = build_profile_table(SPEC, profile.cost_model, ["grouped_mm", "sonicmoe"], math.inf)
    assert [r.backend for r in table.regions] == ["grouped_mm"]
    with pytest.raises(ValueError, match="none of the candidate"):
        build_profile_table(SPEC, profile.cost_model, ["sonicmoe"], math.inf)


def test_predictions_match_the_cost_model_inside_and_beyond_the_range():
    profile = synthetic_profile(SPEC, CROSSOVER_CURVES)
    table = build_profile_table(SPEC, profile.cost_model, BACKENDS, math.inf)
    for n in (1, 5, 128, 1000):
        for backend, prediction in table.predictions(n).items():
            assert prediction.latency_ms == pytest.approx(profile.cost_model.latency_ms(backend, [n])[0])
            assert prediction.peak_bytes == pytest.approx(profile.cost_model.peak_bytes(backend, [n])[0])


def test_near_ties_do_not_split_regions():
    # b is 1 % faster than a from 16 tokens on: within the tolerance, so a stays chosen.
    curves = {
        "eager": (lambda n: 1.0 * n, lambda n: 100 * n),
        "grouped_mm": (lambda n: (1.0 if n < 16 else 0.99) * n + (0.5 if n < 4 else 0.0), lambda n: 100 * n),
    }
    table = _table(curves)
    assert [(r.first, r.backend) for r in table.regions] == [(1, "eager")]


def test_a_clear_win_still_switches():
    curves = {
        "eager": (lambda n: 1.0 * n, lambda n: 100 * n),
        "grouped_mm": (lambda n: (1.0 if n < 16 else 0.9) * n + (0.5 if n < 4 else 0.0), lambda n: 100 * n),
    }
    table = _table(curves)
    assert [r.backend for r in table.regions] == ["eager", "grouped_mm"]
    assert 8 < table.regions[1].first <= 16
