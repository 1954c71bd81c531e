"""Profiles on disk: round trip, refit without the joblib, matching, and ignoring unreadable files."""

import json
import logging

import numpy as np
import pytest

from autoexperts.layer import LayerSpec
from autoexperts.profile import find_profile, load_profile, save_profile
from tests.conftest import CROSSOVER_CURVES, replace_spec, synthetic_profile

SPEC = LayerSpec("TinyExperts", 8, 64, 32, 2, True, False, False, False, "float32", "cpu")


@pytest.fixture
def saved(tmp_path):
    profile = synthetic_profile(SPEC, CROSSOVER_CURVES)
    return profile, save_profile(profile, tmp_path)


def test_save_writes_readable_json_and_joblib(saved):
    profile, json_path = saved
    record = json.loads(json_path.read_text())
    assert record["schema_version"] == 1 and record["kind"] == "autoexperts-profile"
    assert record["experts"]["num_experts"] == 8 and record["dtype"] == "float32"
    assert record["compile_mode"] == "none" and record["device"]["type"] == "cpu"
    assert len(record["measurements"]) == len(profile.measurements)
    assert json_path.with_suffix(".joblib").is_file()
    assert json_path.parent.name != json_path.parents[1].name  # one folder per device
    assert not list(json_path.parent.glob(".*.tmp"))  # no temporary files left


def test_load_round_trip_predicts_the_same(saved):
    profile, json_path = saved
    loaded = load_profile(json_path)
    assert loaded.spec == SPEC and loaded.measurements == profile.measurements
    tokens = np.array([1, 3, 50, 500])
    for backend in profile.cost_model.backends:
        np.testing.assert_allclose(
            loaded.cost_model.latency_ms(backend, tokens), profile.cost_model.latency_ms(backend, tokens)
        )


def test_missing_joblib_is_refit_from_measurements(saved, caplog):
    profile, json_path = saved
    json_path.with_suffix(".joblib").unlink()
    with caplog.at_level(logging.WARNING, logger="autoexperts"):
        loaded = load_profile(json_path)
    assert "Refitting" in caplog.text
    np.testing.assert_allclose(
        loaded.cost_model.latency_ms("grouped_mm", [7]), profile.cost_model.latency_ms("grouped_mm", [7])
    )


@pytest.mark.parametrize(
    "change",
    [
        {"num_experts": 16},  # another expert count
        {"top_k": 4},  # another top-k
        {"dtype": "bfloat16"},  # another dtype
        {"experts_class": "OtherExperts"},  # another experts class
    ],
)
def test_find_profile_needs_an_exact_match(saved, tmp_path, change):
    profile, _ = saved
    assert find_profile(SPEC, profile.device_name, "none", [tmp_path]) is not None
    assert find_profile(replace_spec(SPEC, **change), profile.device_name, "none", [tmp_path]) is None


def test_find_profile_needs_same_device_and_compile_mode(saved, tmp_path):
    profile, _ = saved
    assert find_profile(SPEC, "Another Device", "none", [tmp_path]) is None
    assert find_profile(SPEC, profile.device_name, "default", [tmp_path]) is None


def test_unreadable_profile_is_skipped_with_a_warning(saved, tmp_path, caplog):
    profile, json_path = saved
    (json_path.parent / "broken.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="autoexperts"):
        found = find_profile(SPEC, profile.device_name, "none", [tmp_path])
    assert found is not None and found.json_path == json_path
    assert "broken.json" in caplog.text


def test_first_folder_wins(tmp_path):
    first, second = tmp_path / "user", tmp_path / "shipped"
    save_profile(synthetic_profile(SPEC, CROSSOVER_CURVES), second)
    path = save_profile(synthetic_profile(SPEC, CROSSOVER_CURVES), first)
    found = find_profile(SPEC, synthetic_profile(SPEC, CROSSOVER_CURVES).device_name, "none", [first, second])
    assert found.json_path == path
