"""Engine settings checked before a run: a DeepSpeed config that contradicts the flags is one line."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import REPO
from helpers import dist_flags as flags


def test_deepspeed_config_contradicting_the_flags_is_one_line(tmp_path, tiny_model_dir, sp_tokenizer_dir, text_dir):
    from zhtrain.errors import ZhtrainError
    from zhtrain.pretrain import parse_pretrain_args

    config = json.loads((REPO / "src" / "zhtrain" / "configs" / "ds_zero2_no_offload.json").read_text())
    config["fp16"]["enabled"] = True
    path = tmp_path / "ds_fp16.json"
    path.write_text(json.dumps(config))
    argv = flags(
        tiny_model_dir, sp_tokenizer_dir, text_dir, tmp_path / "out", tmp_path / "cache", 1, "--deepspeed", str(path)
    )
    with pytest.raises(ZhtrainError) as err:
        parse_pretrain_args([*argv, "--bf16"])
    assert str(err.value) == (
        f'--deepspeed {path}: fp16.enabled is true but the flags say --bf16; set fp16.enabled to "auto" '
        "so the flags decide, or pass --fp16 instead of --bf16"
    )
    if not torch.cuda.is_available():  # here fp16 itself cannot run: say that, not a batch of HF mismatches later
        with pytest.raises(ZhtrainError, match=r"fp16.enabled is true, which needs a CUDA GPU \(none here\)"):
            parse_pretrain_args([*argv, "--fp16"])
    config["fp16"]["enabled"] = "auto"
    config["train_micro_batch_size_per_gpu"] = 4
    path.write_text(json.dumps(config))
    with pytest.raises(
        ZhtrainError,
        match=r"values contradict the flags \(ds train_micro_batch_size_per_gpu=4 vs hf "
        r"per_device_train_batch_size=1\); set them to \"auto\"",
    ):
        parse_pretrain_args(argv)


def test_close_process_group_shuts_the_group_down_before_exit(tmp_path):
    """Training commands end with it: the group is destroyed while the process still runs (gloo's teardown
    during interpreter exit could abort a rank that finished); without a group it does nothing."""
    import torch

    from zhtrain.distributed.engines import close_process_group

    close_process_group()
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    close_process_group()
    assert not torch.distributed.is_initialized()
