"""`autoexperts.tune` against `autoexperts calibrate` on this machine: how long each takes, and how well each picks.

    flock /tmp/cpu-measure.lock python calibrate/tune_check.py --model MODEL --out OUT

1. `autoexperts calibrate --model MODEL --out OUT/cli` (as a user runs it; on CPU with `--pin-allocator`): its wall
   time. Steps 1 and 2 alternate, `--rounds` times each (medians).
2. In a fresh process, the model's architecture with 2 decoder layers and random weights (the benchmark's model),
   one `generate_batch` of a seeded warm-up trace (requests with log-uniform prompt lengths, as a server sees them)
   inside `autoexperts.tune(model, out=OUT/tuned)`: the time the block's end takes (the tuning) beside the
   warm-up's own time, and what it measured.
3. `autoexperts bench --parts sweep --profile-dir OUT/tuned --compare-profile-dir OUT/cli --tokens HELD_OUT`: `auto`
   with the tuned profile against every fixed backend at token counts that neither calibration's grid nor the
   warm-up ran, and the CLI profile's picks read off the same timings.

Writes OUT/tune-check.json and OUT/tune-check.md. Targets (the issue's): tuning <= 1.2x the CLI calibration's wall
time; on the held-out counts `auto` <= 1.03x the oracle, and the tuned picks within 2 % of the CLI profile's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

TUNE_OVER_CALIBRATE = 1.2
AUTO_OVER_ORACLE = 1.03
TUNED_OVER_CLI_PICKS = 1.02


def _run(command: list[str]) -> float:
    """Runs `command` (its output shown), returns its wall time; exits on failure."""
    print("+", " ".join(command), flush=True)
    started = time.perf_counter()
    completed = subprocess.run(command, check=False)
    if completed.returncode:
        sys.exit(f"tune_check.py: {' '.join(command[:4])} ... failed with status {completed.returncode}")
    return time.perf_counter() - started


def warm_up_trace(requests: int, seed: int, vocab_size: int) -> list[list[int]]:
    """`requests` prompts with log-uniform lengths over 16-1024 tokens, seeded."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    lengths = torch.exp(torch.empty(requests).uniform_(math.log(16), math.log(1024), generator=generator)).long()
    return [torch.randint(1, vocab_size, (int(n),), generator=generator).tolist() for n in lengths]


