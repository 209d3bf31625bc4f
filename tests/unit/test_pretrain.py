"""`zhtrain pretrain` before its training loop: flag errors, vocabulary pairs, --preprocess_only, the seed script's
flags."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from helpers import REPO, make_tiny_llama, new_rows_flags, pretrain_flags, run_pretrain, seed_script_args

from zhtrain.errors import ZhtrainError
from zhtrain.pretrain import parse_pretrain_args


def flags(model, tokenizer, data, out, *extra, steps=4):
    return pretrain_flags(model, tokenizer, data, out, *extra, max_steps=steps)


run = run_pretrain


@pytest.mark.parametrize(
    "change, pattern",
    [
        (["--trainable", "q_proj,qkv_proj"], "--trainable: 'qkv_proj' matches no module"),
        (["--modules_to_save", "embed,lm_head"], "--modules_to_save: 'embed' matches no module"),
        (["--block_size", "4096"], "--block_size 4096 is larger than the model's context \\(256"),
        (["--validation_split_percentage", "5"], "must be a fraction"),
        (["--model_name_or_path", "/nonexistent/model"], "no such folder"),
    ],
    ids=["trainable", "modules_to_save", "block_size", "split", "model"],
)
def test_bad_flags_give_one_line_errors(tmp_path, tiny_model_dir, sp_tokenizer_dir, text_dir, change, pattern):
    with pytest.raises(ZhtrainError, match=pattern):
        run(flags(tiny_model_dir, sp_tokenizer_dir, text_dir, tmp_path / "out", steps=1) + change)
    assert not (tmp_path / "out" / "pt_lora_model").exists()


def test_unsupported_vocab_pair_fails_before_any_work(tmp_path, sp_tokenizer_dir, text_dir):
    model = make_tiny_llama(tmp_path / "llama32000", vocab_size=32000)
    with pytest.raises(ZhtrainError, match="model vocabulary 32000 with tokenizer of 400 tokens"):
        run(flags(model, sp_tokenizer_dir, text_dir, tmp_path / "out", steps=1))
    assert not (tmp_path / "cache").exists(), "the check comes before tokenizing"


def test_preprocess_only_builds_the_cache_and_exits(tmp_path, tiny_model_dir, sp_tokenizer_dir, text_dir, capsys):
    result = run(flags(tiny_model_dir, sp_tokenizer_dir, text_dir, tmp_path / "out") + ["--preprocess_only"])
    assert result.trainer is None and result.metrics["preprocess_tokens"] > 0
    assert re.search(r"data: 2 files, 400 lines, [\d,]+ tokens .* tokens/s", capsys.readouterr().out)
    assert list((tmp_path / "cache").glob("*.tokens")) and not (tmp_path / "out").exists()


def test_run_pt_sh_flags_parse_with_the_seed_meaning():
    argv = seed_script_args(REPO / "examples" / "run_pt.sh", "zhtrain.pretrain")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model_args, data_args, lora_args, training_args = parse_pretrain_args(argv)
    # --gradient_checkpointing is the seed's flag: read under transformers 5's name, without its deprecation warning.
    assert getattr(training_args, "activation_checkpointing", True) is True
    assert not [w for w in caught if "gradient_checkpointing" in str(w.message)]
    assert training_args.learning_rate == 2e-4 and training_args.warmup_steps == 0.05
    assert training_args.lr_scheduler_type == "cosine" and training_args.weight_decay == 0.01
    assert training_args.max_steps == 100 and training_args.save_steps == 500 and training_args.save_total_limit == 3
    assert (
        training_args.overwrite_output_dir and training_args.gradient_checkpointing and training_args.logging_first_step
    )
    assert training_args.ddp_timeout == 30000 and training_args.ddp_find_unused_parameters is False
    assert data_args.validation_split_percentage == 0.001 and data_args.block_size == 512
    assert data_args.preprocessing_num_workers == 8 and model_args.torch_dtype == "float16"
    assert lora_args.lora_rank == 8 and lora_args.lora_alpha == 32 and lora_args.lora_dropout == 0.05
    assert lora_args.target_modules == ["q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]
    assert lora_args.modules_to_save_list == ["embed_tokens", "lm_head"]
    if not torch.cuda.is_available():
        assert training_args.fp16 is False and training_args.use_cpu
        assert any("--fp16 needs a CUDA GPU" in note for note in training_args.compat_notes)


def test_stage_flags_are_checked(tiny_model_dir, sp_tokenizer_dir, text_dir, tmp_path):
    with pytest.raises(ZhtrainError, match="--train_new_rows_only applies to Stage 1"):
        run_pretrain(
            new_rows_flags(
                tiny_model_dir, sp_tokenizer_dir, text_dir, tmp_path / "a", "--train_new_rows_only", "--max_steps", "1"
            )
        )
    with pytest.raises(
        ZhtrainError, match=r"--train_new_rows_only: the tokenizer \(400 tokens\) adds no rows to the model \(400\)"
    ):
        run_pretrain(
            new_rows_flags(
                tiny_model_dir,
                sp_tokenizer_dir,
                text_dir,
                tmp_path / "b",
                "--training_stage",
                "embeddings",
                "--train_new_rows_only",
                "--max_steps",
                "1",
            )
        )
