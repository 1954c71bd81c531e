"""What the validation scripts in this folder share: a calibration's measurements by token count, and how a check's
result is written. Not part of the package: these scripts check past work against committed results."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path

from autoexperts.cost_model import Status


def measured_by_tokens(measurements: Iterable) -> dict[int, dict[str, tuple[str, float | None]]]:
    """`count -> backend -> (status, median ms)` of a calibration's measurements, at the counts where some backend
    was timed."""
    by_tokens: dict[int, dict[str, tuple[str, float | None]]] = {}
    for m in measurements:
        by_tokens.setdefault(m.num_tokens, {})[m.backend] = (m.status, m.median_ms)
    return {n: p for n, p in sorted(by_tokens.items()) if any(s == Status.OK and ms for s, ms in p.values())}


def write_result(result: dict, text: str, out: Path | None) -> None:
    """Prints a check's Markdown and, with `out`, writes its JSON there and the Markdown beside it."""
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        out.with_suffix(".md").write_text(text, encoding="utf-8")
    sys.stdout.write(text)
