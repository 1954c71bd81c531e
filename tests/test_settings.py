"""Parsing of the memory budget setting, and a malformed `AUTOEXPERTS_MEMORY_BUDGET` reported once, clearly."""

import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import autoexperts
from autoexperts import settings
from autoexperts.settings import memory_budget_setting, parse_memory_budget


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8GiB", ("bytes", 8 * 2**30)),  # binary unit
        ("1.5GiB", ("bytes", 1.5 * 2**30)),  # a fractional size with its unit
        ("512MB", ("bytes", 512e6)),  # decimal unit
        ("1e9", ("bytes", 1e9)),  # a bare number too large to be anything but bytes
        (" 2 gib ", ("bytes", 2 * 2**30)),  # spaces and lower case
        ("0.5", ("fraction", 0.5)),  # bare number up to 1: fraction of free memory
        ("1", ("fraction", 1.0)),  # all the free memory
        (2**30, ("bytes", 2**30)),  # Python int
        (0.25, ("fraction", 0.25)),  # Python float
    ],
)
def test_parse_memory_budget(text, expected):
    assert parse_memory_budget(text) == expected


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("1.5", "add a unit, e.g. '1.5GiB'"),  # read as 1.5 bytes until now
        ("8", "add a unit"),  # 8 bytes? 8 GB?
        (4096.0, "add a unit"),  # the same from Python
        ("banana", "neither a size"),
        ("", "neither a size"),
        ("8 parsecs", "neither a size"),
        ("GiB", "neither a size"),
        ("1.2.3", "neither a size"),
        ("-1", "must be positive"),
        ("-2GiB", "must be positive"),
        ("0", "positive, finite"),
        ("0GiB", "positive, finite"),
        (float("nan"), "positive, finite"),
        (float("inf"), "positive, finite"),
    ],
)
def test_parse_memory_budget_rejects(text, says):
    with pytest.raises(ValueError, match="memory budget") as error:
        parse_memory_budget(text)
    assert says in str(error.value) and "\n" not in str(error.value)


@pytest.fixture
def fresh_reports(monkeypatch):
    monkeypatch.setattr(settings, "_reported_values", set())


@pytest.mark.parametrize("value", ["1.5", "banana", "0", "-1"])
def test_malformed_environment_budget_warns_once_and_uses_the_default(value, monkeypatch, fresh_reports):
    monkeypatch.setenv("AUTOEXPERTS_MEMORY_BUDGET", value)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = memory_budget_setting()
        second = memory_budget_setting()
    assert first == second == ("fraction", 0.8)
    messages = [str(w.message) for w in caught if issubclass(w.category, autoexperts.SettingWarning)]
    assert len(messages) == 1
    assert messages[0].startswith(f"AUTOEXPERTS_MEMORY_BUDGET: memory budget {value!r}") and "default" in messages[0]


def test_strict_reading_raises_naming_the_variable(monkeypatch):
    monkeypatch.setenv("AUTOEXPERTS_MEMORY_BUDGET", "plenty")
    with pytest.raises(ValueError, match=r"^AUTOEXPERTS_MEMORY_BUDGET: memory budget 'plenty'"):
        memory_budget_setting(strict=True)


@pytest.mark.parametrize("value", ["", "  "])
def test_empty_environment_budget_is_the_default(value, monkeypatch):
    monkeypatch.setenv("AUTOEXPERTS_MEMORY_BUDGET", value)
    assert memory_budget_setting(strict=True) == ("fraction", 0.8)


def test_malformed_environment_budget_is_one_line_at_the_first_forward():
    # One warning line when the first table is built, not an 80-line traceback (and nothing at import, where the
    # CLI, which exits with its own one line, could not show it as one line).
    script = (
        "import autoexperts\n"
        "print('imported', flush=True)\n"
        "from tests.conftest import tiny_model, logits_with, random_input_ids\n"
        "logits_with(tiny_model('mixtral'), random_input_ids(1, 3), 'auto')\n"
        "logits_with(tiny_model('mixtral'), random_input_ids(1, 4), 'auto')\n"
    )
    result = subprocess.run(
        [sys.executable, "-W", "default", "-W", "ignore::autoexperts.ProfileMissingWarning", "-c", script],
        env={**_environment(), "AUTOEXPERTS_MEMORY_BUDGET": "1.5"},
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],  # where `tests.conftest` imports from
    )
    lines = [line for line in result.stderr.splitlines() if "AUTOEXPERTS_MEMORY_BUDGET" in line]
    assert len(lines) == 1 and "SettingWarning" in lines[0] and "'1.5GiB'" in lines[0], result.stderr
    assert "Traceback" not in result.stderr and result.stdout.startswith("imported")


def _environment() -> dict:
    import os

    return {key: value for key, value in os.environ.items() if not key.startswith("AUTOEXPERTS_")}


def test_set_memory_budget_rejects_an_ambiguous_number():
    with pytest.raises(ValueError, match="add a unit"):
        autoexperts.set_memory_budget(1.5)


def test_a_forward_with_a_malformed_budget_runs_under_the_default(monkeypatch, profile_dir, fresh_reports):
    import torch

    from autoexperts.device import free_memory_bytes
    from tests.conftest import logits_with, random_input_ids, tiny_model

    monkeypatch.setenv("AUTOEXPERTS_MEMORY_BUDGET", "banana")
    model = tiny_model("olmoe")
    with warnings.catch_warnings(record=True) as caught, autoexperts.record_decisions() as decisions:
        warnings.simplefilter("always")
        auto = logits_with(model, random_input_ids(1, 4), "auto")
    assert [w for w in caught if issubclass(w.category, autoexperts.SettingWarning)]
    assert decisions and all(
        0 < d.budget_bytes <= 0.8 * free_memory_bytes(torch.device("cpu")) * 1.1 for d in decisions
    )
    torch.testing.assert_close(auto, logits_with(model, random_input_ids(1, 4), "eager"), rtol=1e-4, atol=1e-5)
