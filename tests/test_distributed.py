"""`auto` under torch.distributed: tensor parallelism, expert parallelism (all-to-all and all-reduce) and an FSDP +
expert-parallel training step, each on 2 CPU ranks (gloo) launched with `torch.distributed.run`, against a
single-process eager run of the same checkpoint.

Each case runs `tests/distributed_worker.py` on every rank; it saves the rank's logits (or loss and gradients) and
the decisions `auto` made there, which `run_case` returns per rank. Deselect these with `-m "not distributed"`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from autoexperts.expert_parallel import tp_expert_style
from tests.conftest import tiny_config, tiny_model
from tests.distributed_worker import BATCH, CASES, SEQ, WORLD_SIZE, input_batch

pytest.importorskip("accelerate")  # Transformers needs it to load with a `distributed_config`
if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
    pytest.skip("needs torch.distributed with the gloo backend", allow_module_level=True)

pytestmark = pytest.mark.distributed

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKER = REPO_ROOT / "tests" / "distributed_worker.py"
TIMEOUT_S = 120  # a case takes about 10 s on 2 shared CPU cores (mostly imports and process-group start-up)
NUM_LAYERS = 2  # the tiny qwen3_moe's decoder layers: one experts call per layer and forward
TOP_K = 2  # its experts per token
# Float32 with another summation order: TP splits the dense matmuls and all-reduces partial sums, EP sums the
# experts' outputs across ranks (all-reduce) or in another order (all-to-all), FSDP averages gradients across ranks.
# The differences seen are about 1e-6 on logits of magnitude ~1 and 2e-7 relative on gradients.
RTOL, ATOL = 1e-4, 1e-5


def run_case(case: str, checkpoint: Path, out_dir: Path, profile_dir: Path, extra_env=None) -> list[dict]:
    """Runs `case` of `distributed_worker.py` on 2 ranks and returns each rank's results, rank 0 first.

    The workers read profiles from `profile_dir` (`AUTOEXPERTS_PROFILE_DIR`), with no other `AUTOEXPERTS_*` variable
    of this process's environment, and `extra_env` on top."""
    _skip_unless_supported(case)
    env = _environment(profile_dir)
    env.update(extra_env or {})
    _launch([str(WORKER), str(checkpoint), case, str(out_dir)], env, case)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


def _skip_unless_supported(case: str) -> None:
    """Skips `case` where the installed Transformers' `DistributedConfig` lacks one of its settings (`ep_size` and
    `ep_implementation` came with Transformers 5.2x; earlier versions had `enable_expert_parallel` only)."""
    import dataclasses

    from transformers.distributed import DistributedConfig

    missing = set(CASES[case]["config"]) - {field.name for field in dataclasses.fields(DistributedConfig)}
    if missing:
        pytest.skip(f"this Transformers' DistributedConfig has no {', '.join(sorted(missing))}")


