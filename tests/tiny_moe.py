"""Every MoE model type of the installed Transformers whose experts class uses `@use_experts_implementation`, and a
tiny config of each, derived from its default config by one generic rule (no per-model table to keep up to date).

Discovery reads the installed `transformers/models/*/modeling_*.py` for the decorator (the heuristic Transformers itself
uses in `_can_set_experts_implementation`), then maps model types to those folders. A new MoE model in a later
Transformers release is covered without a change here.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import pathlib
import re

import torch
import transformers
from transformers import AutoModel, AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING, CONFIG_MAPPING_NAMES, model_type_to_module_name

DECORATOR = "@use_experts_implementation"

# Small values for the fields MoE configs use (only fields a config class declares are passed). Every dimension is a
# multiple of 8 (CPU grouped_mm needs 16-byte aligned strides).
SHRINK = {
    "hidden_size": 64,
    "intermediate_size": 64,
    "moe_intermediate_size": 32,
    "expert_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 128,
    "num_experts": 8,
    "n_routed_experts": 8,
    "num_local_experts": 8,
    "moe_num_experts": 8,
    "num_experts_per_tok": 2,
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 0,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "kv_lora_rank": 16,
    "q_lora_rank": 32,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    "n_shared_experts": 1,
    "num_shared_experts": 1,
    "depth": 1,
    "text_hidden_size": 64,  # a vision tower's projection into the text model
    "vocab_size_per_layer_input": 128,  # per-layer embeddings (Gemma 4)
    "hidden_size_per_layer_input": 16,
}
LAYERS = 2
MAX_LAYERS = 4
TOKEN_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id")


@functools.cache
def moe_model_types() -> list[str]:
    """Model types whose modeling file decorates an experts class with `@use_experts_implementation`."""
    models = pathlib.Path(transformers.__file__).parent / "models"
    folders = {
        path.parent.name for path in models.glob("*/modeling_*.py") if DECORATOR in path.read_text(encoding="utf-8")
    }
    return sorted(t for t in CONFIG_MAPPING_NAMES if model_type_to_module_name(t) in folders)


def _declared_fields(config_class: type) -> set[str]:
    names = set(inspect.signature(config_class.__init__).parameters)
    if dataclasses.is_dataclass(config_class):
        names |= {f.name for f in dataclasses.fields(config_class)}
    return names - {"self", "kwargs"}


def _per_layer_lists(config: PretrainedConfig, fields: set[str]) -> dict[str, list]:
    layers = getattr(config, "num_hidden_layers", None)
    found = {}
    for name in fields:
        try:
            value = getattr(config, name, None)
        except Exception:  # per-layer attributes that refuse global access
            continue
        if isinstance(value, (list, tuple)) and layers and len(value) == layers and name != "mlp_only_layers":
            found[name] = list(value)
    return found


def tiny_kwargs(config_class: type) -> dict:
    """Constructor arguments of a tiny `config_class`: `SHRINK` where declared, sub-configs likewise, and per-layer
    lists (`layer_types`, `mlp_layer_types`, ...) cut to one layer of each kind."""
    fields = _declared_fields(config_class)
    kwargs = {name: value for name, value in SHRINK.items() if name in fields}
    if "qk_rope_head_dim" in fields and "head_dim" in fields:  # multi-head latent attention ropes head_dim dims
        kwargs["head_dim"] = SHRINK["qk_rope_head_dim"]
    for name, sub_class in (getattr(config_class, "sub_configs", None) or {}).items():
        if isinstance(sub_class, type) and issubclass(sub_class, PretrainedConfig) and name in fields:
            kwargs[name] = tiny_kwargs(sub_class)
    if "num_hidden_layers" in fields:
        default = _construct(config_class, kwargs)
        lists = _per_layer_lists(default, fields)
        # First layer of each kind in every per-layer list, so that linear and full attention, dense and sparse
        # MLPs all stay represented.
        keep = sorted({values.index(kind) for values in lists.values() for kind in dict.fromkeys(values)})
        keep = keep[:MAX_LAYERS] or list(range(LAYERS))
        if len(keep) < LAYERS:
            keep = sorted(set(keep) | set(range(LAYERS)))
        kwargs["num_hidden_layers"] = len(keep)
        for name, values in lists.items():
            kwargs[name] = [values[i] for i in keep]
    return kwargs


def _fix_config(config: PretrainedConfig) -> None:
    """Token ids inside the tiny vocabulary; multimodal rope sections that add up to the tiny head."""
    for name in TOKEN_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value >= SHRINK["vocab_size"]:
            setattr(config, name, 0)
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and isinstance(rope.get("mrope_section"), list):
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        sections = len(rope["mrope_section"])
        half = head_dim // 2
        rope["mrope_section"] = [half - (sections - 1) * (half // sections)] + [half // sections] * (sections - 1)
    for name in getattr(config, "sub_configs", None) or {}:
        sub_config = getattr(config, name, None)
        if isinstance(sub_config, PretrainedConfig):
            _fix_config(sub_config)


def _set_everywhere(kwargs: dict, name: str, value_of) -> bool:
    """Sets `kwargs[name] = value_of(kwargs)` in `kwargs` and every nested sub-config's arguments that have `name`."""
    changed = False
    if name in kwargs:
        kwargs[name] = value_of(kwargs)
        changed = True
    for value in kwargs.values():
        if isinstance(value, dict):
            changed |= _set_everywhere(value, name, value_of)
    return changed


