"""Where zhtrain changes a setting the user gave: one named place per command, one log line per change;
check_* functions change nothing."""

from __future__ import annotations

import copy
import logging

from zhtrain.pretrain import apply_overrides as pretrain_overrides
from zhtrain.pretrain import check_training_stage, parse_pretrain_args
from zhtrain.sft import apply_overrides as sft_overrides
from zhtrain.sft import parse_sft_args

BASE = ["--model_name_or_path", "m", "--tokenizer_name_or_path", "t", "--dataset_dir", "d", "--output_dir", "o"]


def test_pretrain_stage1_overrides_are_logged_one_line_each(caplog):
    _, _, lora_args, training_args = parse_pretrain_args(
        [
            *BASE,
            "--training_stage",
            "embeddings",
            "--train_new_rows_only",
            "--modules_to_save",
            "lm_head",
            "--weight_decay",
            "0.01",
            "--save_total_limit",
            "3",
        ]
    )
    before = copy.deepcopy(vars(lora_args))
    check_training_stage(lora_args, 100, 120)
    assert vars(lora_args) == before  # a check changes nothing
    with caplog.at_level(logging.INFO, logger="zhtrain"):
        limit = pretrain_overrides(lora_args, training_args)
    assert (lora_args.modules_to_save, training_args.weight_decay) == ("embed_tokens,lm_head", 0.0)
    assert (limit, training_args.save_total_limit) == (3, None)  # the checkpoint guard rotates, not the Trainer
    lines = [r.getMessage() for r in caplog.records]
    assert sum("--modules_to_save lm_head -> embed_tokens,lm_head" in line for line in lines) == 1
    assert sum("--weight_decay 0.01 -> 0" in line for line in lines) == 1
    assert sum(line.startswith("--save_total_limit 3:") for line in lines) == 1


def test_pretrain_stage2_changes_nothing(caplog):
    _, _, lora_args, training_args = parse_pretrain_args(
        [*BASE, "--modules_to_save", "embed_tokens,lm_head", "--weight_decay", "0.01"]
    )
    with caplog.at_level(logging.INFO, logger="zhtrain"):
        limit = pretrain_overrides(lora_args, training_args)
    assert (lora_args.modules_to_save, training_args.weight_decay, limit) == ("embed_tokens,lm_head", 0.01, None)
    assert caplog.records == []


def test_sft_full_finetuning_overrides_are_logged(caplog):
    model_args, _, lora_args, training_args = parse_sft_args(
        ["--model_name_or_path", "m", "--data_path", "x.json", "--output_dir", "o"]
    )
    with caplog.at_level(logging.INFO, logger="zhtrain"):
        sft_overrides(model_args, lora_args, training_args)
    assert model_args.torch_dtype == "float32" and training_args.include_num_input_tokens_seen == "non_padding"
    assert len(caplog.records) == 2
