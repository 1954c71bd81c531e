"""The designed set of expert shapes a device model is calibrated on, scaled to what the device can run quickly.

`DESIGN_SHAPES` spans real MoE layers (8–256 experts, hidden 1k–8k, intermediate 256–16k, top-k 1–10; gated,
ungated, and transposed with biases as in GPT-OSS) without copying any preset's shape, so that the presets stay
unseen shapes for a leave-one-shape-out check. Each shape is scaled down to fit the device: hidden and intermediate
sizes are divided by the same power of two until one layer's weights fit `weight_limit_bytes` (experts and top-k are
kept: they set the routing statistics), and its token counts stop where one call's FLOPs would take about
`seconds_per_call` at the device's measured matmul rate.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch
from transformers import AutoConfig

from ..layer import LayerSpec
from ..work import element_size
from .experts_layer import ExpertsLayer, build_experts_layer
from .sweep import default_token_grid

logger = logging.getLogger(__name__)

GATED, UNGATED, TRANSPOSED_BIAS = "gated", "ungated", "transposed_bias"
# Transformers' experts classes that have each layout, and how their config names the shape.
_LAYOUT_MODELS = {
    GATED: ("qwen3_moe", {"experts": "num_experts", "intermediate": "moe_intermediate_size"}),
    UNGATED: ("nemotron_h", {"experts": "n_routed_experts", "intermediate": "moe_intermediate_size"}),
    TRANSPOSED_BIAS: ("gpt_oss", {"experts": "num_local_experts", "intermediate": "intermediate_size"}),
}


@dataclasses.dataclass(frozen=True)
class DesignShape:
    """An experts layer shape before scaling."""

    num_experts: int
    hidden_dim: int
    intermediate_dim: int
    top_k: int
    layout: str = GATED

    def scaled(self, factor: int) -> DesignShape:
        return dataclasses.replace(
            self,
            hidden_dim=_round_to(self.hidden_dim / factor),
            intermediate_dim=_round_to(self.intermediate_dim / factor),
        )

    def weight_bytes(self, dtype: str) -> int:
        up_rows = self.intermediate_dim * (1 if self.layout == UNGATED else 2)
        return self.num_experts * (up_rows + self.intermediate_dim) * self.hidden_dim * element_size(dtype)

    def flops_per_token(self) -> float:
        up_rows = self.intermediate_dim * (1 if self.layout == UNGATED else 2)
        return 2.0 * self.top_k * self.hidden_dim * (up_rows + self.intermediate_dim)


DESIGN_SHAPES: tuple[DesignShape, ...] = (
    DesignShape(8, 1024, 4096, 1),
    DesignShape(8, 4096, 8192, 2),
    DesignShape(16, 2048, 2048, 2),
    DesignShape(16, 6144, 16384, 4, UNGATED),
    DesignShape(32, 1024, 512, 4),
    DesignShape(32, 4096, 1536, 2, TRANSPOSED_BIAS),
    DesignShape(32, 8192, 4096, 8),
    DesignShape(48, 3072, 1024, 6, UNGATED),
    DesignShape(64, 1536, 768, 10),
    DesignShape(64, 4096, 2048, 4),
    DesignShape(64, 2048, 512, 8, TRANSPOSED_BIAS),
    DesignShape(96, 1024, 1536, 8, UNGATED),
    DesignShape(128, 3072, 512, 8),
    DesignShape(128, 1536, 256, 2),
    DesignShape(160, 5120, 1536, 6),
    DesignShape(256, 4096, 1024, 8),
    DesignShape(256, 2048, 256, 10, UNGATED),
    DesignShape(24, 2560, 3584, 3, TRANSPOSED_BIAS),
)


def _round_to(value: float, multiple: int = 16) -> int:
    """The nearest multiple of `multiple` (at least `multiple`): grouped_mm wants 16-byte row strides."""
    return max(multiple, round(value / multiple) * multiple)


def scale_to_fit(shape: DesignShape, dtype: str, weight_limit_bytes: float) -> DesignShape:
    """`shape` with hidden and intermediate sizes divided by the smallest power of two that fits the limit."""
    factor = 1
    while shape.scaled(factor).weight_bytes(dtype) > weight_limit_bytes and factor < 1 << 10:
        factor *= 2
    return shape.scaled(factor)


def matmul_flops_per_second(device: torch.device, dtype: torch.dtype, size: int = 512, seconds: float = 0.2) -> float:
    """The device's rate on one square matmul of `size`, measured for about `seconds`."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    torch.mm(a, b)  # warm-up
    calls, started = 0, time.perf_counter()
    while True:
        torch.mm(a, b)
        calls += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - started
        if elapsed >= seconds and calls >= 3:
            break
    return 2.0 * size**3 * calls / elapsed


def token_counts(shape: DesignShape, flops_per_second: float, seconds_per_call: float, max_tokens: int) -> list[int]:
    """The default grid up to where one call would take about `seconds_per_call` (at least up to 16 tokens)."""
    limit = max(16, int(seconds_per_call * flops_per_second / shape.flops_per_token()))
    return default_token_grid(min(limit, max_tokens))


def layer_config(shape: DesignShape):
    """A one-layer config of a Transformers model whose experts class has `shape.layout`."""
    model_type, names = _LAYOUT_MODELS[shape.layout]
    fields = {
        "hidden_size": shape.hidden_dim,
        names["intermediate"]: shape.intermediate_dim,
        names["experts"]: shape.num_experts,
        "num_experts_per_tok": shape.top_k,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "vocab_size": 128,
    }
    if shape.layout == UNGATED:
        fields.update({"layers_block_type": ["moe"], "n_shared_experts": 0, "moe_shared_expert_intermediate_size": 16})
    return AutoConfig.for_model(model_type, **fields)


def build_design_layer(shape: DesignShape, device: torch.device, dtype: torch.dtype, seed: int = 0) -> ExpertsLayer:
    """The experts layer of `shape` on `device`, with random weights."""
    layer = build_experts_layer(layer_config(shape), device, dtype, top_k=shape.top_k, seed=seed)
    expected = (shape.num_experts, shape.hidden_dim, shape.intermediate_dim, shape.top_k)
    got = (layer.spec.num_experts, layer.spec.hidden_dim, layer.spec.intermediate_dim, layer.spec.top_k)
    if got != expected:  # a Transformers version that names the config fields otherwise
        raise RuntimeError(f"built {got} for the design shape {expected} ({layer.model_type})")
    return layer


def spec_of(shape: DesignShape, dtype: str, device_type: str) -> LayerSpec:
    """The `LayerSpec` of a design shape without building it (class name as the layout's model builds it)."""
    classes = {GATED: "Qwen3MoeExperts", UNGATED: "NemotronHExperts", TRANSPOSED_BIAS: "GptOssExperts"}
    return LayerSpec(
        experts_class=classes[shape.layout],
        num_experts=shape.num_experts,
        hidden_dim=shape.hidden_dim,
        intermediate_dim=shape.intermediate_dim,
        top_k=shape.top_k,
        has_gate=shape.layout != UNGATED,
        has_bias=shape.layout == TRANSPOSED_BIAS,
        is_transposed=shape.layout == TRANSPOSED_BIAS,
        has_post_expert_norm=False,
        dtype=dtype,
        device_type=device_type,
    )
