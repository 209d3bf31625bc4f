"""`zhtrain sft` before its training loop: --preprocess_only, settings errors, the seed scripts' flags."""

from __future__ import annotations

import json
import re

import pytest
import torch
from helpers import REPO, run_sft, seed_script_args, sft_flags, write_sharegpt

from zhtrain.errors import ZhtrainError
from zhtrain.sft import parse_sft_args


def flags(model, tokenizer, out, *extra, steps=3):
    return sft_flags(model, tokenizer, out, *extra, max_steps=steps)


run = run_sft


def test_preprocess_only_writes_one_line_per_sample_and_a_summary(tmp_path, tiny_model_dir, sp_tokenizer_dir, capsys):
    data = write_sharegpt(tmp_path / "conv.json")
    records = json.loads(data.read_text())
    records.append(
        {"id": "too_long", "conversations": [{"from": "human", "value": "的" * 300}, {"from": "gpt", "value": "好"}]}
    )
    data.write_text(json.dumps(records, ensure_ascii=False))
    out = tmp_path / "pre.jsonl"
    result = run(
        flags(
            tiny_model_dir,
            sp_tokenizer_dir,
            tmp_path / "out",
            "--data_path",
            str(data),
            "--template",
            "alpaca",
            "--preprocess_only",
            "--preprocessed_output",
            str(out),
            "--model_max_length",
            "200",
        )
    )
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["id"] for line in lines] == ["conv_0_0", "conv_1_0", "conv_2_0", "too_long"]
    assert all(set(line) >= {"id", "input_ids", "labels", "dropped"} for line in lines)
    assert lines[0]["dropped"] is None and "nothing left to train" in lines[3]["dropped"]
    assert all(len(line["input_ids"]) == len(line["labels"]) <= 200 for line in lines)
    trained = sum(label != -100 for line in lines if not line["dropped"] for label in line["labels"])
    printed = capsys.readouterr().out
    assert (
        "train: 4 samples, 6 assistant turns" in printed
        and f"{trained} trained tokens" in printed
        and "1 dropped" in printed
    )
    assert re.search(r"encoded 4 samples in [\d.]+ s \(\d+ samples/s\)", printed)
    assert result.trainer is None and not (tmp_path / "out").exists()
    # If every sample's prompt alone is too long, that is an error, not an empty run.
    with pytest.raises(
        ZhtrainError, match=rf"train \({re.escape(str(data))}\): all 4 samples were dropped: .* --model_max_length 8"
    ):
        run(
            flags(
                tiny_model_dir,
                sp_tokenizer_dir,
                tmp_path / "out",
                "--data_path",
                str(data),
                "--preprocess_only",
                "--model_max_length",
                "8",
            )
        )


@pytest.mark.parametrize(
    "extra, pattern",
    [
        (["--template", "chatml"], "--template chatml: unknown template"),
        (["--template", "tokenizer"], "has no chat_template"),
        (
            ["--model_max_length", "1024"],
            r"--model_max_length 1024 is larger than the model's context \(256 positions\)",
        ),
        (["--max_seq_length", "100"], "--model_max_length 256 and --max_seq_length 100 disagree"),
        (["--do_eval"], "--do_eval needs evaluation data"),
    ],
)
def test_bad_settings_are_one_line_errors(tmp_path, tiny_model_dir, sp_tokenizer_dir, extra, pattern):
    data = write_sharegpt(tmp_path / "conv.json")
    with pytest.raises(ZhtrainError, match=pattern):
        run(
            flags(
                tiny_model_dir,
                sp_tokenizer_dir,
                tmp_path / "out",
                "--data_path",
                str(data),
                "--lora_rank",
                "4",
                *extra,
                steps=1,
            )
        )


def test_run_sft_sh_flags_parse_with_the_seed_meaning():
    model_args, data_args, lora_args, training_args = parse_sft_args(
        seed_script_args(REPO / "examples" / "run_sft.sh", "zhtrain.sft")
    )
    assert (
        training_args.learning_rate == 1e-4 and training_args.warmup_steps == 0.03 and training_args.weight_decay == 0
    )
    assert (
        training_args.eval_strategy == "steps" and training_args.eval_steps == 100 and training_args.save_steps == 200
    )
    assert training_args.do_train and training_args.do_eval and training_args.gradient_accumulation_steps == 8
    assert training_args.gradient_checkpointing and training_args.ddp_find_unused_parameters is False
    assert data_args.max_seq_length == 512 and data_args.dataset_dir == "path/to/sft/data/dir"
    assert data_args.validation_file == "validation_file_name" and model_args.torch_dtype == "float16"
    assert lora_args.use_lora and lora_args.lora_rank == 8 and lora_args.peft_path == "path/to/peft/model/dir"
    assert lora_args.modules_to_save_list == ["embed_tokens", "lm_head"] and len(lora_args.target_modules) == 7
    assert training_args.deepspeed.endswith("ds_zero2_no_offload.json")
    if not torch.cuda.is_available():
        assert training_args.fp16 is False and any("--fp16 needs a CUDA GPU" in n for n in training_args.compat_notes)


def test_fastchat_command_flags_parse_with_the_seed_meaning():
    model_args, data_args, lora_args, training_args = parse_sft_args(
        seed_script_args(REPO / "examples" / "train_fastchat.sh", "zhtrain.sft")
    )
    assert not lora_args.use_lora  # FastChat: full fine-tuning
    assert (
        data_args.data_path == "data/dummy_conversation.json"
        and data_args.lazy_preprocess
        and data_args.model_max_length == 2048
    )
    assert training_args.num_train_epochs == 5 and training_args.per_device_train_batch_size == 2
    assert training_args.gradient_accumulation_steps == 16 and training_args.learning_rate == 2e-5
    assert (
        training_args.save_steps == 1200 and training_args.save_total_limit == 10 and training_args.warmup_steps == 0.03
    )
    assert training_args.eval_strategy == "no" and training_args.gradient_checkpointing
    assert training_args.fsdp_config["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]
    if not torch.cuda.is_available():
        notes = " ".join(training_args.compat_notes)
        assert (
            training_args.fsdp is None and "--fsdp 'full_shard auto_wrap' needs CUDA GPUs" in notes and "DDP" in notes
        )
        assert training_args.bf16 is False and training_args.tf32 is None and "--tf32 needs a CUDA GPU" in notes
