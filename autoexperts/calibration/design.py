"""The designed set of expert shapes a device model is calibrated on, scaled to what the device can run quickly.

`DESIGN_SHAPES` spans real MoE layers (8–256 experts, hidden 1k–8k, intermediate 256–16k, top-k 1–10; gated,
ungated, and transposed with biases as in GPT-OSS) without copying any preset's shape, so that the presets stay
unseen shapes for a leave-one-shape-out check. Each shape is scaled down to fit the device: hidden and intermediate
sizes are divided by the same power of two until one layer's weights fit `weight_limit_bytes` (experts and top-k are
kept: they set the routing statistics), and its token counts stop where one call's FLOPs would take about
`seconds_per_call` at the device's measured matmul rate (`matmul_flops_per_second`, a compute-bound matmul). The sweep
goes on past that plan while its measured calls are still shorter than `seconds_per_call` (`more_tokens`), so a rate
read too low (an H200 once read 9.66 TFLOP/s, ~1 % of its bf16 rate, and stopped 8 of 18 shapes below 4096 tokens)
costs a few more sweep points, not the counts where the backends cross.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import torch
from transformers import AutoConfig

from ..cost_model import Measurement, Status
from ..layer import LayerSpec
from ..timing import timed_call_ms
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


# The side of the probe's square matmul per device type: large enough to be compute-bound there (on an H200 a
# 512 x 512 bf16 matmul takes ~0.3 us of math and ~15 us of launch and sync).
PROBE_SIZES = {"cuda": 8192, "cpu": 1024}
PROBE_WARM_UP_CALLS = 2
PROBE_MIN_CALLS = 3
PROBE_SECONDS = 0.2
# The fewest tokens a design shape is measured up to, whatever the rate.
MIN_PLANNED_TOKENS = 16


def matmul_flops_per_second(
    device: torch.device, dtype: torch.dtype, size: int | None = None, seconds: float = PROBE_SECONDS
) -> float:
    """The device's rate on a compute-bound square matmul: warmed up, then one batch of calls filling about `seconds`,
    timed as one (CUDA events and a single synchronize on GPU, a perf counter elsewhere).

    Args:
        size (`int`, *optional*): the matmul's side (default: `PROBE_SIZES` of the device type).
    """
    size = size or PROBE_SIZES.get(device.type, PROBE_SIZES["cpu"])
    a = torch.randn(size, size, device=device).to(dtype)  # (size, size)
    b = torch.randn(size, size, device=device).to(dtype)  # (size, size)
    for _ in range(PROBE_WARM_UP_CALLS):
        torch.mm(a, b)
    one_ms = timed_call_ms(lambda: torch.mm(a, b), device)
    calls = max(PROBE_MIN_CALLS, math.ceil(seconds * 1e3 / max(one_ms, 1e-3)))

    def batch() -> None:
        for _ in range(calls):
            torch.mm(a, b)

    return 2.0 * size**3 * calls / (timed_call_ms(batch, device) / 1e3)


def token_counts(shape: DesignShape, flops_per_second: float, seconds_per_call: float, max_tokens: int) -> list[int]:
    """The default grid up to where one call would take about `seconds_per_call` (at least up to
    `MIN_PLANNED_TOKENS`): the plan, which `more_tokens` extends when the calls measured are shorter."""
    limit = max(MIN_PLANNED_TOKENS, int(seconds_per_call * flops_per_second / shape.flops_per_token()))
    return default_token_grid(min(limit, max_tokens))


def more_tokens(points: list[Measurement], seconds_per_call: float, max_tokens: int) -> list[int]:
    """The grid counts to measure next for a design shape swept at the counts of `points`: none once the fastest
    backend's call at the largest count takes `seconds_per_call` or the largest count is `max_tokens`; else those up to
    where that call would take `seconds_per_call` if its latency grew in proportion to the tokens (at least the next
    grid count). A launch-bound latency grows slower, so this stops short and is asked again after those counts."""
    largest = max((m.num_tokens for m in points), default=0)
    timed = [m.median_ms for m in points if m.num_tokens == largest and m.status == Status.OK and m.median_ms]
    if not timed or largest >= max_tokens or min(timed) >= seconds_per_call * 1e3:
        return []
    reach = largest * seconds_per_call * 1e3 / min(timed)
    beyond = [n for n in default_token_grid(max_tokens) if n > largest]
    return [n for n in beyond if n <= reach] or beyond[:1]


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