def tune_step(args: argparse.Namespace) -> None:
    """Step 2, in its own process (prints one JSON line)."""
    import warnings

    import torch
    from transformers import ContinuousBatchingConfig, GenerationConfig

    import autoexperts
    from autoexperts.bench.model_bench import build_bench_model
    from autoexperts.calibration.model_source import resolve_model

    warnings.simplefilter("ignore", autoexperts.ProfileWarning)
    if args.device == "cpu":
        autoexperts.pin_cpu_allocator()
    device = torch.device(args.device)
    model = build_bench_model(resolve_model(args.model).config, device, torch.float32, 2, 1024)
    prompts = warm_up_trace(args.requests, args.seed, 1024)
    config = GenerationConfig(max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    batching = ContinuousBatchingConfig(max_batch_tokens=args.max_batch_tokens)
    started = time.perf_counter()
    with autoexperts.tune(model, out=args.tuned) as report:
        model.generate_batch(prompts, generation_config=config, continuous_batching_config=batching)
        warm_up_seconds = time.perf_counter() - started
        tune_started = time.perf_counter()
    tune_seconds = time.perf_counter() - tune_started
    (layer,) = report.layers
    print(
        json.dumps(
            {
                "warm_up_seconds": warm_up_seconds,
                "tune_seconds": tune_seconds,
                "prompt_lengths": [len(p) for p in prompts],
                "calls_by_tokens": layer.calls_by_tokens,
                "tokens_measured": layer.tokens_measured,
                "profile": str(layer.profile),
                "summary": layer.summary(),
            }
        )
    )


def held_out_counts(cli_grid: list[int], tuned_grid: list[int], seen: set[int]) -> list[int]:
    """The geometric midpoints of neighbouring counts of both grids, and 1.5x the largest: counts neither
    calibration measured and the warm-up never ran."""
    grid = sorted(set(cli_grid) | set(tuned_grid))
    midpoints = {round(math.sqrt(a * b)) for a, b in itertools.pairwise(grid)} | {grid[-1] * 3 // 2}
    return sorted(n for n in midpoints if n not in grid and n not in seen and n > 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a preset, a folder with config.json, or a Hub id")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--requests", type=int, default=24, help="warm-up requests")
    parser.add_argument("--new-tokens", type=int, default=24, help="new tokens per warm-up request")
    parser.add_argument("--max-batch-tokens", type=int, default=1024, help="continuous batching's tokens per step")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=2, help="calibrate and tune runs each, alternating")
    parser.add_argument("--tune-step", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tuned", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tune_step:
        tune_step(args)
        return 0

    out = args.out.resolve()
    cli_dir, tuned_dir = out / "cli", out / "tuned"
    pin = ["--pin-allocator"] if args.device == "cpu" else []
    autoexperts = [sys.executable, "-m", "autoexperts"]
    calibrate = [*autoexperts, "calibrate", "--model", args.model, "--device", args.device, "--out", str(cli_dir),
                 "--no-progress", *pin]  # fmt: skip
    step = [sys.executable, __file__, "--tune-step", "--model", args.model, "--out", str(out), "--device", args.device,
            "--requests", str(args.requests), "--new-tokens", str(args.new_tokens), "--max-batch-tokens",
            str(args.max_batch_tokens), "--seed", str(args.seed), "--tuned", str(tuned_dir)]  # fmt: skip
    # The two alternate (C T T C ...), so that a change in the machine's load weighs on both alike; medians.
    calibrate_seconds, tunings = [], []
    for round_ in range(args.rounds):
        for which in ("calibrate", "tune") if round_ % 2 == 0 else ("tune", "calibrate"):
            if which == "calibrate":
                calibrate_seconds.append(_run(calibrate))
            else:
                print("+", " ".join(step), flush=True)
                completed = subprocess.run(step, check=True, capture_output=True, text=True)
                tunings.append(json.loads(completed.stdout.strip().splitlines()[-1]))
    tuned = {**tunings[-1], "tune_seconds_runs": [t["tune_seconds"] for t in tunings]}
    tuned["tune_seconds"] = statistics.median(tuned["tune_seconds_runs"])
    calibrate_median = statistics.median(calibrate_seconds)

    cli_profile = json.loads(next(cli_dir.rglob("*.json")).read_text())
    seen = {int(n) for n in tuned["calls_by_tokens"]}
    tokens = held_out_counts(cli_profile["sweep"]["tokens"], tuned["tokens_measured"], seen)
    bench_out = out / "bench"
    _run(
        [*autoexperts, "bench", "--model", args.model, "--device", args.device, "--parts", "sweep",
         "--profile-dir", str(tuned_dir), "--compare-profile-dir", str(cli_dir), "--tokens",
         ",".join(map(str, tokens)), "--out", str(bench_out), "--no-progress", *pin]
    )  # fmt: skip
    bench = json.loads(next(bench_out.rglob("*.json")).read_text())
    sweep = bench["layer_sweep"]
    totals = sweep["compared_profile"]["totals"]
    result = {
        "model": args.model,
        "device": bench["machine"]["device"],
        "versions": bench["versions"],
        "calibrate_seconds": calibrate_median,
        "calibrate_seconds_runs": calibrate_seconds,
        **tuned,
        "tune_over_calibrate": tuned["tune_seconds"] / calibrate_median,
        "held_out_tokens": tokens,
        "auto_over_oracle": sweep["summary"]["auto_over_oracle"],
        "tuned_picks_over_oracle": totals["profile"]["over_oracle"],
        "cli_picks_over_oracle": totals["compared"]["over_oracle"],
        "tuned_picks_over_cli_picks": totals["profile"]["total_ms"] / totals["compared"]["total_ms"],
        "bench": str(next(bench_out.rglob("*.json")).relative_to(out)),
    }
    (out / "tune-check.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    (out / "tune-check.md").write_text(markdown(result), encoding="utf-8")
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    def verdict(value: float, limit: float) -> str:
        return f"{value:.3f} (≤ {limit}: {'met' if value <= limit else '**missed**'})"

    seen = sorted(int(n) for n in result["calls_by_tokens"])
    return "\n".join(
        [
            f"# tune against calibrate: {result['model']} on {result['device']}",
            "",
            f"- torch {result['versions']['torch']}, transformers {result['versions']['transformers']}",
            f"- warm-up: {len(result['prompt_lengths'])} requests (prompts {min(result['prompt_lengths'])}–"
            f"{max(result['prompt_lengths'])} tokens) through `generate_batch` in {result['warm_up_seconds']:.1f} s; "
            f"its experts calls ran {len(seen)} token counts ({seen[0]}–{seen[-1]})",
            f"- tuned: {result['summary']}",
            "",
            "| figure | value |",
            "|---|---|",
            f"| `autoexperts calibrate` wall time, median | {result['calibrate_seconds']:.1f} s "
            f"({', '.join(f'{s:.1f}' for s in result['calibrate_seconds_runs'])}) |",
            f"| tuning (the block's end), median | {result['tune_seconds']:.1f} s "
            f"({', '.join(f'{s:.1f}' for s in result['tune_seconds_runs'])}) |",
            f"| tuning / calibrate | {verdict(result['tune_over_calibrate'], TUNE_OVER_CALIBRATE)} |",
            f"| held-out counts | {', '.join(map(str, result['held_out_tokens']))} |",
            f"| auto (tuned) / oracle, its own timing | {verdict(result['auto_over_oracle'], AUTO_OVER_ORACLE)} |",
            f"| tuned picks / oracle (same timings) | {result['tuned_picks_over_oracle']:.3f} |",
            f"| CLI profile's picks / oracle (same timings) | {result['cli_picks_over_oracle']:.3f} |",
            f"| tuned picks / CLI picks | {verdict(result['tuned_picks_over_cli_picks'], TUNED_OVER_CLI_PICKS)} |",
            "",
            f"The layer sweep's report: [{result['bench']}]({Path(result['bench']).with_suffix('.md')}).",
            "",
        ]
    )


if __name__ == "__main__":
    raise SystemExit(main())
