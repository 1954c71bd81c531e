"""Profiles on disk: round trip, refit without the joblib, matching, ignoring unreadable files, trust (no
unpickling outside the trusted folders), staleness, and concurrent writers."""

import hashlib
import json
import threading
import warnings

import joblib
import numpy as np
import pytest

from autoexperts import store
from autoexperts.errors import ProfileRefitWarning, ProfileSkippedWarning, ProfileWarning, StaleProfileWarning
from autoexperts.freshness import stale_reasons
from autoexperts.layer import LayerSpec
from autoexperts.profile import find_profile, load_profile, save_profile
from tests.conftest import CROSSOVER_CURVES, replace_spec, rewrite_record, synthetic_profile

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


def test_missing_joblib_is_refit_from_measurements(saved):
    profile, json_path = saved
    json_path.with_suffix(".joblib").unlink()
    with pytest.warns(ProfileRefitWarning, match="is missing"):
        loaded = load_profile(json_path, trusted=True)
    assert loaded.model_source.startswith("refit")
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


def test_unreadable_profile_is_skipped_with_a_warning(saved, tmp_path):
    profile, json_path = saved
    (json_path.parent / "broken.json").write_text("{not json")
    with pytest.warns(ProfileSkippedWarning, match=r"broken\.json: invalid JSON"):
        found = find_profile(SPEC, profile.device_name, "none", [tmp_path])
    assert found is not None and found.json_path == json_path


def test_first_folder_wins(tmp_path):
    first, second = tmp_path / "user", tmp_path / "shipped"
    save_profile(synthetic_profile(SPEC, CROSSOVER_CURVES), second)
    path = save_profile(synthetic_profile(SPEC, CROSSOVER_CURVES), first)
    found = find_profile(SPEC, synthetic_profile(SPEC, CROSSOVER_CURVES).device_name, "none", [first, second])
    assert found.json_path == path


def _profile_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, ProfileWarning)]


@pytest.fixture
def trusted(profile_dir):
    """A profile saved in the (trusted) user profile folder."""
    profile = synthetic_profile(SPEC, CROSSOVER_CURVES)
    return profile, save_profile(profile, profile_dir)


def _garbage_pickle(json_path):
    """A well-formed pickle of the wrong object, with a matching checksum: only its content gives it away."""
    model_path = json_path.with_suffix(".joblib")
    joblib.dump({"format": 1, "backends": {"grouped_mm": "not an estimator"}}, model_path)
    rewrite_record(json_path, cost_model__sha256=hashlib.sha256(model_path.read_bytes()).hexdigest())


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda p: p.with_suffix(".joblib").unlink(), "is missing"),  # missing joblib beside a good JSON
        (lambda p: p.with_suffix(".joblib").write_bytes(b""), "does not match"),  # empty joblib
        (  # truncated joblib
            lambda p: p.with_suffix(".joblib").write_bytes(p.with_suffix(".joblib").read_bytes()[:40]),
            "does not match",
        ),
        (lambda p: p.with_suffix(".joblib").write_bytes(b"\x80\x04garbage" * 9), "does not match"),  # garbage
        (  # garbage in a profile written before checksums: unpickling fails
            lambda p: (p.with_suffix(".joblib").write_bytes(b"garbage"), rewrite_record(p, cost_model__sha256=None)),
            "cannot be loaded",
        ),
        (_garbage_pickle, "cannot be loaded"),  # a pickle of another object
        (lambda p: rewrite_record(p, versions={"scikit-learn": "0.0.1"}), "scikit-learn 0.0.1"),  # another sklearn
    ],
)
def test_damaged_joblib_is_refit_with_one_warning(trusted, damage, reason):
    profile, json_path = trusted
    damage(json_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = find_profile(SPEC, profile.device_name, "none", store.search_dirs())
        find_profile(SPEC, profile.device_name, "none", store.search_dirs())  # a second look warns no more
    messages = _profile_warnings(caught)
    assert len(messages) == 1 and str(json_path) in messages[0] and reason in messages[0], messages
    assert loaded is not None and loaded.model_source.startswith("refit")
    tokens = np.array([1, 5, 77, 3000])
    for backend in profile.cost_model.backends:
        np.testing.assert_allclose(
            loaded.cost_model.latency_ms(backend, tokens), profile.cost_model.latency_ms(backend, tokens)
        )


def test_inconsistent_sklearn_version_warning_means_refit(trusted, monkeypatch):
    from sklearn.exceptions import InconsistentVersionWarning

    _, json_path = trusted
    real_load = joblib.load

    def load_with_warning(source):
        warnings.warn(
            InconsistentVersionWarning(
                estimator_name="IsotonicRegression", current_sklearn_version="9", original_sklearn_version="1"
            ),
            stacklevel=2,
        )
        return real_load(source)

    monkeypatch.setattr(joblib, "load", load_with_warning)  # store.py imports joblib when it loads a model
    with pytest.warns(ProfileRefitWarning, match="InconsistentVersionWarning"):
        loaded = load_profile(json_path)
    assert loaded.model_source.startswith("refit")


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"schema_version": 2}, "newer than"),  # a schema version from the future
        ({"kind": "something-else"}, "not an autoexperts profile"),  # a foreign JSON
        ({"device__name": "Another CPU"}, "measured on 'Another CPU'"),  # another device, at this device's place
        ({"dtype": "bfloat16"}, "dtype 'bfloat16'"),  # another dtype, under this dtype's file name
        ({"experts__num_experts": 16}, "num_experts 16"),  # another expert shape
        ({"compile_mode": "default"}, "compile mode 'default'"),  # another compile mode
        ({"measurements": []}, "no successful measurement"),  # nothing to fit
    ],
)
def test_foreign_or_future_profile_is_skipped_with_one_warning(trusted, changes, reason):
    profile, json_path = trusted
    rewrite_record(json_path, **changes)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert find_profile(SPEC, profile.device_name, "none", store.search_dirs()) is None
        assert find_profile(SPEC, profile.device_name, "none", store.search_dirs()) is None
    messages = _profile_warnings(caught)
    assert len(messages) == 1 and str(json_path) in messages[0] and reason in messages[0], messages


