"""The cost model interpolates between measured points, extrapolates linearly beyond, and knows failures."""

import numpy as np
import pytest

from autoexperts.cost_model import CostModel, Measurement


def _points(backend, tokens, ms, mem=lambda n: 100 * n + 1000, status="ok"):
    return [Measurement(backend, n, status, ms(n), int(mem(n)), (ms(n),)) for n in tokens]


def test_interpolates_exactly_at_measured_points_and_between_in_log_log():
    model = CostModel.fit(_points("a", [1, 4, 16], lambda n: {1: 1.0, 4: 2.0, 16: 8.0}[n]))
    np.testing.assert_allclose(model.latency_ms("a", np.array([1, 4, 16])), [1.0, 2.0, 8.0])
    # Halfway between 4 and 16 in log2 (n = 8): the geometric mean of 2 and 8.
    np.testing.assert_allclose(model.latency_ms("a", np.array([8])), [4.0])


def test_extrapolates_in_proportion_to_tokens_beyond_the_range():
    model = CostModel.fit(_points("a", [1, 2, 4], lambda n: 0.5 * n + 1))
    top = model.latency_ms("a", np.array([4]))[0]
    np.testing.assert_allclose(model.latency_ms("a", np.array([8, 400])), [2 * top, 100 * top])


def test_holds_the_smallest_measurement_below_the_range():
    model = CostModel.fit(_points("a", [4, 8], lambda n: n / 4))
    np.testing.assert_allclose(model.latency_ms("a", np.array([1, 2])), [1.0, 1.0])


def test_never_predicts_fewer_tokens_cost_more():
    noisy = {1: 1.0, 2: 3.0, 4: 2.0, 8: 5.0, 16: 4.0, 32: 9.0}
    model = CostModel.fit(_points("a", noisy, noisy.__getitem__))
    predicted = model.latency_ms("a", np.arange(1, 64))
    assert np.all(np.diff(predicted) >= -1e-12)


def test_memory_is_an_affine_fit_that_extrapolates():
    model = CostModel.fit(_points("a", [1, 2, 4, 8], lambda n: 1.0, mem=lambda n: 3000 * n + 500))
    np.testing.assert_allclose(model.peak_bytes("a", np.array([1, 1000])), [3500, 3_000_500], rtol=1e-6)
    assert model.memory_line("a") == pytest.approx((500, 3000), rel=1e-6)


def test_failure_marks_backend_infeasible_from_there_up():
    points = [*_points("a", [1, 2, 4], lambda n: 1.0), Measurement("a", 8, "oom", error="out of memory")]
    points += [Measurement("a", 16, "skipped", error="after oom")]
    model = CostModel.fit(points)
    assert model.infeasible_from("a") == 8
    assert model.max_tokens("a") == 4


def test_backend_without_successful_points_is_left_out():
    model = CostModel.fit([*_points("a", [1, 2], lambda n: 1.0), Measurement("b", 1, "error", error="boom")])
    assert model.backends == ["a"]


def test_measurement_json_round_trip():
    point = Measurement("grouped_mm", 12, "ok", 1.5, 4096, (1.4, 1.5, 1.6))
    assert Measurement.from_json(point.to_json()) == point


def test_points_not_run_for_being_slow_are_extrapolated_not_infeasible():
    points = [*_points("a", [1, 2, 4], lambda n: 10.0 * n), Measurement("a", 8, "slow", error="far slower")]
    model = CostModel.fit(points)
    assert model.infeasible_from("a") == float("inf")
    np.testing.assert_allclose(model.latency_ms("a", np.array([8])), [80.0])


@pytest.mark.parametrize(
    ("times", "noise"),
    [
        ((0.94, 1.0, 1.06), 0.06),  # quartiles 0.97 and 1.03 of a median of 1.0: a spread of 6 %, as b's
        ((2.0, 2.0, 2.0, 2.0), 0.0),  # identical timings at a's three points outvote b's one point of 6 %
        ((1.0,), 0.06),  # one timing per point says nothing about the spread: only b's point counts
    ],
)
def test_noise_is_the_median_spread_of_repeated_timings(times, noise):
    scale = {1: 1.0, 2: 3.0, 4: 5.0}  # each point's timings scaled alike: the spread is relative
    middle = times[len(times) // 2]
    points = [Measurement("a", n, "ok", s * middle, 100, tuple(s * t for t in times)) for n, s in scale.items()]
    points.append(Measurement("b", 1, "ok", 1.0, 100, (0.94, 1.0, 1.06)))
    assert CostModel.fit(points).noise() == pytest.approx(noise)


def test_a_model_saved_without_noise_reports_zero():
    fits = CostModel.fit(_points("a", [1, 2], lambda n: 1.0)).fits
    del fits["noise"]  # as in a joblib written before the noise estimate existed
    assert CostModel(fits).noise() == 0.0
