"""Token counts for a per-shape calibration when the device model is at hand: sparse where the choice is clear,
dense where the device model predicts a crossover.

The default grid (1, 2, 3, 4, 6, 8, ..., 4096: 24 counts) spends most of its points where one backend clearly wins.
With a device model of the device, dtype and compile mode, `calibrate --model` measures instead

- a skeleton: the powers of 16 up to the grid's end (1, 16, 256, 4096), where the cost model's interpolation in
  log-log space is anchored;
- around each region boundary of the table the device model predicts for the shape (a predicted crossover), the
  grid counts that bracket it: the largest below and the smallest at or above, and one more on each side, so a
  crossover the device model misplaced by one grid step is still measured on both sides.

The measured profile then decides as any profile does: the device model only chose where to look. On the H200's
seven preset profiles this measured 3.3× fewer counts, and the tables fitted on them chose as well as the full grid's
at every count of the full grid (`python calibrate/sparse_calibration_check.py`).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence

from ..layer import LayerSpec
from .sweep import default_token_grid

logger = logging.getLogger(__name__)

# The skeleton's counts are the powers of 2 ** SKELETON_STEP_BITS (16).
SKELETON_STEP_BITS = 4
# Grid counts taken on each side of a predicted crossover.
BRACKET = 2


def skeleton(grid: Sequence[int]) -> list[int]:
    """The powers of 16 in `grid`, and its first and last counts."""
    powers = [n for n in grid if n & (n - 1) == 0 and (n.bit_length() - 1) % SKELETON_STEP_BITS == 0]
    return sorted({grid[0], *powers, grid[-1]})


def crossover_tokens(table, grid: Sequence[int] | None = None) -> list[int]:
    """The token counts to measure for a shape whose device-model table is `table` (see the module docstring).

    Args:
        table (`DecisionTable`): the device model's table for the shape.
        grid (`Sequence[int]`, *optional*): the counts to choose from (default: `default_token_grid()`).
    """
    grid = sorted(grid or default_token_grid())
    chosen = set(skeleton(grid))
    for region in table.regions[1:]:
        if region.first > grid[-1]:
            break
        at = bisect.bisect_left(grid, region.first)  # grid[at] is the first count at or above the boundary
        chosen.update(grid[max(0, at - BRACKET) : at + BRACKET])
    return sorted(chosen)


def device_model_tokens(spec: LayerSpec, device_name: str, compile_mode: str, candidates: list[str], budget: float):
    """The counts to measure for `spec`, and the device model that chose them; `(None, None)` without one."""
    from ..device_profile import find_device_profile
    from ..selection import device_model_table
    from ..store import search_dirs

    found = find_device_profile(device_name, spec.dtype, compile_mode, search_dirs())
    if found is None or not set(candidates) & set(found.model.backends):
        return None, None
    table = device_model_table(spec, found.model.for_spec(spec), candidates, budget)
    tokens = crossover_tokens(table)
    logger.info(
        "device model %s predicts %s: measuring %d token counts around its crossovers instead of the %d of the grid",
        found.json_path,
        ", ".join(f"{r.first}+ {r.backend}" for r in table.regions),
        len(tokens),
        len(default_token_grid()),
    )
    return tokens, found
