"""The work an experts call does, per backend, as numbers a device model can be fitted on.

For a layer spec and a token count, with the expected routing of uniform top-k (each token picks `top_k` distinct
experts of `num_experts`):

- `flops`: multiply-adds × 2 of the up (and gate) and down projections over every (token, slot) row;
- `weight_bytes`: bytes of the expert weights read, once per distinct expert hit (what eager and grouped_mm read);
- `gather_bytes`: bytes of the per-(token, slot) weight copies `batched_mm` makes (and reads again);
- `activation_bytes`: bytes of the intermediate activations written and read;
- `experts_hit`: the expected number of distinct experts hit (eager's loop count: its kernel launches);
- `rows`: (token, slot) rows, which grouped_mm sorts and every backend scatters back;
- `one`: a constant, the call's fixed cost.

and, for forms that learn where a backend's efficiency changes, the shape itself (`SHAPE_FEATURES`): tokens, rows
per expert, experts, hidden and intermediate sizes, top-k, and whether the layer is gated and transposed.

Every work feature is linear in the work, so a non-negative combination of them reads as seconds per unit of work.
"""

from __future__ import annotations

import numpy as np

from .layer import LayerSpec

LATENCY_FEATURES = ("one", "flops", "weight_bytes", "gather_bytes", "activation_bytes", "experts_hit", "rows")
# What the shape is, beside the work it does: where a backend's efficiency changes (rows per expert, matmul sizes).
SHAPE_FEATURES = ("tokens", "rows_per_expert", "experts", "hidden", "intermediate", "top_k", "gated", "transposed")
# Transient memory grows with the rows: the gathered weights (batched_mm), activations and the sorted copies.
MEMORY_FEATURES = ("one", "gather_bytes", "activation_bytes", "row_bytes")

_ELEMENT_SIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def element_size(dtype: str) -> int:
    return _ELEMENT_SIZE.get(dtype, 2)


def expected_experts_hit(num_experts: int, top_k: int, num_tokens: np.ndarray) -> np.ndarray:
    """Expected distinct experts hit by `num_tokens` tokens routed uniformly to `top_k` distinct experts each."""
    miss = 1.0 - min(top_k, num_experts) / num_experts  # one token misses a given expert
    return num_experts * (1.0 - np.power(miss, np.asarray(num_tokens, dtype=np.float64)))


def work_features(spec: LayerSpec, num_tokens: np.ndarray) -> dict[str, np.ndarray]:
    """Each feature of the module docstring at each token count: arrays of `num_tokens`' shape."""
    tokens = np.asarray(num_tokens, dtype=np.float64)
    up_rows = 2 * spec.intermediate_dim if spec.has_gate else spec.intermediate_dim
    size = element_size(spec.dtype)
    rows = tokens * spec.top_k
    hit = expected_experts_hit(spec.num_experts, spec.top_k, tokens)
    expert_bytes = (up_rows + spec.intermediate_dim) * spec.hidden_dim * size
    return {
        "one": np.ones_like(tokens),
        "flops": 2.0 * rows * spec.hidden_dim * (up_rows + spec.intermediate_dim),
        "weight_bytes": hit * expert_bytes,
        "gather_bytes": rows * expert_bytes,
        "activation_bytes": rows * (2 * spec.hidden_dim + up_rows + spec.intermediate_dim) * size,
        "experts_hit": hit,
        "rows": rows,
        "row_bytes": rows * spec.hidden_dim * size,
        "tokens": tokens,
        "rows_per_expert": rows / spec.num_experts,
        "experts": np.full_like(tokens, spec.num_experts),
        "hidden": np.full_like(tokens, spec.hidden_dim),
        "intermediate": np.full_like(tokens, spec.intermediate_dim),
        "top_k": np.full_like(tokens, spec.top_k),
        "gated": np.full_like(tokens, float(spec.has_gate)),
        "transposed": np.full_like(tokens, float(spec.is_transposed)),
    }


def feature_matrix(spec: LayerSpec, num_tokens: np.ndarray, names: tuple[str, ...]) -> np.ndarray:
    """`(len(num_tokens), len(names))`: the named features at each token count."""
    features = work_features(spec, num_tokens)
    return np.stack([features[name] for name in names], axis=1)
