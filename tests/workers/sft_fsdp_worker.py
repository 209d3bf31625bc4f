"""Run by tests/test_sft.py under `torchrun --nproc_per_node 2` on CPU (gloo): zhtrain.fsdp end to end.

Shards a tiny LLaMA with FSDP2 (`fully_shard`, one unit per decoder layer), takes one SGD step on
the same batch on every rank, then gathers the full state dict on rank 0 (CPU offload) and saves a
transformers folder. Rank 0 writes what actually ran to RESULT (json).
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from transformers import AutoModelForCausalLM, AutoTokenizer

from zhtrain.distributed import sharded

BATCH = [[1, 5, 9, 13, 17, 21, 25, 29], [1, 30, 31, 32, 33, 34, 35, 36]]
LR = 0.5


def main(model_dir: str, tokenizer_dir: str, out_dir: str, result_path: str, layer_cls: str) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    classes = sharded.layer_classes(model, [layer_cls] if layer_cls != "auto" else None)
    sharded.shard(model, classes)
    units = sum(isinstance(m, FSDPModule) for m in model.modules())
    local_numel = sum(p.to_local().numel() for p in model.parameters())
    full_numel = sum(p.numel() for p in model.parameters())

    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    ids = torch.tensor(BATCH)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()

    saved = sharded.save_full_model(model, tokenizer, out_dir)
    if dist.get_rank() == 0:
        result = {
            "world_size": dist.get_world_size(),
            "wrapper": type(model).__name__,
            "is_fsdp_module": isinstance(model, FSDPModule),
            "units": units,
            "layer_classes": [c.__name__ for c in classes],
            "local_numel": local_numel,
            "full_numel": full_numel,
            "loss": loss.item(),
            "saved": str(saved),
        }
        with open(result_path, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:6])