def _environment(profile_dir: Path) -> dict:
    """This process's environment for the workers: profiles from `profile_dir` and no other `AUTOEXPERTS_*`."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("AUTOEXPERTS_")}
    env.update(
        AUTOEXPERTS_PROFILE_DIR=str(profile_dir),
        OMP_NUM_THREADS="1",  # 2 ranks on a 2-core machine: no oversubscription
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),  # this tree's autoexperts
    )
    return env


def _tail(stdout: str, stderr: str, chars: int = 8000) -> str:
    return f"--- stdout ---\n{stdout[-chars:]}\n--- stderr ---\n{stderr[-chars:]}"


def decisions_per_rank(results: list[dict]) -> list[list[dict]]:
    """The decisions `auto` made on each rank, in call order: dicts with num_tokens, backend, source, profile,
    num_experts, hidden_dim, intermediate_dim, top_k, expert_shards and the whole `layer` spec."""
    return [result["decisions"] for result in results]


def _assert_local_layers(results: list[dict], case: str, num_experts: int, top_k: int) -> None:
    """Every decision on every rank was made for the rank's local experts layer by its per-rank profile, one per
    layer and forward (a checkpoint's recomputation makes no new decision); ranks decide alike for equal counts."""
    stem = LOCAL_LAYERS[case][0]
    by_count = {}
    for rank, decisions in enumerate(decisions_per_rank(results)):
        assert len(decisions) == NUM_LAYERS, (rank, decisions)
        for decision in decisions:
            intermediate = TP_INTERMEDIATE if case == "tp" else 32
            assert (decision["num_experts"], decision["hidden_dim"], decision["intermediate_dim"]) == (
                num_experts,
                64,
                intermediate,
            ), (rank, decision)
            assert decision["top_k"] == top_k, (rank, decision)
            assert decision["backend"] in {"eager", "batched_mm", "grouped_mm"}, (rank, decision)
            assert decision["source"] == "profile" and Path(decision["profile"]).stem == stem, (rank, decision)
            assert decision["expert_shards"] == (2 if case.startswith("ep_all_reduce") else 1), (rank, decision)
            assert by_count.setdefault(decision["num_tokens"], decision["backend"]) == decision["backend"]


def _assert_all_to_all_token_counts(results: list[dict]) -> None:
    """Under all-to-all each rank's experts get the (token, expert) pairs routed to them as top-1 rows: per layer the
    ranks' counts differ with the routing and add up to every pair of the whole batch."""
    counts = [[decision["num_tokens"] for decision in decisions] for decisions in decisions_per_rank(results)]
    for layer in range(NUM_LAYERS):
        assert sum(rank_counts[layer] for rank_counts in counts) == BATCH * SEQ * TOP_K, counts


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The tiny qwen3_moe (8 experts, top-2, hidden 64, moe intermediate 32) saved where the workers load it."""
    path = tmp_path_factory.mktemp("checkpoint")
    tiny_model("qwen3_moe", experts_implementation="eager").save_pretrained(path)
    return path


# Tensor parallelism halves every expert's intermediate size where the installed Transformers' plan has rules for the
# experts (up to 5.24), and leaves the experts whole where it has none (5.25: they belong to the expert-parallel plan).
TP_INTERMEDIATE = 16 if tp_expert_style(tiny_config("qwen3_moe")) == "intermediate" else 32
# Each case's local experts layer and the `calibrate` options that give it (as in `DistributedConfig`).
LOCAL_LAYERS = {
    "tp": (f"qwen3moeexperts-e8-h64-i{TP_INTERMEDIATE}-k2-float32-none", ["--tp-size", "2"]),
    "ep_all_to_all": (
        "qwen3moeexperts-e4-h64-i32-k1-float32-none",
        ["--ep-size", "2", "--ep-implementation", "all_to_all"],
    ),
    "ep_all_reduce": ("qwen3moeexperts-e4-h64-i32-k2-ep2-float32-none", ["--ep-size", "2", "--tp-size", "2"]),
}
LOCAL_LAYERS["fsdp_ep_train"] = LOCAL_LAYERS["fsdp_ep_train_checkpointing"] = LOCAL_LAYERS["ep_all_to_all"]
LOCAL_LAYERS["ep_all_to_all_tune"] = LOCAL_LAYERS["ep_all_to_all"]
LOCAL_LAYERS["ep_all_reduce_tune"] = LOCAL_LAYERS["ep_all_reduce"]
CALIBRATION = ["--device", "cpu", "--tokens", "1,8,32,64", "--seconds-per-point", "0.01", "--no-progress"]


def _launch(arguments: list[str], env: dict, what: str) -> str:
    """Runs `python -m torch.distributed.run --standalone --nproc-per-node 2 ARGUMENTS`; returns its stderr."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD_SIZE}"]
    # A session of its own: on a timeout the launcher and both workers are killed together.
    process = subprocess.Popen(
        command + arguments,
        env=env,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{what}: the workers ran past {TIMEOUT_S} s\n{_tail(stdout, stderr)}")
    assert process.returncode == 0, f"{what}: the workers failed (exit {process.returncode})\n{_tail(stdout, stderr)}"
    return stderr


@pytest.fixture(scope="module")
def profiles(checkpoint, tmp_path_factory) -> Path:
    """Per-rank profiles of the three local layers, calibrated as a user does: `torchrun ... -m autoexperts
    calibrate --model CKPT --ep-size 2 ...` on 2 ranks (which measure once) for all-to-all; in this process for the
    others."""
    from autoexperts.cli import main

    folder = tmp_path_factory.mktemp("profiles")
    stderr = _launch(
        ["-m", "autoexperts", "-v", "calibrate", "--model", str(checkpoint), "--out", str(folder), *CALIBRATION,
         *LOCAL_LAYERS["ep_all_to_all"][1]],
        _environment(folder),
        "calibrate on 2 ranks",
    )  # fmt: skip
    # One rank measured the layer, the other found its profile: one sweep, one file, no replaced copy.
    assert stderr.count("was calibrated by another process meanwhile") == 1, stderr[-4000:]
    assert not list(folder.rglob("*.previous.json"))
    for case in ("tp", "ep_all_reduce"):
        assert (
            main(["calibrate", "--model", str(checkpoint), "--out", str(folder), *CALIBRATION, *LOCAL_LAYERS[case][1]])
            == 0
        )
    assert sorted(p.stem for p in folder.rglob("*.json")) == sorted({stem for stem, _ in LOCAL_LAYERS.values()})
    return folder


@pytest.fixture(scope="module")
def eager_model(checkpoint):
    """The reference: the checkpoint loaded in this process with the eager backend."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(checkpoint, experts_implementation="eager", dtype=torch.float32)


@pytest.mark.parametrize(
    "case, num_experts, top_k",
    [
        # TP: the experts are not sharded, every rank runs all 8 on the whole batch with the router's top-2.
        pytest.param("tp", 8, 2, id="tp"),
        # EP all-to-all: 4 experts per rank, each rank's routed pairs handed over as top-1 rows.
        pytest.param("ep_all_to_all", 4, 1, id="ep_all_to_all"),
        # EP all-reduce: 4 experts per rank on the shared batch, top-2 (other ranks' experts as sentinel ids).
        pytest.param("ep_all_reduce", 4, 2, id="ep_all_reduce"),
    ],
)
def test_inference_logits_match_eager(case, num_experts, top_k, checkpoint, eager_model, profiles, tmp_path):
    results = run_case(case, checkpoint, tmp_path / "out", profiles)

    with torch.no_grad():
        expected = eager_model.eval()(input_ids=input_batch()).logits
    for rank, result in enumerate(results):
        rows = slice(*result["rows"])
        torch.testing.assert_close(result["logits"], expected[rows], rtol=RTOL, atol=ATOL, msg=f"{case} rank {rank}")
    _assert_local_layers(results, case, num_experts, top_k)
    if CASES[case]["config"].get("ep_implementation") == "all_to_all":
        _assert_all_to_all_token_counts(results)
    else:  # every rank sees the whole batch
        assert all(d["num_tokens"] == BATCH * SEQ for rank in decisions_per_rank(results) for d in rank)


@pytest.mark.parametrize(
    "case",
    [
        # FSDP (2 data-parallel ranks, 2 rows each) with EP all-to-all: one forward + backward.
        "fsdp_ep_train",
        # The same with activation checkpointing: backward recomputes each layer's experts call with the backend its
        # forward ran.
        "fsdp_ep_train_checkpointing",
    ],
)
def test_training_step_matches_eager(case, checkpoint, eager_model, profiles, tmp_path):
    results = run_case(case, checkpoint, tmp_path / "out", profiles)

    model = eager_model.train()
    model.zero_grad(set_to_none=True)
    input_ids = input_batch()
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    for rank, result in enumerate(results):
        rows = slice(*result["rows"])
        with torch.no_grad():
            rank_loss = model(input_ids=input_ids[rows], labels=input_ids[rows]).loss
        torch.testing.assert_close(torch.tensor(result["loss"]), rank_loss, rtol=RTOL, atol=ATOL, msg=f"rank {rank}")
        assert result["no_grad"] == [], result["no_grad"]
    # The ranks have as many tokens each: the mean of their losses is the batch's, and FSDP's average of their
    # gradients is the gradient of the batch's loss.
    torch.testing.assert_close(torch.tensor(sum(r["loss"] for r in results) / WORLD_SIZE), loss.detach())
    gradients = results[0]["grads"]
    expected = {name: parameter.grad for name, parameter in model.named_parameters()}
    assert gradients.keys() == expected.keys()
    for name, gradient in expected.items():
        assert gradient.abs().sum() > 0, name  # the gradient reached this tensor
        torch.testing.assert_close(gradients[name], gradient, rtol=RTOL, atol=ATOL, msg=name)
    model.zero_grad(set_to_none=True)

    _assert_local_layers(results, case, num_experts=4, top_k=1)
    _assert_all_to_all_token_counts(results)
    recomputed = NUM_LAYERS if CASES[case].get("gradient_checkpointing") else 0
    assert all(r["experts_calls"] == {"forward": NUM_LAYERS, "recomputed": recomputed} for r in results), results


@pytest.mark.parametrize(
    "case, num_experts, top_k",
    [
        # EP all-to-all: each rank tunes its 4 experts at top-1 on the pairs routed to it.
        pytest.param("ep_all_to_all_tune", 4, 1, id="ep_all_to_all"),
        # EP all-reduce: each rank tunes its 4 of 8 experts at top-2 on the whole batch (sentinel routes included).
        pytest.param("ep_all_reduce_tune", 4, 2, id="ep_all_reduce"),
    ],
)
def test_tune_on_each_rank_writes_its_local_layers_profile_and_decides_from_it(
    case, num_experts, top_k, checkpoint, eager_model, tmp_path
):
    tuned = tmp_path / "tuned"  # empty: every profile the ranks use comes from their tune
    results = run_case(case, checkpoint, tmp_path / "out", tuned)

    stem = LOCAL_LAYERS[case][0]
    reports = [result["tuned"] for result in results]
    assert all(len(report) == 1 for report in reports), reports  # one local layer spec per rank
    assert {Path(report[0]["profile"]) for report in reports} == {tuned / Path(reports[0][0]["profile"]).parent.name
                                                                    / f"{stem}.json"}  # fmt: skip
    assert Path(reports[0][0]["profile"]).is_file()
    # The ranks share the spec on this node: one measured it, the other used what it saved.
    assert sorted(report[0]["measured_elsewhere"] for report in reports) == [False, True]
    for report in reports:
        spec = report[0]["spec"]
        assert (spec["num_experts"], spec["top_k"]) == (num_experts, top_k)
    tokens = [sum(n * calls for n, calls in report[0]["calls_by_tokens"].items()) for report in reports]
    if CASES[case]["config"].get("ep_implementation") == "all_to_all":  # the ranks' pairs add up to every pair
        assert sum(tokens) == NUM_LAYERS * BATCH * SEQ * TOP_K, tokens
    else:  # each rank's layers see the whole batch
        assert tokens == [NUM_LAYERS * BATCH * SEQ] * WORLD_SIZE, tokens

    with torch.no_grad():
        expected = eager_model.eval()(input_ids=input_batch()).logits
    for rank, result in enumerate(results):
        rows = slice(*result["rows"])
        torch.testing.assert_close(result["logits"], expected[rows], rtol=RTOL, atol=ATOL, msg=f"{case} rank {rank}")
    _assert_local_layers(results, case, num_experts, top_k)  # every decision from the tuned profile
