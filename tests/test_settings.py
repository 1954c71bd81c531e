"""Parsing of the memory budget setting."""

import pytest

from autoexperts.settings import parse_memory_budget


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8GiB", ("bytes", 8 * 2**30)),  # binary unit
        ("512MB", ("bytes", 512e6)),  # decimal unit
        ("1e9", ("bytes", 1e9)),  # bare number above 1: bytes
        (" 2 gib ", ("bytes", 2 * 2**30)),  # spaces and lower case
        ("0.5", ("fraction", 0.5)),  # bare number up to 1: fraction of free memory
        ("1", ("fraction", 1.0)),  # all the free memory
        (2**30, ("bytes", 2**30)),  # Python int
        (0.25, ("fraction", 0.25)),  # Python float
    ],
)
def test_parse_memory_budget(text, expected):
    assert parse_memory_budget(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "8 parsecs", "-1", "0", "GiB", "1.2.3"])
def test_parse_memory_budget_rejects(text):
    with pytest.raises(ValueError, match="memory budget"):
        parse_memory_budget(text)


def test_malformed_environment_budget_names_the_variable(monkeypatch):
    from autoexperts.settings import memory_budget_setting

    monkeypatch.setenv("AUTOEXPERTS_MEMORY_BUDGET", "plenty")
    with pytest.raises(ValueError, match=r"^AUTOEXPERTS_MEMORY_BUDGET: memory budget 'plenty'"):
        memory_budget_setting()
