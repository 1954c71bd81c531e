"""Per-shape calibration guided by the device model: the counts it measures, and calibrate() taking them."""

import json

import pytest

from autoexperts.calibration.adaptive import crossover_tokens, skeleton
from autoexperts.calibration.run import calibrate
from autoexperts.calibration.sweep import default_token_grid
from autoexperts.cli import main
from autoexperts.selection import device_model_table
from autoexperts.table import DecisionTable, Region
from tests.conftest import layer_spec, tiny_model
from tests.test_device_model import BACKENDS, save_synthetic_device_model

GRID = default_token_grid()  # 1, 2, 3, 4, 6, 8, 12, 16, ..., 3072, 4096


def _table(*firsts_and_backends):
    """A table whose regions start at the given counts (the first at 1)."""
    firsts = [first for first, _ in firsts_and_backends]
    lasts = [*(f - 1 for f in firsts[1:]), float("inf")]
    regions = [Region(f, last, b, "device_model") for (f, b), last in zip(firsts_and_backends, lasts, strict=True)]
    return DecisionTable(None, regions, float("inf"))


def test_skeleton_is_the_powers_of_16_and_the_ends():
    assert skeleton(GRID) == [1, 16, 256, 4096]
    assert skeleton([2, 3, 16, 100]) == [2, 16, 100]  # a grid without 1 keeps its own ends


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        # one backend everywhere: the skeleton alone
        (_table((1, "grouped_mm")), [1, 16, 256, 4096]),
        # a crossover at 10 tokens: two grid counts below it (6, 8) and two at or above (12, 16)
        (_table((1, "batched_mm"), (10, "grouped_mm")), [1, 6, 8, 12, 16, 256, 4096]),
        # a crossover exactly on a grid count (12) is measured on both sides, and a second one far up
        (
            _table((1, "batched_mm"), (12, "grouped_mm"), (700, "eager")),
            [1, 6, 8, 12, 16, 256, 384, 512, 768, 1024, 4096],
        ),
        # a boundary beyond the grid adds nothing
        (_table((1, "grouped_mm"), (10_000, "eager")), [1, 16, 256, 4096]),
    ],
)
def test_crossover_tokens_bracket_each_predicted_crossover(table, expected):
    assert crossover_tokens(table, GRID) == expected


def test_calibrate_measures_around_the_device_models_crossovers(profile_dir, tmp_path):
    device_model = save_synthetic_device_model(profile_dir)
    spec = layer_spec(tiny_model("qwen3_moe"))
    table = device_model_table(spec, device_model.model.for_spec(spec), BACKENDS, float("inf"))
    expected = crossover_tokens(table)
    assert len(set(r.backend for r in table.regions)) >= 2 and len(expected) * 2 <= len(GRID), "must save points"
    folder = tmp_path / "tiny"
    tiny_model("qwen3_moe").config.save_pretrained(folder)
    # refine=False: the crossover refinement adds counts by the (noisy, 2 ms) timings; here the counts the device model
    # chose are checked, alone
    guided = calibrate(str(folder), "cpu", "float32", out=tmp_path / "out", progress=False, seconds_per_point=0.002,
                       refine=False)  # fmt: skip
    assert sorted({m.num_tokens for m in guided.measurements}) == expected
    record = json.loads(guided.json_path.read_text())
    assert record["sweep"]["tokens_chosen_by"] == str(device_model.json_path)

    # --full-grid measures the whole default grid, device model or not
    full_command = ["calibrate", "--model", str(folder), "--out", str(tmp_path / "full"), "--full-grid"]
    assert main([*full_command, "--device", "cpu", "--seconds-per-point", "0.002", "--no-progress"]) == 0
    (full,) = (tmp_path / "full").rglob("*.json")
    record = json.loads(full.read_text())
    assert record["sweep"]["tokens"] == GRID and record["sweep"]["tokens_chosen_by"] == "default grid"
