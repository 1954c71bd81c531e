"""One rank of a distributed test case (`tests/test_distributed.py`), run under `torch.distributed.run`:

    python -m torch.distributed.run --nproc-per-node 2 tests/distributed_worker.py CHECKPOINT CASE OUT_DIR

It loads CHECKPOINT with `experts_implementation="auto"` and CASE's `DistributedConfig`, runs CASE (an inference
forward, or one training step) on the fixed batch `input_batch()`, and saves `OUT_DIR/rank{rank}.pt`: the rank's
logits or loss, its input rows, every parameter's full gradient (rank 0, training cases), and the decisions `auto`
made on the rank. The test compares them with a single-process eager run of the same checkpoint.

It imports only torch, transformers and autoexperts (not the test suite), so that it runs as a plain script.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

# Each case: the `DistributedConfig` keywords for 2 ranks, and whether it runs a training step (forward + backward)
# instead of an inference forward. `data_parallel` cases (fsdp_size 2) give each rank its own half of the batch;
# the others give every rank the whole batch.
CASES = {
    # Tensor parallelism: the dense modules are sharded, the experts stay whole on every rank.
    "tp": {"config": {"tp_size": 2}, "train": False},
    # Expert parallelism across the two data-parallel ranks: 4 experts per rank, tokens exchanged all-to-all.
    "ep_all_to_all": {"config": {"ep_size": 2, "fsdp_size": 2, "ep_implementation": "all_to_all"}, "train": False},
    # Expert parallelism inside a TP group sharing one batch: each rank runs its 4 experts on every token, then the
    # outputs are summed (all-reduce needs ep_size == tp_size).
    "ep_all_reduce": {"config": {"tp_size": 2, "ep_size": 2, "ep_implementation": "all_reduce"}, "train": False},
    # One training step under FSDP with expert parallelism (all-to-all).
    "fsdp_ep_train": {"config": {"ep_size": 2, "fsdp_size": 2, "ep_implementation": "all_to_all"}, "train": True},
    # `autoexperts.tune` on each rank's own warm-up forward, then the inference forward: all-to-all and all-reduce.
    "ep_all_to_all_tune": {
        "config": {"ep_size": 2, "fsdp_size": 2, "ep_implementation": "all_to_all"},
        "train": False,
        "tune": True,
    },
    "ep_all_reduce_tune": {
        "config": {"tp_size": 2, "ep_size": 2, "ep_implementation": "all_reduce"},
        "train": False,
        "tune": True,
    },
    # The same with gradient checkpointing: the backward recomputes each decoder layer's forward.
    "fsdp_ep_train_checkpointing": {
        "config": {"ep_size": 2, "fsdp_size": 2, "ep_implementation": "all_to_all"},
        "train": True,
        "gradient_checkpointing": True,
    },
}

WORLD_SIZE = 2
BATCH, SEQ = 4, 8  # 2 rows per rank under data parallelism: the same token count per rank, so the mean of the
# ranks' mean losses is the whole batch's mean loss


def input_batch() -> torch.Tensor:
    """The fixed token ids every case runs on, (BATCH, SEQ), ids below the tiny models' vocabulary of 128."""
    return torch.randint(0, 128, (BATCH, SEQ), generator=torch.Generator().manual_seed(13))


def rank_rows(case: str, rank: int) -> slice:
    """The rows of `input_batch()` that `rank` runs in `case`."""
    if CASES[case]["config"].get("fsdp_size", 1) > 1:
        per_rank = BATCH // WORLD_SIZE
        return slice(rank * per_rank, (rank + 1) * per_rank)
    return slice(0, BATCH)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor holding all of `tensor`'s values (DTensors are gathered: a collective, every rank calls it)."""
    if hasattr(tensor, "full_tensor"):
        tensor = tensor.full_tensor()
    return tensor.detach().clone().cpu()


def _decision_record(decision) -> dict:
    layer = decision.layer
    return {
        "num_tokens": decision.num_tokens,
        "backend": decision.backend,
        "source": decision.source,
        "profile": decision.profile,
        "num_experts": layer.num_experts,
        "hidden_dim": layer.hidden_dim,
        "intermediate_dim": layer.intermediate_dim,
        "top_k": layer.top_k,
        "expert_shards": getattr(layer, "expert_shards", 1),
        "layer": dataclasses.asdict(layer),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("case", choices=sorted(CASES))
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args()
    case = CASES[args.case]

    import torch.distributed as dist
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    import autoexperts
    from autoexperts.layer import is_experts_module

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        args.checkpoint,
        distributed_config=DistributedConfig(**case["config"]),
        experts_implementation="auto",
        dtype=torch.float32,
    )
    rank = dist.get_rank()
    rows = rank_rows(args.case, rank)
    result: dict = {"rank": rank, "rows": (rows.start, rows.stop), "case": args.case}
    input_ids = input_batch()[rows]

    if case["train"]:
        model.train()
        if case.get("gradient_checkpointing"):
            # Transformers 5.24 renamed gradient_checkpointing_enable (deprecated, 5.17 has only it); the default
            # checkpoint is the non-reentrant one
            enable = getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)
            enable()
        # Experts calls run in backward (inside the autograd engine): a checkpoint's recomputations
        in_backward = []
        hooks = [
            m.register_forward_pre_hook(lambda *_: in_backward.append(torch._C._current_graph_task_id() != -1))
            for m in model.modules()
            if is_experts_module(m)
        ]
        with autoexperts.record_decisions() as decisions:
            loss = model(input_ids=input_ids, labels=input_ids).loss
            loss.backward()
        for hook in hooks:
            hook.remove()
        result["experts_calls"] = {"forward": in_backward.count(False), "recomputed": in_backward.count(True)}
        result["loss"] = loss.detach().item()
        # Every rank takes part in the gathers; rank 0 keeps the gradients (equal on all ranks once gathered).
        grads = {name: _full(p.grad) for name, p in model.named_parameters() if p.grad is not None}
        result["no_grad"] = [name for name, p in model.named_parameters() if p.grad is None]
        if rank == 0:
            result["grads"] = grads
    else:
        model.eval()
        if case.get("tune"):
            # Profiles go where the rank's auto reads them (AUTOEXPERTS_PROFILE_DIR); both ranks measure their own
            # local layer, once per layer spec on this node.
            with autoexperts.tune(model, seconds_per_point=0.005) as report, torch.no_grad():
                model(input_ids=input_ids)
            result["tuned"] = [
                {
                    "profile": str(layer.profile),
                    "spec": dataclasses.asdict(layer.spec),
                    "calls_by_tokens": layer.calls_by_tokens,
                    "measured_elsewhere": layer.measured_elsewhere,
                }
                for layer in report.layers
            ]
        with autoexperts.record_decisions() as decisions, torch.no_grad():
            logits = model(input_ids=input_ids).logits
        result["logits"] = _full(logits)

    result["decisions"] = [_decision_record(d) for d in decisions]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(result, args.out_dir / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