def _adjust_to(error: Exception, kwargs: dict) -> bool:
    """Adjusts `kwargs` to what a config's validation asked for; False when the message is not understood."""
    message = str(error)
    if "num_key_value_heads" in message and "num_attention_heads" in message:  # no grouped-query attention
        return _set_everywhere(kwargs, "num_key_value_heads", lambda level: level.get("num_attention_heads", 4))
    if match := re.search(r"Field '(\w+)'.*expected a list", message):  # e.g. one size per modality
        return _set_everywhere(kwargs, match.group(1), lambda level: [SHRINK[match.group(1)]] * 2)
    if match := re.search(r"supports `(\w+)=(\d+)` only", message):
        return _set_everywhere(kwargs, match.group(1), lambda level: int(match.group(2)))
    return False


def _construct(config_class: type, kwargs: dict) -> PretrainedConfig:
    """`config_class(**kwargs)`; a validation error may name what the architecture needs: `kwargs` is adjusted in
    place and construction retried."""
    for _ in range(3):
        try:
            return config_class(**kwargs)
        except Exception as error:
            if not _adjust_to(error, kwargs):
                raise
    return config_class(**kwargs)


def tiny_config(model_type: str) -> PretrainedConfig:
    config_class = CONFIG_MAPPING[model_type]
    config = _construct(config_class, tiny_kwargs(config_class))
    _fix_config(config)
    return config


def build_tiny_model(model_type: str, seed: int = 0, max_parameters: int | None = None) -> torch.nn.Module:
    """The tiny model of `model_type` (a causal LM where there is one, else the base model), with N(0, 0.1) weights,
    in eval mode and float32, running `eager` experts.

    Raises:
        `RuntimeError`: with both Auto classes' errors when neither can build it.
        `ValueError`: when it has more than `max_parameters` parameters (counted on the meta device first).
    """
    config = tiny_config(model_type)
    errors = []
    for auto_class in (AutoModelForCausalLM, AutoModel):
        try:
            if max_parameters is not None:
                with torch.device("meta"):
                    parameters = sum(p.numel() for p in auto_class.from_config(config).parameters())
                if parameters > max_parameters:
                    raise ValueError(f"the tiny config still has {parameters / 1e6:.0f}M parameters")
            torch.manual_seed(seed)
            model = auto_class.from_config(config, experts_implementation="eager")
            break
        except ValueError as error:
            if "tiny config still has" in str(error):
                raise
            errors.append(f"{auto_class.__name__}: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
        except Exception as error:
            errors.append(f"{auto_class.__name__}: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
    else:
        raise RuntimeError("; ".join(errors))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" not in name and parameter.is_floating_point():
                parameter.normal_(0.0, 0.1)
    return model.float().eval()
