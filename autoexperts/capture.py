"""`record_routing(model)`: the routing a model really produces, per experts layer, for `calibrate --routing PATH`.

Inside the block a forward pre-hook on every experts module (a class decorated with `@use_experts_implementation`)
adds the call's `top_k_index` to that layer's per-expert counts and notes its token count. The hooks exist only
inside the block: outside it the experts modules carry no hook at all, so a forward (and `auto`'s dispatch) runs
exactly the code it ran before.

What is kept per layer is what a calibration needs and nothing about the inputs themselves: `num_experts`, `top_k`,
the tokens seen, each expert's count of tokens routed to it, and how many calls saw each token count. Expert ids
outside `[0, num_experts)` (expert-parallel sentinels of experts held by other ranks) are not counted.

Counts accumulate on the device the layer runs on (no host synchronisation per call) and are read once, at the end
of the block. Capture eager forwards: a compiled model runs the hooks only while it is traced. Every experts call
is counted, so capture inference, not training with gradient checkpointing (whose recomputation calls the experts
again).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from .calibration.routing import ROUTING_FILE_KIND, ROUTING_SCHEMA_VERSION
from .layer import is_experts_module

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class LayerRouting:
    """The routing one experts layer saw: tokens, calls per token count, and each expert's count of tokens."""

    name: str
    num_experts: int
    top_k: int | None = None
    tokens: int = 0
    calls_by_tokens: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    # (num_experts,) int64 on the layer's device while recording; a list of ints once the block ends.
    expert_counts: torch.Tensor | list[int] | None = None

    def add(self, top_k_index: torch.Tensor) -> None:
        num_tokens, top_k = top_k_index.shape  # (num_tokens, top_k)
        self.top_k = top_k
        self.tokens += num_tokens
        self.calls_by_tokens[num_tokens] += 1
        ids = top_k_index.detach().reshape(-1)  # (num_tokens * top_k,)
        # Sentinels (experts of other ranks) land in an extra bin that is dropped; no host sync.
        ids = torch.where((ids >= 0) & (ids < self.num_experts), ids, self.num_experts)
        counts = torch.bincount(ids, minlength=self.num_experts + 1)[: self.num_experts]  # (num_experts,)
        self.expert_counts = counts if self.expert_counts is None else self.expert_counts + counts

    def finish(self) -> None:
        if isinstance(self.expert_counts, torch.Tensor):
            self.expert_counts = [int(c) for c in self.expert_counts.tolist()]
        elif self.expert_counts is None:
            self.expert_counts = [0] * self.num_experts

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "tokens": self.tokens,
            "calls": sum(self.calls_by_tokens.values()),
            "calls_by_tokens": {str(n): c for n, c in sorted(self.calls_by_tokens.items())},
            "expert_counts": list(self.expert_counts or []),
        }


@dataclasses.dataclass
class RoutingRecord:
    """What `record_routing` saw, per experts layer (by module name, in model order)."""

    model: str | None
    layers: dict[str, LayerRouting]

    def to_json(self) -> dict:
        return {
            "kind": ROUTING_FILE_KIND,
            "schema_version": ROUTING_SCHEMA_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model": self.model,
            "layers": [layer.to_json() for layer in self.layers.values() if layer.tokens > 0],
        }

    def save(self, path: str | Path) -> Path:
        """Writes the record as JSON (what `autoexperts calibrate --routing PATH` reads) and returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")
        logger.info("routing of %d experts layers written to %s", len(self.layers), path)
        return path


def _top_k_index(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The `top_k_index` of an experts call `(hidden_states, top_k_index, top_k_weights)`, positional or not."""
    if len(args) >= 2:
        return args[1]
    if "top_k_index" in kwargs:
        return kwargs["top_k_index"]
    tensors = [*args, *kwargs.values()]
    return tensors[1] if len(tensors) >= 2 and isinstance(tensors[1], torch.Tensor) else None


@contextlib.contextmanager
def record_routing(model: torch.nn.Module) -> Iterator[RoutingRecord]:
    """Records, per experts layer of `model`, the experts its calls are routed to inside the block.

    Example:
        ```python
        with autoexperts.record_routing(model) as routing:
            model.generate(**inputs, max_new_tokens=64)
        routing.save("routing.json")  # then: autoexperts calibrate --model ... --routing routing.json
        ```

    Raises:
        `ValueError`: when `model` has no experts layer that Transformers' experts interface drives.
    """
    named = [(name, module) for name, module in model.named_modules() if is_experts_module(module)]
    if not named:
        raise ValueError(f"{type(model).__name__} has no experts layer decorated with @use_experts_implementation")
    record = RoutingRecord(
        model=getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        layers={name: LayerRouting(name, int(module.down_proj.shape[0])) for name, module in named},
    )
    handles = []

    def hook_for(layer: LayerRouting):
        def hook(module, args, kwargs):
            top_k_index = _top_k_index(args, kwargs)
            if top_k_index is not None:
                layer.add(top_k_index)

        return hook

    try:
        for name, module in named:
            handles.append(module.register_forward_pre_hook(hook_for(record.layers[name]), with_kwargs=True))
        yield record
    finally:
        for handle in handles:
            handle.remove()
        for layer in record.layers.values():
            layer.finish()
