"""The command line, end to end: calibrate -> profile -> dispatch, `show`, and clear errors on bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import autoexperts
from tests.conftest import tiny_model

pytestmark = pytest.mark.slow

FAST_SWEEP = ["--tokens", "1,2,4,8,16,32", "--seconds-per-point", "0.02", "--no-progress"]


def _cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "autoexperts", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def _main(args, capsys):
    """Runs the CLI in this process: (exit status, stdout, stderr)."""
    from autoexperts.cli import main

    try:
        status = main(list(args))
    except SystemExit as exit_:
        status = exit_.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A tiny Qwen3-MoE checkpoint folder and the profile `autoexperts calibrate` wrote for it."""
    model_dir = tmp_path_factory.mktemp("tiny-qwen3-moe")
    tiny_model("qwen3_moe", "eager").save_pretrained(model_dir)
    out = tmp_path_factory.mktemp("profiles")
    result = _cli("calibrate", "--model", str(model_dir), "--device", "cpu", "--out", str(out), *FAST_SWEEP)
    assert result.returncode == 0, result.stderr
    return model_dir, out, result


def test_calibrate_prints_table_and_writes_profile(calibrated):
    _, out, result = calibrated
    profiles = list(out.glob("*/*.json"))
    assert len(profiles) == 1 and profiles[0].with_suffix(".joblib").is_file()
    record = json.loads(profiles[0].read_text())
    assert record["experts"]["experts_class"] == "Qwen3MoeExperts" and record["experts"]["top_k"] == 2
    assert {m["num_tokens"] for m in record["measurements"]} == {1, 2, 4, 8, 16, 32}
    assert {"torch", "transformers", "scikit-learn"} <= set(record["versions"])
    assert "tokens" in result.stdout and "backend" in result.stdout
    assert f"profile written to {profiles[0]}" in result.stdout


def test_dispatch_uses_the_calibrated_profile(calibrated, monkeypatch):
    model_dir, out, _ = calibrated
    monkeypatch.setenv("AUTOEXPERTS_PROFILE_DIR", str(out))
    autoexperts.reset()
    model = AutoModelForCausalLM.from_pretrained(model_dir, experts_implementation="auto")
    try:
        with autoexperts.record_decisions() as decisions, torch.no_grad():
            model(input_ids=torch.tensor([[1, 2, 3, 4, 5]]))
    finally:
        autoexperts.reset()
    assert decisions and {d.source for d in decisions} == {"profile"}
    assert decisions[0].profile == str(next(out.glob("*/*.json")))
    assert set(decisions[0].predicted) <= {"eager", "batched_mm", "grouped_mm"}


def test_show_prints_the_decision_table(calibrated):
    _, out, _ = calibrated
    profile = next(out.glob("*/*.json"))
    result = _cli("show", str(profile))
    assert result.returncode == 0, result.stderr
    assert "Qwen3MoeExperts" in result.stdout and "1 – " in result.stdout and "∞" in result.stdout
    listed = _cli("show", env={"AUTOEXPERTS_PROFILE_DIR": str(out)})
    assert listed.returncode == 0 and str(profile) in listed.stdout


def test_presets_lists_every_preset():
    result = _cli("presets")
    assert result.returncode == 0
    assert "small-moe" in result.stdout and "deepseek-ai/DeepSeek-V3" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["calibrate", "--model", "no-such-preset"], "unknown model"),  # unknown preset
        (["calibrate", "--model", "./no/such/folder"], "unknown model"),  # missing path
        (["calibrate", "--tokens", "1,x,4"], "not a comma-separated list"),  # malformed tokens
        (["calibrate", "--tokens", "0,4"], "positive"),  # non-positive tokens
        (["calibrate", "--dtype", "float8"], "unknown dtype"),  # unknown dtype
        (["calibrate", "--backends", "eager,warp_drive"], "unknown backend"),  # unknown backend
        (["calibrate", "--seconds-per-point", "-1"], "positive"),  # bad timing budget
        (["calibrate", "--compile", "reduce-overhead"], "invalid choice"),  # a compile mode calibrate does not sweep
        (["calibrate", "--compile", "default", "--backends", "eager"], "cannot run under torch.compile"),  # eager
        (["show", "/no/such/profile.json"], "no profile at"),  # show a missing file
        (["show", "--budget", "lots"], "memory budget"),  # malformed budget
        (["frobnicate"], "invalid choice"),  # unknown command
    ],
)
def test_bad_input_exits_2_with_one_line(args, message, tmp_path, capsys):
    out = tmp_path / "out"
    extra = ["--out", str(out)] if args[0] == "calibrate" else []
    status, _, err = _main([*args, *extra], capsys)
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    assert not list(out.glob("**/*.json"))


def test_bad_input_in_a_real_process_has_no_traceback(tmp_path):
    result = _cli("calibrate", "--model", "no-such-preset", "--out", str(tmp_path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == result.stderr.strip().splitlines()[0]


def test_uncached_hub_id_offline_is_a_usage_error(tmp_path):
    result = _cli("calibrate", "--model", "some-org/uncached-moe", "--out", str(tmp_path), env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "cannot get the config of 'some-org/uncached-moe'" in result.stderr


def test_cuda_without_cuda_is_a_usage_error(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    status, _, err = _main(["calibrate", "--device", "cuda", "--out", str(tmp_path)], capsys)
    assert status == 2 and "no CUDA device" in err


def test_not_an_moe_model_is_a_usage_error(tmp_path, capsys):
    config = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 1}
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_attention_heads": 4, "vocab_size": 64}))
    status, _, err = _main(["calibrate", "--model", str(tmp_path), "--out", str(tmp_path / "out"), *FAST_SWEEP], capsys)
    assert status == 2 and "no experts layer" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("**/*.json"))


def test_unwritable_output_folder_is_a_usage_error(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    status, _, err = _main(["calibrate", "--out", str(blocker / "profiles"), *FAST_SWEEP], capsys)
    assert status == 2 and "cannot write profiles" in err
