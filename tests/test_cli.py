"""The command line, end to end: calibrate -> profile -> dispatch, `show`, and clear errors on bad input."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

import autoexperts
from autoexperts.errors import ProfileWarning
from autoexperts.layer import LayerSpec
from autoexperts.profile import load_profile, save_profile
from tests.conftest import CROSSOVER_CURVES, synthetic_profile, tiny_model

pytestmark = pytest.mark.slow

FAST_SWEEP = ["--tokens", "1,2,4,8,16,32", "--seconds-per-point", "0.02", "--no-progress"]


def _cli_command(*args):
    return [sys.executable, "-m", "autoexperts", *args]


def _cli(*args, env=None):
    return subprocess.run(
        _cli_command(*args), capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300
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
    # Nothing else beside them: no temporary file, and no empty lock file to outlive the profile.
    assert sorted(p.name for p in profiles[0].parent.iterdir()) == [profiles[0].stem + ".joblib", profiles[0].name]
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
    # A path outside the trusted folders: its joblib is not unpickled, the cost model is refit from the JSON.
    assert "refit from the JSON measurements (outside the trusted folders" in result.stdout
    assert "STALE" not in result.stdout
    listed = _cli("show", env={"AUTOEXPERTS_PROFILE_DIR": str(out)})
    assert listed.returncode == 0 and str(profile) in listed.stdout


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({}, "no profiles in"),  # an empty folder
        ({"cpu/broken.json": "{not json"}, "no usable profiles in"),  # only an unreadable profile
        ({"cpu/other.json": '{"kind": "something-else"}'}, "no usable profiles in"),  # only a foreign JSON
    ],
)
def test_show_without_usable_profiles_says_so(files, expected, tmp_path, capsys, caplog, monkeypatch):
    from autoexperts import settings

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setenv("AUTOEXPERTS_PROFILE_DIR", str(tmp_path))
    monkeypatch.setattr(settings, "shipped_profile_dir", lambda: tmp_path / "no-shipped-profiles")
    status, out, _ = _main(["show"], capsys)
    assert status == 0
    assert out.strip() == f"{expected} {tmp_path}, {tmp_path / 'no-shipped-profiles'}; run: autoexperts calibrate"
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [f"skipping {tmp_path / n}" for n in files]


@pytest.mark.parametrize(
    "budget_args",
    [
        [],  # the environment's budget
        ["--budget", "1GiB"],  # one given on the command line
    ],
)
def test_show_lists_this_machine_first_and_budgets_only_its_devices(budget_args, profile_dir, capsys, monkeypatch):
    from autoexperts import settings
    from autoexperts.device import cpu_model_name

    monkeypatch.setattr(settings, "shipped_profile_dir", lambda: profile_dir / "no-shipped-profiles")
    spec = LayerSpec("TinyExperts", 8, 64, 32, 2, True, False, False, False, "float32", "cpu")
    here = synthetic_profile(spec, CROSSOVER_CURVES)
    gpu_spec = dataclasses.replace(spec, dtype="bfloat16", device_type="cuda")
    elsewhere = dataclasses.replace(here, spec=gpu_spec, device_name="NVIDIA H200")
    save_profile(elsewhere, profile_dir)  # saved first: a listing by file age alone would put it first
    save_profile(here, profile_dir)

    status, text, _ = _main(["show", *budget_args], capsys)
    assert status == 0
    headers = [line for line in text.splitlines() if line.startswith("== ")]
    assert headers == [
        f"== {cpu_model_name()}: this machine's cpu",
        "== NVIDIA H200: another machine (no memory budget)",
    ]
    ours, theirs = text.split(headers[1])
    assert f"profile   {here.json_path}" in ours and f"profile   {elsewhere.json_path}" in theirs
    budgets = [line for line in text.splitlines() if line.startswith("budget")]
    expected = "(fixed)" if budget_args else "of the free memory of this machine's cpu"
    assert len(budgets) == 2 and expected in budgets[0]
    assert budgets[1] == "budget    none applied: another machine's device"


def test_recalibrating_says_what_it_replaces_and_keeps_it(calibrated, tmp_path, capsys, monkeypatch):
    from autoexperts import settings

    model_dir, out, _ = calibrated
    folder = tmp_path / "profiles"
    shutil.copytree(out, folder)
    json_path = next(folder.glob("*/*.json"))
    before = json_path.read_bytes(), json_path.with_suffix(".joblib").read_bytes()
    fewer = ["--tokens", "1,2", "--backends", "batched_mm", "--seconds-per-point", "0.01", "--no-progress"]
    status, text, err = _main(
        ["calibrate", "--model", str(model_dir), "--device", "cpu", "--out", str(folder), *fewer], capsys
    )
    assert status == 0, err
    backup = json_path.with_name(json_path.stem + ".previous.json")
    assert text.splitlines()[-1] == (
        "replaced the profile that was there (18 points, 1–32 tokens) with this one (2 points, 1–2 tokens); "
        f"the replaced one is kept as {backup} and its .joblib: rename both back to restore it"
    )
    assert (backup.read_bytes(), backup.with_suffix(".joblib").read_bytes()) == before

    # `show` lists the new profile only; given the backup's path, it shows the backup.
    monkeypatch.setenv("AUTOEXPERTS_PROFILE_DIR", str(folder))
    monkeypatch.setattr(settings, "shipped_profile_dir", lambda: tmp_path / "no-shipped-profiles")
    status, text, _ = _main(["show"], capsys)
    assert status == 0 and [line for line in text.splitlines() if line.startswith("profile ")] == [
        f"profile   {json_path}"
    ]
    status, text, _ = _main(["show", str(backup)], capsys)
    assert status == 0 and f"profile   {backup}" in text and "fitted cost model from the .joblib" in text


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
        (["calibrate", "--tokens=-3"], "positive"),  # negative tokens
        (["calibrate", "--tokens", ","], "empty item"),  # no tokens at all
        (["calibrate", "--tokens", "1,,2"], "empty item"),  # a doubled comma (not read as 1,2)
        (["calibrate", "--tokens", "1,2,"], "empty item"),  # a trailing comma
        (["calibrate", "--tokens", ""], "empty item"),  # an empty list
        (["calibrate", "--tokens", "1,2,2"], "repeats 2"),  # a repeated count
        (["calibrate", "--tokens", "4,04"], "repeats a token count"),  # the same count written two ways
        (["calibrate", "--tokens", "2.5"], "not a comma-separated list"),  # not integers
        (["calibrate", "--device", "tpu"], "unknown device"),  # unknown device
        (["calibrate", "--dtype", "float8"], "unknown dtype"),  # unknown dtype
        (["calibrate", "--backends", "eager,warp_drive"], "unknown backend"),  # unknown backend
        (["calibrate", "--backends", "eager,,grouped_mm"], "empty item"),  # a doubled comma
        (["calibrate", "--backends", "eager,"], "empty item"),  # a trailing comma
        (["calibrate", "--backends", "eager,eager"], "repeats eager"),  # a repeated backend
        (["bench", "--tokens", "1,,2"], "empty item"),  # bench: a doubled comma in the sweep counts
        (["bench", "--parts", "sweep,"], "empty item"),  # bench: a trailing comma in the parts
        (["bench", "--parts", "sweep,sweep"], "repeats sweep"),  # bench: a repeated part
        (["bench", "--parts", "sweep,warp"], "unknown benchmark part 'warp'"),  # bench: an unknown part
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
    extra = ["--out", str(out)] if args[0] in ("calibrate", "bench") else []
    status, _, err = _main([*args, *extra], capsys)
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    assert not out.exists()  # nothing written, not even the folder


@pytest.mark.parametrize(
    ("args", "verbose"),
    [
        (["presets"], False),  # not asked for
        (["-v", "presets"], True),  # before the command
        (["presets", "-v"], True),  # after the command
        (["calibrate", "--tokens", "1,2", "--verbose"], True),  # the long form, after calibrate's options
        (["-v", "show", "--verbose"], True),  # both before and after
        (["bench", "-v"], True),  # bench
    ],
)
def test_verbose_is_accepted_before_or_after_the_command(args, verbose):
    from autoexperts.cli import _build_parser

    assert _build_parser().parse_args(args).verbose is verbose


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
    status, _, err = _main(["calibrate", "--device", "cuda", "--out", str(tmp_path / "out")], capsys)
    assert status == 2 and "no CUDA device" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_not_an_moe_model_is_a_usage_error(tmp_path, capsys):
    config = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 1}
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_attention_heads": 4, "vocab_size": 64}))
    status, _, err = _main(["calibrate", "--model", str(tmp_path), "--out", str(tmp_path / "out"), *FAST_SWEEP], capsys)
    assert status == 2 and "no experts layer" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "out",
    [
        "a-file/profiles",  # below a file
        "a-file",  # a file itself
        "read-only/profiles",  # below a folder without write permission
    ],
)
def test_unwritable_output_folder_is_a_usage_error(out, tmp_path, capsys):
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "read-only").mkdir(mode=0o500)
    if out.startswith("read-only") and os.access(tmp_path / "read-only", os.W_OK):
        pytest.skip("permissions are not enforced for this user (root)")
    before = sorted(tmp_path.rglob("*"))
    status, _, err = _main(["calibrate", "--out", str(tmp_path / out), *FAST_SWEEP], capsys)
    assert status == 2 and "cannot write profiles" in err and len(err.strip().splitlines()) == 1
    assert sorted(tmp_path.rglob("*")) == before


def _checkpoint_of_default_preset(out):
    """Where `calibrate --device cpu` of the default preset keeps its checkpoint under `out`."""
    from autoexperts.calibration.checkpoint import checkpoint_path
    from autoexperts.calibration.experts_layer import build_experts_layer
    from autoexperts.calibration.model_source import resolve_model
    from autoexperts.device import device_name
    from autoexperts.store import file_target

    spec = build_experts_layer(resolve_model(None).config, torch.device("meta"), torch.float32).spec
    return checkpoint_path(file_target(out, device_name(torch.device("cpu")), spec.file_stem("none")))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "cannot resume"),  # a damaged checkpoint
        (json.dumps({"kind": "autoexperts-checkpoint", "version": 1, "measurements": []}), "measured with"),  # other
    ],
)
def test_resume_from_a_foreign_checkpoint_is_a_usage_error(content, message, tmp_path, capsys):
    checkpoint = _checkpoint_of_default_preset(tmp_path)
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_text(content)
    status, _, err = _main(["calibrate", "--device", "cpu", "--out", str(tmp_path), "--resume", *FAST_SWEEP], capsys)
    assert status == 2 and message in err and "--resume" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [checkpoint.name]


def test_resume_without_a_checkpoint_is_a_usage_error(tmp_path, capsys):
    checkpoint = _checkpoint_of_default_preset(tmp_path)
    status, _, err = _main(["calibrate", "--device", "cpu", "--out", str(tmp_path), "--resume", *FAST_SWEEP], capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert f"no checkpoint at {checkpoint} to resume; run without --resume" in err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_show_marks_stale_profiles(calibrated, tmp_path, capsys):
    _, out, _ = calibrated
    record = json.loads(next(out.glob("*/*.json")).read_text())
    record["versions"]["torch"] = "1.0.0"
    stale = tmp_path / "stale.json"
    stale.write_text(json.dumps(record))
    status, text, _ = _main(["show", str(stale)], capsys)
    assert status == 0 and "STALE     measured with torch 1.0.0" in text


def _as_a_terminal_shows(text: str) -> list[str]:
    """The lines a terminal shows for `text`: a carriage return goes back to the line's start, and what follows
    overwrites what was there."""
    lines = []
    for line in text.split("\n"):
        shown = ""
        for segment in line.split("\r"):
            shown = segment + shown[len(segment) :]
        lines.append(shown.rstrip())
    return lines


def test_ctrl_c_keeps_measured_points_and_resume_finishes(tmp_path):
    # batched_mm alone: the quickest backend on CPU here, so the test spends its time on the interruption.
    tokens = "1,2,3,4,6,8,12,16,24,32"
    args = ["calibrate", "--device", "cpu", "--out", str(tmp_path), "--tokens", tokens, "--backends", "batched_mm"]
    process = subprocess.Popen(  # with the progress bar, which the message must not land on
        # Points of half a second: the sweep goes on for seconds after its first checkpoint, so even a parent that
        # a loaded machine schedules late interrupts it mid-sweep.
        _cli_command(*args, "--seconds-per-point", "0.5"),
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        # A job started in the background inherits SIGINT ignored (and Python then keeps ignoring it): give the
        # command the disposition it has in a terminal, whatever runs this test.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 240  # waits for the first checkpoint; not a timing assertion
    while not list(tmp_path.glob("*/*.checkpoint")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "kept in" in err and "--resume" in err and "Traceback" not in err
    message = next(line for line in _as_a_terminal_shows(err) if "kept in" in line)
    assert message.startswith("autoexperts: interrupted; the "), repr(err)  # on a line of its own
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert [p.suffix for p in files] == [".checkpoint"]  # no profile, no temporary or lock file
    kept = json.loads(files[0].read_text())["measurements"]
    assert 0 < len(kept) < 10  # some points, not all

    resumed = _cli(*args, "--seconds-per-point", "0.01", "--resume", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    profile = next(tmp_path.glob("*/*.json"))
    record = json.loads(profile.read_text())
    assert record["sweep"]["resumed_points"] == len(kept)
    assert [m for m in record["measurements"] if m["num_tokens"] <= kept[-1]["num_tokens"]] == kept
    assert not list(tmp_path.glob("*/*.checkpoint"))


def test_concurrent_calibrations_of_one_profile_measure_it_once(tmp_path):
    command = _cli_command("-v", "calibrate", "--device", "cpu", "--out", str(tmp_path), "--tokens", "1,2")
    command += ["--backends", "batched_mm,eager", "--seconds-per-point", "0.01"]
    # As the ranks of one torchrun launch (which sets TORCHELASTIC_RUN_ID; they share the launcher as parent): without
    # it, a process that reaches the lock only after another finished measures again, by design.
    env = {**os.environ, "TORCHELASTIC_RUN_ID": "test-launch"}
    processes = [
        subprocess.Popen(
            [*command, "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for _ in range(3)
    ]
    results = [(p.communicate(timeout=300), p.returncode) for p in processes]
    assert [code for _, code in results] == [0, 0, 0], [err for (_, err), _ in results]
    # One measured the layer under its lock; the others waited, then found the profile it saved. One profile, no
    # replaced copy, no temporary or lock files.
    reused = sum("was calibrated by another process meanwhile" in err for (_, err), _ in results)
    assert reused == 2, [err for (_, err), _ in results]
    said = [out for (out, _), _ in results]
    assert sum("measured meanwhile by another process" in out for out in said) == 2, said
    assert sum("calibrated in" in out for out in said) == 1, said
    files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert [name.rsplit(".", 1)[1] for name in files] == ["joblib", "json"], files
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProfileWarning)
        loaded = load_profile(next(tmp_path.glob("*/*.json")), trusted=True)
    assert loaded.model_source == "joblib"


@pytest.mark.parametrize("command", ["calibrate", "bench"])
def test_malformed_environment_budget_stops_before_measuring(command, tmp_path, monkeypatch, capsys):
    # 1.5 was read as 1.5 bytes: now exit 2, naming the variable, before any point is measured or written.
    monkeypatch.setenv("AUTOEXPERTS_MEMORY_BUDGET", "1.5")
    out = tmp_path / "out"
    status, _, err = _main([command, "--out", str(out), *FAST_SWEEP], capsys)
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and "AUTOEXPERTS_MEMORY_BUDGET" in lines[0] and "'1.5GiB'" in lines[0]
    assert not out.exists()


@pytest.mark.parametrize(
    ("options", "says"),
    [
        (["--ep-size", "3"], "--ep-size 3 does not divide the model's 16 experts"),  # small-moe has 16 experts
        (["--ep-size", "2", "--ep-implementation", "all_reduce"], "needs --ep-size equal to --tp-size"),
        (["--ep-size", "4", "--tp-size", "3"], "--ep-size must be a multiple of --tp-size"),
        (["--ep-size", "0"], "'0' must be a positive integer"),  # argparse's own check
        (["--ep-implementation", "all-to-all"], "invalid choice: 'all-to-all'"),  # a typo of all_to_all
    ],
)
def test_bad_parallel_sizes_exit_2_with_one_line_and_write_nothing(options, says, tmp_path, capsys):
    status, _, err = _main(["calibrate", "--device", "cpu", "--out", str(tmp_path), *FAST_SWEEP, *options], capsys)
    assert status == 2 and says in err, err
    assert len([line for line in err.strip().splitlines() if not line.startswith("usage:")]) == 1, err
    assert list(tmp_path.iterdir()) == []


# --pin-allocator: glibc's thresholds fixed before measuring (the real mallopt is tested in test_allocator, in a child
# process: here a stand-in keeps this test process's allocator as it is).


def test_pin_allocator_that_cannot_pin_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    from autoexperts import allocator

    monkeypatch.setattr(allocator, "pin_cpu_allocator", lambda: False)
    monkeypatch.setattr(allocator, "uses_glibc_malloc", lambda: True)
    status, _, err = _main(
        ["calibrate", "--device", "cpu", "--out", str(tmp_path), "--pin-allocator", *FAST_SWEEP], capsys
    )
    assert status == 2 and "--pin-allocator" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


def test_pin_allocator_under_another_malloc_exits_2_with_one_line(tmp_path, capsys, monkeypatch):
    # e.g. jemalloc in LD_PRELOAD: glibc's thresholds would serve no tensor
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    args = ["calibrate", "--device", "cpu", "--out", str(tmp_path), "--pin-allocator", *FAST_SWEEP]
    status, _, err = _main(args, capsys)
    assert status == 2 and "not glibc's" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


def test_pin_allocator_pins_before_measuring_and_the_profile_records_it(tmp_path, capsys, monkeypatch):
    from autoexperts import allocator

    calls = []

    def pin():
        calls.append(True)
        monkeypatch.setitem(allocator._pinned, "mallopt_mmap_threshold", "1073741824")
        monkeypatch.setitem(allocator._pinned, "mallopt_trim_threshold", "2147483647")
        return True

    monkeypatch.setattr(allocator, "pin_cpu_allocator", pin)
    monkeypatch.setattr(allocator, "uses_glibc_malloc", lambda: True)
    status, out, err = _main(
        ["calibrate", "--device", "cpu", "--out", str(tmp_path), "--pin-allocator", *FAST_SWEEP], capsys
    )
    assert status == 0, err
    (json_path,) = [p for p in tmp_path.rglob("*.json")]
    recorded = json.loads(json_path.read_text())["device"]["allocator_settings"]
    assert calls == [True] and recorded.get("mallopt_mmap_threshold") == "1073741824"
    assert "note:" not in out  # pinned: nothing to say about the allocator


def _glibc() -> bool:
    from autoexperts.allocator import uses_glibc_malloc

    return uses_glibc_malloc()


@pytest.mark.skipif(not _glibc(), reason="the note is about glibc's thresholds")
def test_a_cpu_calibration_under_glibcs_default_thresholds_says_how_to_pin_them(tmp_path, capsys, monkeypatch):
    for name in [n for n in os.environ if n.startswith("MALLOC_") or n == "GLIBC_TUNABLES"]:
        monkeypatch.delenv(name)
    status, out, err = _main(["calibrate", "--device", "cpu", "--out", str(tmp_path), *FAST_SWEEP], capsys)
    assert status == 0, err
    notes = [line for line in out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "--pin-allocator" in notes[0] and "pin_cpu_allocator()" in notes[0]
