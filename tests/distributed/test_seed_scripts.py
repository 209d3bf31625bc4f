"""The seed's own command lines, program name changed only, under torchrun on CPU: run_pt.sh with DeepSpeed ZeRO-2
(1 process) and FastChat's full fine-tuning under DDP (2 processes), each from a user's shell."""

from __future__ import annotations

import json
import shutil
import subprocess

import torch
from helpers import REPO, free_port, logits_of, user_shell_env, write_sharegpt


def test_run_pt_sh_runs_to_the_end_with_deepspeed(tmp_path, tiny_model_dir, sp_tokenizer_dir, text_dir):
    """The seed's script, program name changed only, under torchrun + DeepSpeed ZeRO-2 on CPU."""
    script = (REPO / "examples" / "run_pt.sh").read_text()
    for old, new in {
        "path/to/hf/llama/dir": str(tiny_model_dir),
        "path/to/chinese/llama/tokenizer/dir": str(sp_tokenizer_dir),
        "path/to/pt/data/dir": str(text_dir),
        "training_steps=100": "training_steps=3",
        "--block_size 512": "--block_size 32",
        "output_dir=output_dir": f"output_dir={tmp_path / 'out'}",
        "data_cache=temp_data_cache_dir": f"data_cache={tmp_path / 'cache'}",
        "deepspeed_config_file=ds_zero2_no_offload.json": (
            f"deepspeed_config_file={REPO / 'src' / 'zhtrain' / 'configs' / 'ds_zero2_no_offload.json'}"
        ),
    }.items():
        assert old in script
        script = script.replace(old, new)
    (tmp_path / "run_pt.sh").write_text(script)
    proc = subprocess.run(
        ["bash", str(tmp_path / "run_pt.sh")],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
        env=user_shell_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr  # the log goes to stdout (as the seed's), progress bars to stderr
    assert "trained with engine DeepSpeedEngine, world size 1" in log
    assert "--fp16 needs a CUDA GPU" in log or torch.cuda.is_available()
    assert (tmp_path / "out" / "pt_lora_model" / "adapter_model.safetensors").stat().st_size > 1000


def test_fastchat_command_runs_full_finetuning_under_ddp_with_2_processes(tmp_path, tiny_model_dir, sp_tokenizer_dir):
    """The seed's FastChat command, program name changed only, on 2 CPU processes: DDP, then a loadable model."""
    from transformers import AutoModelForCausalLM

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    for item in sp_tokenizer_dir.iterdir():
        shutil.copy(item, model / item.name)  # FastChat reads the tokenizer from the model folder
    data = write_sharegpt(tmp_path / "conv.json", copies=4)
    script = (REPO / "examples" / "train_fastchat.sh").read_text()
    for old, new in {
        "--nproc_per_node=8 --master_port=20001": f"--nproc_per_node=2 --master_port={free_port()}",
        "~/model_weights/Alpaca-Plus-13b": str(model),
        "data/dummy_conversation.json": str(data),
        "--output_dir output": f"--output_dir {tmp_path / 'out'}",
        "--num_train_epochs 5": "--num_train_epochs 2",
        "--model_max_length 2048": "--model_max_length 256",  # the tiny model's context
    }.items():
        assert old in script
        script = script.replace(old, new)
    (tmp_path / "train.sh").write_text(script)
    proc = subprocess.run(
        ["bash", str(tmp_path / "train.sh")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=user_shell_env(),
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    log = proc.stdout + proc.stderr
    assert "trained with engine DistributedDataParallel, world size 2" in log
    assert "--fsdp 'full_shard auto_wrap' needs CUDA GPUs" in log and "--tf32 needs a CUDA GPU" in log
    assert "truncated" in log  # the longest conversation does not fit 256 tokens: said per sample
    out = tmp_path / "out"
    saved = AutoModelForCausalLM.from_pretrained(str(out))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    assert not torch.allclose(logits_of(saved, ids), logits_of(base, ids), atol=1e-5)
    assert json.loads((out / "zhtrain_template.json").read_text())["template"] == "vicuna_v1.1"
