"""Run by test_new_token_init.py in its own process: subword_mean on ZeRO-3-partitioned weights.

argv: base tokenizer folder, extended tokenizer folder, tiny model folder, free port.
"""

import os
import sys

import torch

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[4], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")

import deepspeed  # noqa: E402
from transformers import AutoTokenizer, LlamaForCausalLM  # noqa: E402
from transformers.integrations import HfDeepSpeedConfig  # noqa: E402

from zhtrain.model.vocab import resize_embeddings, subword_pieces  # noqa: E402

base_dir, new_dir, model_dir = sys.argv[1:4]
deepspeed.init_distributed(dist_backend="gloo")
base, new = AutoTokenizer.from_pretrained(base_dir), AutoTokenizer.from_pretrained(new_dir)
old = LlamaForCausalLM.from_pretrained(model_dir).get_input_embeddings().weight.detach().clone()
config = HfDeepSpeedConfig(
    {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1, "train_batch_size": 1}
)
model = LlamaForCausalLM.from_pretrained(model_dir)  # partitioned while it loads
assert hasattr(model.get_input_embeddings().weight, "ds_id") and model.get_input_embeddings().weight.numel() == 0
added = resize_embeddings(model, len(new), init="subword_mean", tokenizer=new, base_tokenizer=base)
pieces = subword_pieces(new, base, old.shape[0], len(new))
with deepspeed.zero.GatheredParameters([model.get_input_embeddings().weight]):
    weight = model.get_input_embeddings().weight
    assert added == len(new) - old.shape[0] and weight.shape[0] == len(new)
    assert torch.equal(weight[: old.shape[0]], old)
    for offset, ids in enumerate(pieces):
        assert torch.allclose(weight[old.shape[0] + offset], old[ids].mean(0) if ids else old.mean(0), atol=1e-6)
print("ZERO3_OK", added)
