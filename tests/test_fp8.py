"""FP8 experts have their own registry in Transformers: `auto` is registered there to reject them clearly."""

import pytest
import torch

import autoexperts

fp8 = pytest.importorskip("transformers.integrations.finegrained_fp8")


def _fp8_experts(implementation: str) -> torch.nn.Module:
    """An FP8 experts layer as Transformers' FP8 quantizer builds it (on the meta device: no weights needed)."""
    from transformers.integrations.moe import use_experts_implementation

    from tests.conftest import tiny_config

    config = tiny_config("mixtral")
    config._experts_implementation = implementation
    experts_class = use_experts_implementation(fp8.FP8Experts, experts_interface=fp8.ALL_FP8_EXPERTS_FUNCTIONS)
    with torch.device("meta"):
        return experts_class(config=config, block_size=(128, 128))


def test_auto_rejects_fp8_experts_with_a_clear_message():
    experts = _fp8_experts("auto")
    inputs = (torch.randn(4, 64), torch.zeros(4, 2, dtype=torch.long), torch.ones(4, 2))
    with pytest.raises(NotImplementedError, match="does not support FP8-quantized experts") as caught:
        experts(*inputs)
    assert "grouped_mm" in str(caught.value)  # names what to use instead


def test_fp8_registry_keeps_its_own_backends():
    assert fp8.ALL_FP8_EXPERTS_FUNCTIONS["auto"] is autoexperts.fp8.fp8_auto_experts_forward
    assert "grouped_mm" in autoexperts.fp8.fp8_backends() and "auto" not in autoexperts.fp8.fp8_backends()
    # The unquantized registry still dispatches auto.
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    assert ALL_EXPERTS_FUNCTIONS["auto"] is autoexperts.auto_experts_forward
