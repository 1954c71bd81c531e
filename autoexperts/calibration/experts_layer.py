"""One experts layer of a model's own experts class, with random weights, and random routed inputs for it (drawn
from a `Routing`: uniform unless asked otherwise).

The model is first built on the meta device (no memory, no download), which finds the experts class and the
(sub-)config it is built with whatever the architecture; only that one layer is then materialised on the device.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers import AutoModel, AutoModelForCausalLM, PretrainedConfig

from ..device import free_memory_bytes
from ..errors import UsageError
from ..expert_parallel import ALL_TO_ALL, TOP_K_FIELDS, shard_experts, shard_intermediate, tp_expert_style
from ..layer import LayerSpec, is_experts_module
from .routing import Routing

logger = logging.getLogger(__name__)


@dataclass
class ExpertsLayer:
    """A materialised experts layer and what calibration needs to drive it."""

    module: torch.nn.Module
    spec: LayerSpec
    model_type: str


def _top_k(config: PretrainedConfig, model: torch.nn.Module) -> int:
    for name in TOP_K_FIELDS:  # the config fields that name the experts per token
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    for module in model.modules():  # routers usually carry it
        value = getattr(module, "top_k", None)
        if isinstance(value, int) and value > 0:
            return value
    raise UsageError(f"cannot tell how many experts each token is routed to for model type {config.model_type!r}")


def _meta_model(config: PretrainedConfig, dtype: torch.dtype) -> torch.nn.Module:
    errors = []
    for auto_class in (AutoModelForCausalLM, AutoModel):
        try:
            with torch.device("meta"):
                return auto_class.from_config(config, dtype=dtype)
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            errors.append(f"{auto_class.__name__}: {error}")
    raise UsageError(f"cannot build model type {config.model_type!r} with Transformers: {'; '.join(errors)}")


def _check_fits(experts: torch.nn.Module, model_type: str, device: torch.device) -> None:
    weight_bytes = sum(p.numel() * p.element_size() for p in experts.parameters())
    free = free_memory_bytes(device)
    if weight_bytes > 0.9 * free:
        raise UsageError(
            f"one experts layer of {model_type!r} needs {weight_bytes / 2**30:.1f} GiB of weights, but the "
            f"{device.type} has {free / 2**30:.1f} GiB free: calibrate on a larger device or another dtype"
        )


def build_experts_layer(
    config: PretrainedConfig,
    device: torch.device,
    dtype: torch.dtype,
    top_k: int | None = None,
    seed: int = 0,
    ep_size: int = 1,
    ep_implementation: str = "",
    tp_size: int = 1,
) -> ExpertsLayer:
    """Builds the model's first experts layer on `device` in `dtype`, with N(0, 0.02) weights (left
    uninitialised on the meta device).

    With `tp_size > 1` and a tensor-parallel plan for the experts (see `expert_parallel.tp_expert_style`), every
    expert keeps `1 / tp_size` of its intermediate size. With `ep_size > 1` it is one rank's layer under
    Transformers' expert parallelism: `num_experts / ep_size` experts, called at top-1
    (`ep_implementation="all_to_all"`: each rank gets its own routes) or at the model's top-k with sentinel ids for
    the other ranks' experts (`"all_reduce"`, see `autoexperts.expert_parallel`).

    Raises:
        `UsageError`: when the model has no experts layer that Transformers' experts interface drives.
    """
    model = _meta_model(config, dtype)
    experts = next((m for m in model.modules() if is_experts_module(m)), None)
    if experts is None:
        raise UsageError(
            f"model type {config.model_type!r} has no experts layer that Transformers' experts interface can run "
            "(is it a Mixture-of-Experts model?)"
        )
    top_k = top_k or _top_k(getattr(experts, "config", config), model)
    del model
    if tp_size > 1 and ep_size == 1 and tp_expert_style(config) == "intermediate":
        shard_intermediate(experts, tp_size)
    if ep_size > 1:
        shard_experts(experts, ep_size)
        if ep_implementation == ALL_TO_ALL:
            top_k = 1
    if device.type != "meta":
        _check_fits(experts, config.model_type, device)
    layer = experts.to_empty(device=device)
    if device.type != "meta":
        generator = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            for name, parameter in layer.named_parameters():
                if "norm" in name:
                    parameter.fill_(1.0)
                else:
                    parameter.normal_(0.0, 0.02, generator=generator)
    layer.requires_grad_(False)
    spec = LayerSpec.of(layer, top_k)
    return ExpertsLayer(module=layer, spec=spec, model_type=config.model_type)


def routed_inputs(
    spec: LayerSpec,
    num_tokens: int,
    device: torch.device,
    dtype: torch.dtype,
    seed: int = 0,
    routing: Routing | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random hidden states and top-k routing (distinct experts per token) for `num_tokens` tokens, one draw per
    `(seed, num_tokens)`; for a rank's layer under all-reduce expert parallelism (`spec.expert_shards > 1`), routing
    over the whole model's experts with the other ranks' as sentinel ids.

    Args:
        routing (`Routing`, *optional*): the distribution the experts are drawn from (default: uniform; see
            `autoexperts.calibration.routing`).

    Returns:
        `hidden_states (num_tokens, hidden_dim)`, `top_k_index (num_tokens, top_k)` int64,
        `top_k_weights (num_tokens, top_k)`.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed + num_tokens)
    hidden_states = torch.randn(num_tokens, spec.hidden_dim, generator=generator)  # (num_tokens, hidden_dim)
    routing = routing or Routing()
    model_experts = spec.num_experts * spec.expert_shards  # the whole model's, under all-reduce expert parallelism
    top_k_index = routing.draw(num_tokens, model_experts, spec.top_k, generator)  # (num_tokens, top_k)
    top_k_weights = torch.randn(num_tokens, spec.top_k, generator=generator).softmax(dim=-1)  # (num_tokens, top_k)
    if spec.expert_shards > 1:
        # As Transformers' all-reduce expert parallelism hands a rank the batch: its own experts 0..num_experts-1,
        # the others' as the sentinel id num_experts with weight 0.
        remote = top_k_index >= spec.num_experts  # (num_tokens, top_k)
        top_k_index = top_k_index.masked_fill(remote, spec.num_experts)
        top_k_weights = top_k_weights.masked_fill(remote, 0.0)
    return hidden_states.to(device, dtype), top_k_index.to(device), top_k_weights.to(device, dtype)
