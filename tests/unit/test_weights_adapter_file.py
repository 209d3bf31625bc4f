"""Adapter files read into weight edits: fan_in_fan_out and embedding LoRA layouts."""

from __future__ import annotations

from pathlib import Path

import torch


def test_fan_in_fan_out_and_embedding_lora_are_transposed():
    from zhtrain.weights.adapter_file import to_edits

    A, B = torch.randn(2, 6), torch.randn(5, 2)
    config = {"r": 2, "lora_alpha": 4, "fan_in_fan_out": True}
    edits, _ = to_edits(
        {"base_model.model.h.0.attn.c_attn.lora_A.weight": A, "base_model.model.h.0.attn.c_attn.lora_B.weight": B},
        config,
        Path("x"),
    )
    assert torch.allclose(edits["h.0.attn.c_attn.weight"].low_rank.delta(), (B @ A).T * 2)
    edits, _ = to_edits(
        {
            "base_model.model.model.embed_tokens.lora_embedding_A": A,
            "base_model.model.model.embed_tokens.lora_embedding_B": B,
        },
        {"r": 2, "lora_alpha": 2},
        Path("x"),
    )
    assert edits["model.embed_tokens.weight"].low_rank.delta().shape == (6, 5)
