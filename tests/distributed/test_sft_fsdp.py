"""zhtrain.fsdp under `torchrun --nproc_per_node 2` on CPU (gloo): FSDP2 sharding, one step, the full state dict
gathered on rank 0 and saved as a loadable transformers folder (tests/workers/sft_fsdp_worker.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import BIN, WORKERS, free_port, user_shell_env


@pytest.mark.parametrize("layer_cls", ["LlamaDecoderLayer"])
def test_fsdp_gather_and_save_under_torchrun_on_cpu(tmp_path, tiny_model_dir, sp_tokenizer_dir, layer_cls):
    """zhtrain.fsdp: fully_shard over gloo with 2 processes, one step, full state dict on rank 0, loadable folder."""
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(WORKERS))
    from sft_fsdp_worker import BATCH, LR

    result_path, out = tmp_path / "result.json", tmp_path / "saved"
    proc = subprocess.run(
        [
            str(BIN / "torchrun"),
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            str(WORKERS / "sft_fsdp_worker.py"),
            str(tiny_model_dir),
            str(sp_tokenizer_dir),
            str(out),
            str(result_path),
            layer_cls,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=user_shell_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(result_path.read_text())
    assert result["world_size"] == 2 and result["is_fsdp_module"] and result["wrapper"].startswith("FSDP")
    assert result["units"] == 2 + 1 and result["layer_classes"] == ["LlamaDecoderLayer"]  # 2 decoder layers + root
    assert result["local_numel"] < result["full_numel"]  # really sharded
    # The saved model is the one-step-trained model: the same SGD step in one process gives the same weights.
    reference = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    ids = torch.tensor(BATCH)
    loss = reference(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.optim.SGD(reference.parameters(), lr=LR).step()
    assert loss.item() == pytest.approx(result["loss"], rel=1e-5)
    saved = AutoModelForCausalLM.from_pretrained(str(out))
    expected = reference.state_dict()
    for name, tensor in saved.state_dict().items():
        assert torch.allclose(tensor, expected[name], atol=1e-6), name
    assert not torch.allclose(
        saved.state_dict()["model.layers.0.mlp.up_proj.weight"],
        AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).state_dict()["model.layers.0.mlp.up_proj.weight"],
    )
