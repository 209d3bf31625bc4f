"""Loading a base model: half-precision weights without mixed precision are warned about."""

from __future__ import annotations

import torch


def test_half_weights_without_mixed_precision_are_warned_about(tiny_model_dir, caplog):
    """--torch_dtype float16 without --fp16 would update fp16 weights with no loss scaling (seen diverging on a GPU)."""
    import logging
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from zhtrain.model.loading import warn_if_pure_half

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float16)
    with caplog.at_level(logging.WARNING, logger="zhtrain"):
        warn_if_pure_half(model, SimpleNamespace(fp16=True, bf16=False, deepspeed=None))
        assert not caplog.records
        warn_if_pure_half(model, SimpleNamespace(fp16=False, bf16=False, deepspeed=None))
    assert "--torch_dtype float16 without --fp16" in caplog.text
