"""The Meta (consolidated.*.pth) layout: permutations and how tensors split over shards, as the seed's."""

from __future__ import annotations

import pytest
import torch

from zhtrain.errors import ZhtrainError
from zhtrain.weights import meta


def test_unpermute_inverts_transformers_permute():
    """zhtrain's unpermute is the inverse of the permute in transformers' own LLaMA conversion."""
    w = torch.randn(64, 48)
    for heads in (4, 8):
        hf_layout = (
            w.view(heads, 64 // heads // 2, 2, 48).transpose(1, 2).reshape(64, 48)
        )  # convert_llama_weights_to_hf
        assert torch.equal(meta.unpermute(hf_layout, heads), w)
        assert torch.equal(meta.permute(meta.unpermute(w, heads), heads), w)


def test_meta_split_rules_match_the_seed():
    assert meta.split_sizes(49953, 2, uneven_ok=True, name="output.weight") == [24976, 24977]
    parts = meta.to_meta_parts("lm_head.weight", torch.zeros(49953, 4), {"num_attention_heads": 2}, 2)
    assert [p.shape[0] for _, p in parts] == [24976, 24977]
    assert meta.default_num_shards(5120) == 2 and meta.default_num_shards(576) == 1
    with pytest.raises(ZhtrainError, match="does not divide"):
        meta.to_meta_parts("model.layers.0.mlp.down_proj.weight", torch.zeros(8, 10), {}, 3)
