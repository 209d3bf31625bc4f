"""`zhtrain pretrain`: continued pre-training ("Stage 2") with LoRA and fully trained embeddings.

A drop-in for the seed's `run_clm_pt_with_peft.py` (same flags, same `pt_lora_model/` output):

    torchrun --nnodes 1 --nproc_per_node 1 -m zhtrain.pretrain --model_name_or_path ... --deepspeed ...

The recipe, in the order things happen:
    parse flags -> check model/tokenizer vocabularies -> tokenize the *.txt folder (cached) ->
    load the model, resize, attach LoRA -> HF Trainer (resume if possible) -> evaluate -> save.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from transformers import set_seed

from zhtrain.args import LoraArguments, ModelArguments, ZhtrainTrainingArguments, parse_args
from zhtrain.data.text import load_text_blocks
from zhtrain.errors import ZhtrainError, run_command
from zhtrain.model import (
    apply_lora,
    cast_trainable_to_fp32,
    count_parameters,
    fit_vocabulary,
    load_base_model,
    load_config,
    load_tokenizer,
    sentencepiece_file,
)
from zhtrain.train import SaveAdapterCallback, build_trainer, prepare_output_dir, set_cpu_threads, setup_logging
from zhtrain.vocab import check_vocab_pair, model_vocab_size

logger = logging.getLogger("zhtrain.pretrain")


@dataclass
class PretrainDataArguments:
    dataset_dir: Optional[str] = field(default=None, metadata={"help": "Folder of plain-text *.txt files, one document per line."})
    data_cache_dir: Optional[str] = field(default="./cache", metadata={"help": "Where tokenized files are cached."})
    validation_split_percentage: float = field(
        default=0.05, metadata={"help": "Fraction (not percent, as in the seed) of blocks held out for evaluation."}
    )
    block_size: Optional[int] = field(default=None, metadata={"help": "Tokens per training block (default: min(1024, model context))."})
    preprocessing_num_workers: Optional[int] = field(default=None, metadata={"help": "Processes for tokenizing (capped at the CPU count)."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Use at most this many training blocks."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Use at most this many evaluation blocks."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Re-tokenize even if a valid cache exists."})
    preprocess_only: bool = field(default=False, metadata={"help": "Build the token cache, print its figures, and exit."})
    debug_mode: bool = field(default=False, metadata={"help": "Use only the first *.txt file."})
    # Accepted so the seed's command lines parse; they do nothing there either.
    dataset_config_name: Optional[str] = field(default=None, metadata={"help": "Unused (seed compatibility)."})
    train_file: Optional[str] = field(default=None, metadata={"help": "Unused (seed compatibility): use --dataset_dir."})
    validation_file: Optional[str] = field(default=None, metadata={"help": "Unused (seed compatibility)."})
    streaming: bool = field(default=False, metadata={"help": "Unused: files are always streamed."})
    keep_linebreaks: bool = field(default=True, metadata={"help": "Unused (seed compatibility): one line = one document."})


ARGUMENT_GROUPS = (ModelArguments, PretrainDataArguments, LoraArguments, ZhtrainTrainingArguments)


def parse_pretrain_args(argv=None):
    return parse_args(ARGUMENT_GROUPS, argv, prog="zhtrain pretrain")


def run_identity(model_args, data_args, lora_args, block_size: int) -> dict:
    """What must match for checkpoints in --output_dir to be resumed by this run."""
    return {
        "model": str(Path(model_args.model_name_or_path).resolve()),
        "tokenizer": str(Path(model_args.tokenizer_name_or_path).resolve()),
        "dataset_dir": str(Path(data_args.dataset_dir).resolve()),
        "block_size": block_size,
        "lora": [lora_args.trainable, lora_args.lora_rank, lora_args.lora_alpha, lora_args.modules_to_save, lora_args.peft_path],
    }


def choose_block_size(requested: Optional[int], config) -> int:
    context = getattr(config, "max_position_embeddings", None) or 1024
    if requested is None:
        return min(1024, context)
    if requested < 2:
        raise ZhtrainError(f"--block_size {requested}: must be at least 2 tokens")
    if requested > context:
        raise ZhtrainError(
            f"--block_size {requested} is larger than the model's context ({context} positions); use --block_size {context} or less"
        )
    return requested


@dataclass
class RunResult:
    metrics: dict
    trainer: object = None  # the HF Trainer (None with --preprocess_only)


def pretrain(model_args, data_args, lora_args, training_args) -> RunResult:
    """The Stage-2 recipe. Returns the final metrics and the trainer (its model is the trained PeftModel)."""
    setup_logging(training_args)
    for note in training_args.compat_notes:
        logger.warning(note)
    threads = set_cpu_threads()
    set_seed(training_args.seed)
    on_gpu = torch.cuda.is_available()
    logger.info("world size %d, %d CPU threads per process, device %s", training_args.world_size, threads, training_args.device)

    # 1. Check everything that can be checked before the slow steps.
    config = load_config(model_args)
    tokenizer = load_tokenizer(model_args.tokenizer_name_or_path, model_args.use_fast_tokenizer, model_args.trust_remote_code)
    purpose = check_vocab_pair(model_vocab_size(config), len(tokenizer), model_args.custom_vocab)
    logger.info("vocabulary: model %d, tokenizer %d -> %s", model_vocab_size(config), len(tokenizer), purpose)
    block_size = choose_block_size(data_args.block_size, config)

    # 2. Data: tokenized once (main process first; the others then read the cache).
    with training_args.main_process_first(desc="tokenizing the dataset"):
        train_data, eval_data, stats = load_text_blocks(
            data_args.dataset_dir,
            tokenizer,
            block_size,
            data_args.data_cache_dir,
            data_args.validation_split_percentage,
            workers=data_args.preprocessing_num_workers or 1,
            debug_mode=data_args.debug_mode,
            overwrite_cache=data_args.overwrite_cache,
            max_train_samples=data_args.max_train_samples,
            max_eval_samples=data_args.max_eval_samples,
            show_progress=training_args.should_log,
        )
    logger.info(stats.summary())
    if data_args.preprocess_only:
        if training_args.should_log:
            print(stats.summary(), flush=True)
        return RunResult({"preprocess_tokens": stats.tokens, "train_blocks": stats.train_blocks, "eval_blocks": stats.eval_blocks})

    resume_from = prepare_output_dir(training_args, run_identity(model_args, data_args, lora_args, block_size))

    # 3. Model: load, fit the vocabulary, attach LoRA.
    model = load_base_model(model_args, config, on_gpu)
    trains_lm_head = "lm_head" in lora_args.modules_to_save_list
    fit_vocabulary(model, tokenizer, model_args.custom_vocab, untie=trains_lm_head)
    if training_args.gradient_checkpointing and training_args.gradient_checkpointing_kwargs is None:
        training_args.gradient_checkpointing_kwargs = {"use_reentrant": False}
    model = apply_lora(model, lora_args, training_args.gradient_checkpointing)
    if (training_args.fp16 or training_args.bf16) and not training_args.deepspeed:
        cast_trainable_to_fp32(model)
    trainable, total = count_parameters(model)
    logger.info("trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)

    # 4. Train and evaluate through the HF Trainer.
    callbacks = [SaveAdapterCallback(tokenizer, sentencepiece_file(model_args.tokenizer_name_or_path), "pt_lora_model")]
    trainer = build_trainer(model, training_args, train_data if training_args.do_train else None, eval_data, tokenizer, callbacks)
    metrics: dict = {"trainable_parameters": trainable, "resumed_from": resume_from}
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=resume_from)
        # A misconfigured distributed run trains one copy per rank silently: say what actually ran.
        logger.info("trained with engine %s, world size %d", type(trainer.model_wrapped).__name__, training_args.world_size)
        train_metrics = dict(result.metrics, train_samples=len(train_data))
        trainer.log_metrics("train", train_metrics)
        trainer.save_metrics("train", train_metrics)
        trainer.save_state()
        metrics.update(train_metrics)
    if training_args.do_eval:
        if eval_data is None:
            raise ZhtrainError("--do_eval needs validation blocks: set --validation_split_percentage above 0")
        eval_metrics = trainer.evaluate()
        eval_metrics["eval_samples"] = len(eval_data)
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
    if training_args.do_train and training_args.should_save:
        print(f"zhtrain pretrain: done; adapter in {Path(training_args.output_dir) / 'pt_lora_model'}", flush=True)
    return RunResult(metrics, trainer)


def main(argv=None) -> None:
    pretrain(*parse_pretrain_args(argv))


if __name__ == "__main__":
    run_command(main, sys.argv[1:])
