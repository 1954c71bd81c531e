"""What a rank's experts layer is under Transformers' tensor and expert parallelism (`DistributedConfig`).

An experts call's cost depends on what the rank holds and on what it is handed:

- **Tensor parallelism** splits the experts' intermediate size across the ranks where the model's tensor-parallel
  plan has rules for its experts' weights (Transformers up to 5.24: Qwen3-MoE's 32 becomes 16 at `tp_size=2`), and
  leaves the experts whole where it has none (5.25 moved experts to the expert-parallel plan). Either way the rank's
  weights say which, and `LayerSpec.of` reads them; `calibrate --tp-size` follows the installed Transformers' plan.
- **Expert parallelism, all-to-all**: each rank holds `num_experts / ep_size` experts and its experts call gets only
  the (token, expert) pairs routed to them, one per row (top-1, unit weights). A plain layer of the local experts
  at top-1: nothing to mark.
- **Expert parallelism, all-reduce** (`ep_size == tp_size`, inference): each rank holds `num_experts / ep_size`
  experts and its experts call gets the whole batch at the model's top-k, the routes to other ranks' experts as the
  sentinel id `num_experts` (local) with weight 0. `grouped_mm` skips those rows, `batched_mm` still computes them:
  the cost depends on the share of sentinels, `1 - 1 / ep_size`, so such a layer's spec carries
  `expert_shards = ep_size`.
"""

from __future__ import annotations

import re

import torch

from .choices import EP_IMPLEMENTATIONS
from .errors import UsageError

ALL_TO_ALL = "all_to_all"
ALL_REDUCE = "all_reduce"

# A tensor-parallel plan rule on a routed experts module's weights (not `shared_experts`).
_TP_EXPERTS_RULE = re.compile(r"(?:^|\.)experts\.")
# Transformers' deprecated tensor-parallel style for experts: whole experts per rank, sentinel masking, all-reduce.
_MASKED_TP_STYLE = "moe_tp_experts"

# Where Transformers' configs keep the model's total number of routed experts and experts per token.
_NUM_EXPERTS_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
TOP_K_FIELDS = ("num_experts_per_tok", "moe_topk", "top_k", "experts_per_token", "num_experts_per_token", "moe_k")


def _first_int(config, names: tuple[str, ...]) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _text_config(config):
    """The text model's config of a (possibly multimodal) config."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _replace_parameter(experts: torch.nn.Module, name: str, shape) -> None:
    """Replaces `experts`' parameter `name` by an uninitialised one of `shape` (same dtype, device, grad flag)."""
    parameter = getattr(experts, name)
    empty = torch.empty(tuple(shape), dtype=parameter.dtype, device=parameter.device)
    setattr(experts, name, torch.nn.Parameter(empty, requires_grad=parameter.requires_grad))


def _ep_size(module: torch.nn.Module) -> int:
    """How many ranks Transformers' expert-parallel plan split this layer's experts across (1 when it did not)."""
    if not getattr(module, "_is_expert_parallel", False):
        return 1
    total = _first_int(getattr(module, "config", None), _NUM_EXPERTS_ATTRS)
    local = getattr(module, "num_experts", None)
    if total is None or not isinstance(local, int) or local < 1 or total % local:
        return 1
    return total // local


def _is_all_to_all_call(module: torch.nn.Module, top_k: int) -> bool:
    """A top-1 call of a layer whose model routes to more experts: all-to-all hands it only its own pairs."""
    routed_top_k = _first_int(getattr(module, "config", None), TOP_K_FIELDS)
    return top_k == 1 and routed_top_k not in (None, 1)


def expert_shards(module: torch.nn.Module, top_k: int) -> int:
    """How many ranks share the model's experts in a call that hands this layer every route (all-reduce expert
    parallelism), else 1.

    A layer Transformers sharded for expert parallelism (`_is_expert_parallel`) holds `module.num_experts` of the
    model's experts. Called at the model's top-k it gets the whole batch with sentinel ids (all-reduce); called at
    top-1 by a model routing to more experts, it gets its own pairs only (all-to-all), which is a plain layer.
    """
    ep_size = _ep_size(module)
    return 1 if ep_size == 1 or _is_all_to_all_call(module, top_k) else ep_size


def calibrate_args(module: torch.nn.Module, top_k: int) -> str:
    """The `autoexperts calibrate` options that give this rank's layer ('' for a layer that is not sharded)."""
    ep_size = _ep_size(module)
    if ep_size == 1:
        return ""
    if _is_all_to_all_call(module, top_k):
        return f"--ep-size {ep_size} --ep-implementation {ALL_TO_ALL}"
    return f"--ep-size {ep_size} --tp-size {ep_size} --ep-implementation {ALL_REDUCE}"


