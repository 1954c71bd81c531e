"""`describe_profile`: its two tables, read back column by column, against the decision table they print."""

import math

import pytest

from autoexperts.layer import LayerSpec
from autoexperts.report import describe_profile, profile_table
from tests.conftest import CROSSOVER_CURVES, synthetic_profile

SPEC = LayerSpec("TinyExperts", 8, 64, 32, 2, True, False, False, False, "float32", "cpu")
BUDGET = 2.0**40

# Beyond the measured counts the budget cuts grouped_mm off at ~1.1 M tokens and eager at ~11 M: regions such as
# "1099512 – 10995116", wider than any fixed column.
WIDE_CURVES = {
    "eager": (lambda n: 0.5 + 2e-3 * n, lambda n: 100_000 * n),
    "grouped_mm": (lambda n: 1 + 1e-3 * n, lambda n: 1_000_000 * n),
    "batched_mm": (lambda n: 3 + 3e-3 * n, lambda n: 10_000 * n),
}


def _columns(header: str, row: str, names: list[str]) -> list[str]:
    """The cells of `row`, cut where each of `names` starts in `header`."""
    starts = [header.index(name) for name in names]
    return [row[start:end].strip() for start, end in zip(starts, [*starts[1:], None], strict=True)]


@pytest.mark.parametrize(
    ("curves", "tokens"),
    [
        (CROSSOVER_CURVES, (1, 2, 4, 8, 16, 32, 64, 128)),  # crossover at 8 tokens; budget cut-offs past 10^9 tokens
        (WIDE_CURVES, (1, 10, 100, 1_000, 10_000, 100_000)),  # regions up to hundreds of millions of tokens
    ],
)
def test_tables_read_back_as_the_decision_table(curves, tokens):
    profile = synthetic_profile(SPEC, curves, tokens=tokens)
    table = profile_table(profile, BUDGET)
    lines = describe_profile(profile, BUDGET, "fixed").splitlines()

    header_at = lines.index(next(line for line in lines if line.startswith("tokens")))
    header, rows = lines[header_at], lines[header_at + 1 : lines.index("", header_at)]
    expected = [
        [f"{r.first} – {'∞' if math.isinf(r.last) else int(r.last)}", r.backend, r.source] for r in table.regions
    ]
    assert [_columns(header, row, ["tokens", "backend", "source"]) for row in rows] == expected
    if curves is WIDE_CURVES:
        assert len(table.regions) == 5 and table.regions[2].first > 1_000_000  # the wide case is really wide

    backends = [b for b in profile.cost_model.backends if b in table.curves]
    header_at = lines.index(next(line for line in lines if line.strip().startswith("tokens") and "backend" not in line))
    header, rows = lines[header_at], lines[header_at + 1 :]
    # The token column is right-aligned: its cell ends where its header does.
    names = [header[: header.index("tokens") + len("tokens")], *backends]
    cells = [[row[: len(names[0])].strip(), *_columns(header, row, backends)] for row in rows]
    chosen = [
        [str(n), *("*" if table.region_for(n).backend == b else " " for b in backends)] for n in sorted(set(tokens))
    ]
    assert [[c[0], *(cell[0] if cell.startswith("*") else " " for cell in c[1:])] for c in cells] == chosen
