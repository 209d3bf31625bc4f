"""`zhtrain pretrain`: continued pre-training ("Stage 2") with LoRA and fully trained embeddings.

A drop-in for the seed's `run_clm_pt_with_peft.py` (same flags, same `pt_lora_model/` output):

    torchrun --nnodes 1 --nproc_per_node 1 -m zhtrain.pretrain --model_name_or_path ... --deepspeed ...

The recipe, in the order things happen:
    parse flags -> check model/tokenizer vocabularies -> tokenize the *.txt folder (cached) ->
    load the model, resize, attach LoRA -> HF Trainer (resume if possible) -> evaluate -> save.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from zhtrain.data.text import check_split_fraction, load_text_blocks
from zhtrain.distributed.engines import close_process_group, data_first
from zhtrain.errors import ZhtrainError, at_least, check_writable, run_command
from zhtrain.model.loading import (
    cast_trainable_to_fp32,
    count_parameters,
    load_base_model,
    load_config,
    warn_if_pure_half,
)
from zhtrain.model.lora import apply_lora, check_lora_flags, train_embeddings_only
from zhtrain.model.vocab import (
    NEEDS_BASE_TOKENIZER,
    check_vocab_pair,
    fit_vocabulary,
    model_vocab_size,
)
from zhtrain.tokenizer.loading import (
    load_base_tokenizer,
    load_tokenizer,
    sentencepiece_file,
)
from zhtrain.training.activation_checkpointing import set_checkpointing_kwargs
from zhtrain.training.args import (
    LoraArguments,
    ModelArguments,
    ZhtrainTrainingArguments,
    parse_args,
)
from zhtrain.training.checkpoints import SaveAdapterCallback, take_over_rotation
from zhtrain.training.report import (
    ThroughputCallback,
    build_report,
    summary_line,
    write_report,
)
from zhtrain.training.resume import (
    check_output_keeps_inputs,
    finish_from_checkpoint,
    finished_checkpoint,
    prepare_output_dir,
)
from zhtrain.training.setup import start_run
from zhtrain.training.trainer import (
    RunResult,
    build_trainer,
    evaluate_and_log,
    train_and_log,
)

logger = logging.getLogger("zhtrain.pretrain")


@dataclass
class PretrainDataArguments:
    dataset_dir: Optional[str] = field(
        default=None, metadata={"help": "Folder of plain-text *.txt files, one document per line."}
    )
    data_cache_dir: Optional[str] = field(default="./cache", metadata={"help": "Where tokenized files are cached."})
    validation_split_percentage: float = field(
        default=0.05, metadata={"help": "Fraction (not percent, as in the seed) of blocks held out for evaluation."}
    )
    block_size: Optional[int] = field(
        default=None, metadata={"help": "Tokens per training block (default: min(1024, model context))."}
    )
    preprocessing_num_workers: Optional[int] = field(
        default=None, metadata={"help": "Processes for tokenizing (capped at the CPU count; default: one per core)."}
    )
    fast_tokenization: bool = field(
        default=True,
        metadata={
            "help": "Tokenize with raw sentencepiece / the tokenizers backend when they give exactly the HF "
            "tokenizer's ids on a sample (checked each run); False: always the HF tokenizer."
        },
    )
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Use at most this many training blocks."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Use at most this many evaluation blocks."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Re-tokenize even if a valid cache exists."})
    preprocess_only: bool = field(
        default=False, metadata={"help": "Build the token cache, print its figures, and exit."}
    )
    debug_mode: bool = field(default=False, metadata={"help": "Use only the first *.txt file."})
    # Accepted so the seed's command lines parse; they do nothing there either.
    dataset_config_name: Optional[str] = field(default=None, metadata={"help": "Unused (seed compatibility)."})
    train_file: Optional[str] = field(
        default=None, metadata={"help": "Unused (seed compatibility): use --dataset_dir."}
    )
    validation_file: Optional[str] = field(default=None, metadata={"help": "Unused (seed compatibility)."})
    streaming: bool = field(default=False, metadata={"help": "Unused: files are always streamed."})
    keep_linebreaks: bool = field(
        default=True, metadata={"help": "Unused (seed compatibility): one line = one document."}
    )

    def __post_init__(self):
        for flag in ("max_train_samples", "max_eval_samples", "preprocessing_num_workers"):
            at_least(getattr(self, flag), 1, f"--{flag}")
        check_split_fraction(self.validation_split_percentage)  # at parse time, not after tokenizing the corpus


@dataclass
class PretrainLoraArguments(LoraArguments):
    training_stage: str = field(
        default="lora",
        metadata={
            "help": "lora: Stage 2, LoRA + the --modules_to_save (the seed's run). embeddings: Stage 1, only "
            "embed_tokens and lm_head are trained, the transformer is frozen (pt_lora_model keeps the standard layout, "
            "its LoRA at zero).",
            "choices": ["lora", "embeddings"],
        },
    )
    train_new_rows_only: bool = field(
        default=False,
        metadata={
            "help": "Stage 1: only the rows the tokenizer added are trained; the model's own rows stay bit-identical."
        },
    )


ARGUMENT_GROUPS = (ModelArguments, PretrainDataArguments, PretrainLoraArguments, ZhtrainTrainingArguments)


def parse_pretrain_args(argv=None):
    return parse_args(ARGUMENT_GROUPS, argv, prog="zhtrain pretrain")


def run_identity(model_args, data_args, lora_args, block_size: int) -> dict:
    """What must match for checkpoints in --output_dir to be resumed by this run."""
    return {
        "model": str(Path(model_args.model_name_or_path).resolve()),
        "tokenizer": str(Path(model_args.tokenizer_name_or_path).resolve()),
        "dataset_dir": str(Path(data_args.dataset_dir).resolve()),
        "block_size": block_size,
        "lora": [
            lora_args.trainable,
            lora_args.lora_rank,
            lora_args.lora_alpha,
            lora_args.modules_to_save,
            lora_args.peft_path,
        ],
        **(
            {"stage": [lora_args.training_stage, lora_args.train_new_rows_only]}
            if lora_args.training_stage != "lora"
            else {}
        ),
    }


def check_training_stage(lora_args, model_vocab: int, tokenizer_len: int) -> None:
    """--train_new_rows_only belongs to Stage 1 and needs new rows to train."""
    if not lora_args.train_new_rows_only:
        return
    if lora_args.training_stage == "lora":
        raise ZhtrainError("--train_new_rows_only applies to Stage 1: add --training_stage embeddings")
    if tokenizer_len <= model_vocab:
        raise ZhtrainError(
            f"--train_new_rows_only: the tokenizer ({tokenizer_len} tokens) adds no rows to the model ({model_vocab}); "
            "pass an extended tokenizer, or drop the flag to train all rows"
        )


def apply_overrides(lora_args, training_args) -> Optional[int]:
    """Every setting `zhtrain pretrain` changes from what the flags say, each logged in one line. Returns
    the checkpoint rotation limit (see checkpoints.take_over_rotation)."""
    if lora_args.training_stage == "embeddings":
        if lora_args.modules_to_save_list and set(lora_args.modules_to_save_list) != {"embed_tokens", "lm_head"}:
            logger.warning(
                "--modules_to_save %s -> embed_tokens,lm_head: --training_stage embeddings trains those two",
                lora_args.modules_to_save,
            )
        lora_args.modules_to_save = "embed_tokens,lm_head"
    if lora_args.train_new_rows_only and training_args.weight_decay:
        # AdamW's decoupled decay would shrink the frozen rows even with zero gradients.
        logger.warning(
            "--weight_decay %s -> 0: with --train_new_rows_only the model's own rows must stay unchanged",
            training_args.weight_decay,
        )
        training_args.weight_decay = 0.0
    return take_over_rotation(training_args, logger)


def choose_block_size(requested: Optional[int], config) -> int:
    context = getattr(config, "max_position_embeddings", None) or 1024
    if requested is None:
        return min(1024, context)
    if requested < 2:
        raise ZhtrainError(f"--block_size {requested}: must be at least 2 tokens")
    if requested > context:
        raise ZhtrainError(
            f"--block_size {requested} is larger than the model's context ({context} positions); use --block_size "
            f"{context} or less"
        )
    return requested


def pretrain(model_args, data_args, lora_args, training_args) -> RunResult:
    """The Stage-2 recipe. Returns the final metrics and the trainer (its model is the trained PeftModel)."""
    started = time.perf_counter()
    start_run(training_args, logger)
    on_gpu = torch.cuda.is_available()

    # 1. Check everything that can be checked before the slow steps.
    config = load_config(model_args)
    tokenizer = load_tokenizer(
        model_args.tokenizer_name_or_path,
        model_args.use_fast_tokenizer,
        model_args.trust_remote_code,
        model_args.tokenizer_backend,
    )
    purpose = check_vocab_pair(model_vocab_size(config), len(tokenizer), model_args.custom_vocab)
    logger.info("vocabulary: model %d, tokenizer %d -> %s", model_vocab_size(config), len(tokenizer), purpose)
    block_size = choose_block_size(data_args.block_size, config)
    check_training_stage(lora_args, model_vocab_size(config), len(tokenizer))
    rotation_limit = apply_overrides(lora_args, training_args)
    if training_args.do_eval and not data_args.validation_split_percentage and not data_args.preprocess_only:
        raise ZhtrainError("--do_eval needs validation blocks: set --validation_split_percentage above 0")
    check_lora_flags(config, lora_args, model_args.trust_remote_code)
    check_writable(data_args.data_cache_dir or ".", "--data_cache_dir")
    if not data_args.preprocess_only:
        check_output_keeps_inputs(
            training_args.output_dir, model_args, lora_args, "pt_lora_model"
        )  # every rank: paths only
        if training_args.should_save:
            check_writable(training_args.output_dir, "--output_dir")

    # 2. Data: tokenized once (main process first; the others then read the cache).
    with data_first(training_args):
        train_data, eval_data, stats = load_text_blocks(
            data_args.dataset_dir,
            tokenizer,
            block_size,
            data_args.data_cache_dir,
            data_args.validation_split_percentage,
            workers=data_args.preprocessing_num_workers,
            debug_mode=data_args.debug_mode,
            overwrite_cache=data_args.overwrite_cache,
            max_train_samples=data_args.max_train_samples,
            max_eval_samples=data_args.max_eval_samples,
            show_progress=training_args.should_log,
            fast_tokenization=data_args.fast_tokenization,
        )
    logger.info(stats.summary())
    if data_args.preprocess_only:
        if training_args.should_log:
            print(stats.summary(), flush=True)
        return RunResult(
            {"preprocess_tokens": stats.tokens, "train_blocks": stats.train_blocks, "eval_blocks": stats.eval_blocks}
        )

    resume_from = prepare_output_dir(training_args, run_identity(model_args, data_args, lora_args, block_size))

    # 3. Model: load, fit the vocabulary, attach LoRA.
    model = load_base_model(model_args, config, on_gpu)
    trains_lm_head = "lm_head" in lora_args.modules_to_save_list
    old_rows = model_vocab_size(config)
    # New rows that are neither trained nor saved must be what merge/generate rebuild: the mean.
    init = model_args.new_token_init if {"embed_tokens", "lm_head"} <= set(lora_args.modules_to_save_list) else "mean"
    base_tokenizer = (
        load_base_tokenizer(model_args, tokenizer)
        if init in NEEDS_BASE_TOKENIZER and len(tokenizer) > old_rows
        else None
    )
    fit_vocabulary(model, tokenizer, untie=trains_lm_head, new_token_init=init, base_tokenizer=base_tokenizer)
    # PEFT's frozen copies of embed_tokens/lm_head are dropped unless an engine shards or flattens the weights.
    model = apply_lora(
        model,
        lora_args,
        training_args.gradient_checkpointing,
        drop_frozen_copies=not (training_args.deepspeed or training_args.fsdp),
    )
    set_checkpointing_kwargs(model, training_args)
    if lora_args.training_stage == "embeddings":
        train_embeddings_only(model, first_row=old_rows if lora_args.train_new_rows_only else 0)
    if (training_args.fp16 or training_args.bf16) and not training_args.deepspeed:
        cast_trainable_to_fp32(model)
    warn_if_pure_half(model, training_args)
    trainable, total = count_parameters(model)
    logger.info("trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)

    # 4. Train and evaluate through the HF Trainer.
    throughput = ThroughputCallback()
    callbacks = [
        SaveAdapterCallback(tokenizer, sentencepiece_file(model_args.tokenizer_name_or_path), "pt_lora_model"),
        throughput,
    ]
    trainer = build_trainer(
        model,
        training_args,
        train_data if training_args.do_train else None,
        eval_data,
        tokenizer,
        callbacks,
        rotation_limit,
    )
    metrics: dict = {"trainable_parameters": trainable, "resumed_from": resume_from}
    if training_args.do_train and finished_checkpoint(resume_from, training_args):
        finish_from_checkpoint(
            trainer, resume_from, "pt_lora_model", tokenizer, sentencepiece_file(model_args.tokenizer_name_or_path)
        )
    elif training_args.do_train:
        metrics.update(train_and_log(trainer, training_args, resume_from, len(train_data)))
    if training_args.do_eval:
        if eval_data is None:
            raise ZhtrainError("--do_eval needs validation blocks: set --validation_split_percentage above 0")
        metrics.update(evaluate_and_log(trainer, len(eval_data)))
    # 5. Report: report.json / report.md / loss.png, and one summary line.
    if training_args.should_save:
        tokens_per_step = (
            training_args.per_device_train_batch_size
            * training_args.gradient_accumulation_steps
            * training_args.world_size
            * block_size
        )
        report = build_report(
            "pretrain",
            trainer,
            stats,
            vocabulary={"model": model_vocab_size(config), "tokenizer": len(tokenizer), "mode": purpose},
            parameters=(trainable, total),
            throughput=throughput,
            tokens_per_step=tokens_per_step,
            extra={
                "resumed_from": resume_from,
                "adapter": str(Path(training_args.output_dir) / "pt_lora_model") if training_args.do_train else None,
            },
        )
        report_path = write_report(training_args.output_dir, report, trainer.state.log_history)
        print(
            f"zhtrain pretrain: done in {time.perf_counter() - started:.0f}s; {summary_line(report)}; report in "
            f"{report_path}",
            flush=True,
        )
    return RunResult(metrics, trainer)


def main(argv=None) -> None:
    pretrain(*parse_pretrain_args(argv))  # the result (trainer, engine) is dropped before the group closes
    close_process_group()


if __name__ == "__main__":
    run_command(main, sys.argv[1:])