def test_profiles_of_other_layers_elsewhere_are_passed_over_silently(profile_dir):
    other = replace_spec(SPEC, num_experts=16)
    save_profile(synthetic_profile(other, CROSSOVER_CURVES), profile_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert find_profile(SPEC, synthetic_profile(SPEC, {}).device_name, "none", store.search_dirs()) is None
    assert _profile_warnings(caught) == []


# Trust: a joblib is unpickled only inside the trusted folders.


def _forbid_unpickling(monkeypatch):
    def refuse(_source):
        raise AssertionError("a joblib outside the trusted folders was unpickled")

    monkeypatch.setattr(joblib, "load", refuse)


def test_profile_outside_trusted_folders_is_refit_not_unpickled(saved, profile_dir, monkeypatch):
    profile, json_path = saved  # under tmp_path, not under the configured profile folder
    _forbid_unpickling(monkeypatch)
    assert not store.is_trusted(json_path)
    loaded = load_profile(json_path)
    assert loaded.model_source == "refit: outside the trusted folders, not unpickled"
    tokens = np.array([1, 9, 500])
    np.testing.assert_allclose(
        loaded.cost_model.latency_ms("batched_mm", tokens), profile.cost_model.latency_ms("batched_mm", tokens)
    )


def test_trusted_folder_unpickles(trusted, monkeypatch):
    _, json_path = trusted
    calls = []
    real_load = joblib.load
    monkeypatch.setattr(joblib, "load", lambda f: calls.append(f) or real_load(f))
    assert load_profile(json_path).model_source == "joblib" and len(calls) == 1


def test_symlink_out_of_the_trusted_folder_is_not_followed(saved, profile_dir, monkeypatch):
    profile, json_path = saved
    profile_dir.mkdir(parents=True, exist_ok=True)
    (profile_dir / json_path.parent.name).symlink_to(json_path.parent, target_is_directory=True)
    _forbid_unpickling(monkeypatch)
    found = find_profile(SPEC, profile.device_name, "none", store.search_dirs())
    assert found is not None and found.model_source.startswith("refit: outside")


def test_model_file_name_cannot_point_elsewhere(trusted, monkeypatch):
    _, json_path = trusted
    rewrite_record(json_path, cost_model__file="../../elsewhere.joblib")
    _forbid_unpickling(monkeypatch)
    with pytest.warns(ProfileRefitWarning, match="invalid model file"):
        assert load_profile(json_path).model_source.startswith("refit")


# Staleness.


@pytest.mark.parametrize(
    ("record", "stale"),
    [
        ({"versions": {}}, []),  # nothing recorded: not held against the profile
        ({"versions": {"torch": "0.0.1"}}, ["torch 0.0.1"]),  # another torch
        ({"versions": {"transformers": "4.0.0"}}, ["transformers 4.0.0"]),  # another transformers
        ({"versions": {"scikit-learn": "0.0.1"}}, []),  # scikit-learn only matters for the joblib (refit)
        ({"device": {"type": "cuda", "gpu_driver": "535.0"}}, ["GPU driver 535.0 (running 550.54.15)"]),  # driver
        ({"device": {"type": "cuda", "gpu_driver": "550.54.15"}}, []),  # same driver
        # On CPU, glibc's allocator settings move the crossovers (this process runs with glibc's defaults here):
        ({"device": {"type": "cpu", "allocator_settings": {"MALLOC_TRIM_THRESHOLD_": "4294967296"}}},
         ["allocator settings MALLOC_TRIM_THRESHOLD_=4294967296 (running glibc's defaults)"]),  # measured pinned
        ({"device": {"type": "cpu", "allocator_settings": {}}}, []),  # measured with the defaults too
        ({"device": {"type": "cpu"}}, []),  # not recorded: not held against the profile
        ({"device": {"type": "cuda", "allocator_settings": {"MALLOC_TRIM_THRESHOLD_": "1"}}}, []),  # not the GPU's
    ],
)  # fmt: skip
def test_stale_reasons(record, stale, monkeypatch):
    from autoexperts import freshness

    monkeypatch.setattr(freshness, "gpu_driver_version", lambda device_type: "550.54.15")
    monkeypatch.setattr(freshness, "allocator_settings", dict)
    reasons = stale_reasons(record)
    assert len(reasons) == len(stale) and all(r.startswith(s) for r, s in zip(reasons, stale, strict=True))


@pytest.mark.parametrize(("policy", "used"), [("use", True), ("fallback", False)])
def test_stale_profile_policy(trusted, policy, used):
    profile, json_path = trusted
    rewrite_record(json_path, versions__torch="0.0.1")
    with pytest.warns(StaleProfileWarning, match=r"torch 0\.0\.1"):
        found = find_profile(SPEC, profile.device_name, "none", store.search_dirs(), stale_policy=policy)
    assert (found is not None) == used
    if used:
        assert found.stale and found.stale[0].startswith("torch 0.0.1")


def test_report_marks_stale_profiles(trusted):
    from autoexperts.report import describe_profile

    _, json_path = trusted
    rewrite_record(json_path, versions__transformers="4.0.0")
    text = describe_profile(load_profile(json_path), 2**30, "fixed")
    assert "STALE" in text and "transformers 4.0.0" in text
    assert "STALE" not in describe_profile(synthetic_profile(SPEC, CROSSOVER_CURVES), 2**30, "fixed")


# Recalibrating: a save keeps the profile it replaces.


def _pair(json_path):
    return json_path.read_bytes(), json_path.with_suffix(".joblib").read_bytes()


def test_first_save_replaces_nothing(trusted):
    profile, json_path = trusted
    assert profile.replaced is None
    assert sorted(p.name for p in json_path.parent.iterdir()) == [json_path.stem + ".joblib", json_path.name]


def test_resave_keeps_the_replaced_profile_recoverable(trusted, profile_dir):
    full, json_path = trusted
    before = _pair(json_path)
    fewer = synthetic_profile(SPEC, CROSSOVER_CURVES, tokens=(1, 2))
    assert save_profile(fewer, profile_dir) == json_path
    backup = json_path.with_name(json_path.stem + ".previous.json")
    assert fewer.replaced == store.Replaced(backup, len(full.measurements), (1, 128))
    assert _pair(backup) == before  # byte for byte, so renaming both back restores the old profile exactly

    # auto's search and show's listing read the new profile only; the backup loads on its own, from its own joblib.
    assert store.profile_files(store.search_dirs()) == [json_path]
    found = find_profile(SPEC, fewer.device_name, "none", store.search_dirs())
    assert found.json_path == json_path and found.measurements == fewer.measurements
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProfileWarning)
        kept = load_profile(backup)
    assert kept.model_source == "joblib" and kept.measurements == full.measurements

    backup.replace(json_path)
    backup.with_suffix(".joblib").replace(json_path.with_suffix(".joblib"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProfileWarning)
        restored = find_profile(SPEC, fewer.device_name, "none", store.search_dirs())
    assert restored.model_source == "joblib" and restored.measurements == full.measurements


def test_the_backup_holds_the_profile_just_replaced(trusted, profile_dir):
    _, json_path = trusted
    second = synthetic_profile(SPEC, CROSSOVER_CURVES, tokens=(1, 2, 4))
    save_profile(second, profile_dir)
    after_second = _pair(json_path)
    third = synthetic_profile(SPEC, CROSSOVER_CURVES, tokens=(1, 2))
    save_profile(third, profile_dir)
    assert third.replaced.points == len(second.measurements) and third.replaced.tokens == (1, 4)
    assert _pair(third.replaced.backup) == after_second  # one generation
    assert len(list(json_path.parent.iterdir())) == 4


@pytest.mark.parametrize(
    ("damage", "points"),
    [
        (lambda p: p.write_text("{not json"), None),  # an unreadable JSON at this place is kept all the same
        (lambda p: p.with_suffix(".joblib").unlink(), 24),  # no joblib (24 points kept): the backup has none either
    ],
)
def test_a_damaged_profile_is_backed_up_as_it_is(trusted, profile_dir, damage, points):
    _, json_path = trusted
    damage(json_path)
    old_json, had_joblib = json_path.read_bytes(), json_path.with_suffix(".joblib").exists()
    replacement = synthetic_profile(SPEC, CROSSOVER_CURVES, tokens=(1, 2))
    save_profile(replacement, profile_dir)
    backup = replacement.replaced.backup
    assert replacement.replaced.points == points and backup.read_bytes() == old_json
    assert backup.with_suffix(".joblib").exists() == had_joblib


# Concurrent writers.


def test_concurrent_saves_leave_one_whole_profile(profile_dir):
    # Each writer's measurements differ, so a JSON paired with another writer's joblib would show.
    candidates = [
        synthetic_profile(SPEC, {"grouped_mm": (lambda n, k=k: 1.0 + k + 0.01 * n, lambda n: 1000 * n)})
        for k in range(6)
    ]
    barrier = threading.Barrier(len(candidates))

    def write(profile):
        barrier.wait()
        for _ in range(10):
            save_profile(profile, profile_dir)

    threads = [threading.Thread(target=write, args=(p,)) for p in candidates]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    json_path = next(p for p in profile_dir.rglob("*.json") if not p.name.endswith(".previous.json"))
    backup = json_path.with_name(json_path.stem + ".previous.json")
    pairs = [json_path, json_path.with_suffix(".joblib"), backup, backup.with_suffix(".joblib")]
    files = sorted(p.name for p in profile_dir.rglob("*") if p.is_file())
    assert files == sorted(p.name for p in pairs)  # the profile and its backup; no temporary or lock files
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProfileWarning)
        loaded, kept = load_profile(json_path), load_profile(backup)
    assert loaded.model_source == kept.model_source == "joblib"  # each pair is whole
    assert loaded.measurements in [p.measurements for p in candidates]
    assert kept.measurements in [p.measurements for p in candidates]


def test_interrupted_write_leaves_the_old_file_whole(tmp_path, monkeypatch):
    target = tmp_path / "profile.json"
    target.write_bytes(b"old and whole")

    def interrupted_fsync(_fd):
        raise KeyboardInterrupt  # Ctrl-C after the new bytes went to the temporary file

    monkeypatch.setattr(store.os, "fsync", interrupted_fsync)
    with pytest.raises(KeyboardInterrupt):
        store.atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old and whole" and [p.name for p in tmp_path.iterdir()] == ["profile.json"]