def parallel_layer_of(module: torch.nn.Module, top_k: int) -> dict:
    """What a profile records of the parallelism of a running rank's layer, as `parallel_layer` does for
    `calibrate`'s options (`{}` for a layer that is not sharded); the options `calibrate_args` gives."""
    ep_size = _ep_size(module)
    if ep_size == 1:
        return {}
    if _is_all_to_all_call(module, top_k):
        return {"tp_size": 1, "ep_size": ep_size, "ep_implementation": ALL_TO_ALL}
    return {"tp_size": ep_size, "ep_size": ep_size, "ep_implementation": ALL_REDUCE}


def resolve_ep_implementation(ep_implementation: str, tp_size: int, ep_size: int) -> str:
    """The implementation an inference forward uses: Transformers' `"auto"` runs all-reduce when the expert group
    shares one batch (`ep_size == tp_size`) and all-to-all otherwise.

    Raises:
        `UsageError`: for an unknown name, or all-reduce where the expert group does not share a batch.
    """
    if ep_implementation not in EP_IMPLEMENTATIONS:
        raise UsageError(f"unknown --ep-implementation {ep_implementation!r}: use {', '.join(EP_IMPLEMENTATIONS)}")
    if ep_size == 1:
        return ""
    if ep_implementation == "auto":
        return ALL_REDUCE if ep_size == tp_size else ALL_TO_ALL
    if ep_implementation == ALL_REDUCE and ep_size != tp_size:
        raise UsageError(
            f"all_reduce expert parallelism needs --ep-size equal to --tp-size (got {ep_size} and {tp_size})"
        )
    return ep_implementation


def tp_expert_style(config) -> str | None:
    """How the installed Transformers' tensor-parallel plan for this model treats its routed experts: `None` (left
    whole), `"intermediate"` (each rank a slice of every expert's intermediate size) or `"masked"` (whole experts
    split across the ranks with sentinel ids, the deprecated `moe_tp_experts` style)."""
    plan = getattr(_text_config(config), "base_model_tp_plan", None) or {}
    styles = {style for name, style in plan.items() if _TP_EXPERTS_RULE.search(name)}
    if not styles:
        return None
    return "masked" if _MASKED_TP_STYLE in styles else "intermediate"


def shard_intermediate(experts: torch.nn.Module, tp_size: int) -> None:
    """Cuts every expert's intermediate size (on the meta device) to one rank's `1 / tp_size` slice, as a
    column-parallel up (and gate) projection and a row-parallel down projection leave it."""
    transposed = bool(getattr(experts, "is_transposed", False))
    for name, parameter in list(experts.named_parameters(recurse=False)):
        if name.startswith("down_proj"):
            dim = None if name.endswith("bias") else (1 if transposed else 2)  # (E, H, I), or (E, I, H) transposed
        elif "up_proj" in name:  # gate_up_proj or up_proj: (E, [2]I, H), (E, H, [2]I) transposed, bias (E, [2]I)
            dim = 1 if name.endswith("bias") else (2 if transposed else 1)
        else:
            continue
        if dim is None:
            continue
        shape = list(parameter.shape)
        if shape[dim] % tp_size:
            raise UsageError(f"--tp-size {tp_size} does not divide {name}'s intermediate size {shape[dim]}")
        shape[dim] //= tp_size
        _replace_parameter(experts, name, shape)


def parallel_layer(config, tp_size: int, ep_size: int, ep_implementation: str) -> dict:
    """What a profile records of the parallelism its layer was calibrated for (`{}` without any).

    Raises:
        `UsageError`: unless the sizes split the model as Transformers requires.
    """
    for name, size in (("--tp-size", tp_size), ("--ep-size", ep_size)):
        if not isinstance(size, int) or size < 1:
            raise UsageError(f"{name} must be a positive integer (got {size})")
    if tp_size == 1 and ep_size == 1:
        return {}
    num_experts = _first_int(_text_config(config), _NUM_EXPERTS_ATTRS)
    if ep_size > 1:
        if num_experts is not None and num_experts % ep_size:
            raise UsageError(f"--ep-size {ep_size} does not divide the model's {num_experts} experts")
        if ep_size % tp_size:
            raise UsageError(
                f"--ep-size must be a multiple of --tp-size, as in Transformers (got {ep_size}, {tp_size})"
            )
    return {"tp_size": tp_size, "ep_size": ep_size, "ep_implementation": ep_implementation or None}


def shard_experts(experts: torch.nn.Module, ep_size: int) -> None:
    """Cuts an experts layer (on the meta device) to one rank's `num_experts / ep_size` experts, as Transformers'
    expert-parallel plan leaves it: every parameter with an experts dimension keeps its first share, and the layer
    is flagged expert-parallel (so the sentinel id `num_experts` is masked)."""
    total = experts.num_experts
    local = total // ep_size
    for name, parameter in list(experts.named_parameters(recurse=False)):
        if parameter.dim() >= 1 and parameter.shape[0] == total:
            _replace_parameter(experts, name, (local, *parameter.shape[1:]))
    experts.num_experts = local
    experts._is_expert_parallel = True
