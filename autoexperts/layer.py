"""What identifies an experts layer for the cost model, and how each backend's forward is reached.

A backend is a function `fn(experts_module, hidden_states, top_k_index, top_k_weights) -> Tensor`. Every backend
except `"eager"` lives in Transformers' `ExpertsInterface`; `"eager"` is the experts class's own forward, which
`@use_experts_implementation` keeps as `forward.__wrapped__`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from .choices import AUTO as AUTO

EAGER = "eager"
BATCHED_MM = "batched_mm"
GROUPED_MM = "grouped_mm"
# The backends every device can run; `calibrate --backends` may add others that Transformers has registered.
DEFAULT_BACKENDS = (EAGER, BATCHED_MM, GROUPED_MM)

ExpertsForward = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _experts_functions() -> dict:
    """Transformers' experts registry, imported on use rather than with this module: importing it runs the hook that
    registers `"auto"`, which imports `autoexperts.dispatch`, which needs this module whole (see
    `autoexperts._registration`)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    return ALL_EXPERTS_FUNCTIONS


def registered_backends() -> list[str]:
    """The backend names this process can dispatch to: `"eager"` and every registered one except `"auto"`."""
    return [EAGER, *(name for name in _experts_functions() if name != AUTO)]


def is_experts_module(module: torch.nn.Module) -> bool:
    """Whether `module`'s class was decorated with Transformers' `@use_experts_implementation`."""
    down_proj = getattr(module, "down_proj", None)
    return isinstance(down_proj, torch.Tensor) and down_proj.dim() == 3 and hasattr(type(module).forward, "__wrapped__")


def backend_forward(name: str, experts_class: type[torch.nn.Module]) -> ExpertsForward:
    """The function that runs backend `name` for layers of `experts_class`.

    Raises:
        `KeyError`: when `name` is neither `"eager"` nor registered with Transformers.
    """
    if name == EAGER:
        original_forward = eager_forward(experts_class)
        if original_forward is None:
            raise KeyError(
                f"{experts_class.__name__} has no eager forward (is it decorated with @use_experts_implementation?)"
            )
        return original_forward
    functions = _experts_functions()
    if name == AUTO or name not in functions:
        raise KeyError(f"unknown experts backend {name!r}; registered: {', '.join(registered_backends())}")
    return functions[name]


def eager_forward(experts_class: type[torch.nn.Module]) -> ExpertsForward | None:
    """The experts class's own forward, under every `@use_experts_implementation` dispatching wrapper (Transformers'
    FP8 quantizer decorates `FP8Experts` again for each layer it converts, so wrappers can nest: one step down would
    reach another wrapper, which dispatches to `auto` again); `None` when the class has no such wrapper."""
    from transformers.integrations import moe

    forward = experts_class.forward
    if not hasattr(forward, "__wrapped__"):
        return None
    # The wrappers are closures of one function in Transformers' moe module; the class's own forward is not.
    while hasattr(forward, "__wrapped__") and forward.__code__.co_filename == moe.__file__:
        forward = forward.__wrapped__
    return forward


def experts_class_name(experts_class: type) -> str:
    """The name of the model's experts class, also when a wrapper subclassed it at run time (FSDP2's
    `fully_shard` turns `Qwen3MoeExperts` into `FSDPQwen3MoeExperts`, defined in `torch.distributed`)."""
    for cls in experts_class.__mro__:
        if not cls.__module__.startswith("torch."):
            return cls.__name__
    return experts_class.__name__


def layout_flags(module: torch.nn.Module) -> tuple[bool, bool, bool, bool]:
    """`(is_transposed, has_gate, has_bias, has_post_expert_norm)` of an experts module (older Transformers versions
    lack some flags; their defaults are the decorator's)."""
    return (
        bool(getattr(module, "is_transposed", False)),
        bool(getattr(module, "has_gate", True)),
        bool(getattr(module, "has_bias", False)),
        bool(getattr(module, "has_post_expert_norm", False)),
    )


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """The shape of an experts layer as far as backend costs go: a profile is valid for exactly one `LayerSpec`."""

    experts_class: str
    num_experts: int
    hidden_dim: int
    intermediate_dim: int
    top_k: int
    has_gate: bool
    has_bias: bool
    is_transposed: bool
    has_post_expert_norm: bool
    dtype: str
    device_type: str
    # > 1 for a rank's layer under all-reduce expert parallelism: it holds 1/expert_shards of the model's experts and
    # is called with every route, those to other ranks' experts as sentinel ids (see `autoexperts.expert_parallel`).
    expert_shards: int = 1

    @classmethod
    def of(cls, module: torch.nn.Module, top_k: int) -> LayerSpec:
        """Reads the spec off an experts module (its weights give the dimensions, whatever the attribute names; under
        expert parallelism, the rank's own experts)."""
        from .expert_parallel import expert_shards

        down_proj = module.down_proj
        return cls.from_parts(
            type(module),
            tuple(down_proj.shape),
            down_proj.dtype,
            down_proj.device,
            *layout_flags(module),
            top_k,
            expert_shards(module, top_k),
        )

    @classmethod
    def from_parts(
        cls,
        experts_class: type,
        down_proj_shape: tuple[int, int, int],
        dtype: torch.dtype,
        device: torch.device,
        is_transposed: bool,
        has_gate: bool,
        has_bias: bool,
        has_post_expert_norm: bool,
        top_k: int,
        expert_shards: int = 1,
    ) -> LayerSpec:
        """The spec from plain values (what a `torch.compile` trace can hand over as constants)."""
        num_experts, rows, cols = down_proj_shape  # (num_experts, hidden_dim, intermediate_dim), or transposed
        hidden_dim, intermediate_dim = (cols, rows) if is_transposed else (rows, cols)
        return cls(
            experts_class=experts_class_name(experts_class),
            num_experts=int(num_experts),
            hidden_dim=int(hidden_dim),
            intermediate_dim=int(intermediate_dim),
            top_k=int(top_k),
            has_gate=bool(has_gate),
            has_bias=bool(has_bias),
            is_transposed=bool(is_transposed),
            has_post_expert_norm=bool(has_post_expert_norm),
            dtype=str(dtype).removeprefix("torch."),
            device_type=torch.device(device).type,
            expert_shards=int(expert_shards),
        )

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert's weights (up/gate and down projections, without biases)."""
        up_rows = 2 * self.intermediate_dim if self.has_gate else self.intermediate_dim
        element_size = torch.empty((), dtype=getattr(torch, self.dtype)).element_size()
        return (up_rows + self.intermediate_dim) * self.hidden_dim * element_size

    def shape_fields(self) -> dict:
        """The fields a profile must match, without dtype and device (recorded on their own)."""
        fields = dataclasses.asdict(self)
        del fields["dtype"], fields["device_type"]
        if self.expert_shards == 1:  # a whole layer: recorded as before expert parallelism was known
            del fields["expert_shards"]
        return fields

    def describe(self) -> str:
        return (
            f"{self.experts_class}(num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, "
            f"intermediate_dim={self.intermediate_dim}, top_k={self.top_k}, {self.dtype}, {self.device_type}"
            + (f", 1/{self.expert_shards} of the experts, all-reduce EP)" if self.expert_shards > 1 else ")")
        )

    def file_stem(self, compile_mode: str) -> str:
        """The profile file name (without suffix) for this spec and compile mode."""
        return (
            f"{self.experts_class.lower()}-e{self.num_experts}-h{self.hidden_dim}-i{self.intermediate_dim}"
            f"-k{self.top_k}{f'-ep{self.expert_shards}' if self.expert_shards > 1 else ''}-{self.dtype}-{compile_mode}"
        )
