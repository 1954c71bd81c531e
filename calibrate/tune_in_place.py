"""`autoexperts.tune` on the benchmark's model, in place: a warm-up inside the block, what it measured and how long the
tuning took. The GPU suite's tune step (its sibling `tune_check.py` also calibrates and benchmarks).

The model is the preset's architecture with its real layer shapes, 2 decoder layers and random weights (as `autoexperts
bench` builds it). The warm-up is `generate()` at batch 1 and at `--batch-size`, so the experts calls it records are
those of a prefill and of decode steps of both. After the block, one more `generate()` at `--batch-size` records the
backends `auto` then runs from the tuned profile (`auto` reads only the tuned profiles' folder here). Prints one JSON
line and writes it to `<out>/tune-in-place.json`.

    python calibrate/tune_in_place.py --model qwen1.5-moe-a2.7b --device cuda --dtype bfloat16 --out DIR
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

import autoexperts
from autoexperts.bench.model_bench import build_bench_model
from autoexperts.calibration.model_source import resolve_model
from autoexperts.calibration.run import resolve_device, resolve_dtype
from autoexperts.device import synchronize

VOCAB_SIZE = 1024


def _generate(model: torch.nn.Module, batch: int, prompt_length: int, new_tokens: int) -> None:
    generator = torch.Generator().manual_seed(batch)
    device = next(model.parameters()).device
    input_ids = torch.randint(VOCAB_SIZE, (batch, prompt_length), generator=generator).to(device)  # (batch, prompt)
    model.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
        min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
    )  # fmt: skip
    synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen1.5-moe-a2.7b")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore", autoexperts.ProfileWarning)
    tuned = args.out / "tuned"
    os.environ[autoexperts.settings.PROFILE_DIR_ENV] = str(tuned)  # auto reads what tune writes, and nothing else
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    model = build_bench_model(resolve_model(args.model).config, device, dtype, 2, VOCAB_SIZE)
    model.set_experts_implementation("auto")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with torch.inference_mode(), autoexperts.tune(model, out=tuned) as report:
        for batch in (1, args.batch_size):
            _generate(model, batch, args.prompt_length, args.new_tokens)
        warm_up_seconds = time.perf_counter() - started
        tune_started = time.perf_counter()
    tune_seconds = time.perf_counter() - tune_started
    with torch.inference_mode(), autoexperts.record_decisions() as decisions:
        _generate(model, args.batch_size, args.prompt_length, args.new_tokens)
    ran = collections.Counter((d.num_tokens, d.backend, d.source) for d in decisions)
    result = {
        "model": args.model,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "warm_up_seconds": round(warm_up_seconds, 2),
        "tune_seconds": round(tune_seconds, 2),
        "layers": [
            {
                "summary": layer.summary(),
                "calls_by_tokens": layer.calls_by_tokens,
                "tokens_measured": layer.tokens_measured,
                "profile": str(layer.profile),
            }
            for layer in report.layers
        ],
        "after": [{"num_tokens": n, "backend": b, "source": s, "calls": c} for (n, b, s), c in sorted(ran.items())],
    }
    line = json.dumps(result)
    print(line)
    (args.out / "tune-in-place.json").write_text(line + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
