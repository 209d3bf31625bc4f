"""`zhtrain sft`: supervised fine-tuning on conversations or instructions, assistant-only loss.

Both seed commands run with only the program name changed:

    # FastChat train_mem.py
    torchrun --nproc_per_node=8 -m zhtrain.sft --data_path conv.json --fsdp "full_shard auto_wrap" ...
    # Chinese-Alpaca run_sft.sh
    torchrun --nnodes 1 --nproc_per_node 1 -m zhtrain.sft --dataset_dir data --lora_rank 8 ...

LoRA SFT when `--lora_rank` or `--peft_path` is given (writes `sft_lora_model/` like
`pt_lora_model/`), full fine-tuning otherwise (FastChat; writes a transformers model folder);
`--full_finetuning` forces full. `train_mem` is an alias: memory-efficient attention is
`--attn_implementation sdpa|flash_attention_2` (sdpa by default), no monkeypatching.

The recipe, in the order things happen:
    parse flags -> template, tokenizer, pad token -> read and check the data files ->
    encode conversations into ids + masks (or lazily) -> [--preprocess_only: write, summarise, stop] ->
    load the model, fit the vocabulary, LoRA or full -> HF Trainer (resume if possible) ->
    evaluate -> save (adapter or gathered full model) with the template used.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from transformers import TrainerCallback

from zhtrain.data.chat import find_data_files, load_conversations
from zhtrain.data.supervised import (
    LazySupervisedDataset,
    PadToLongest,
    SupervisedDataset,
    choose_pad_token,
    encode_conversations,
    summarize,
    write_preprocessed,
)
from zhtrain.data.templates import get_template, save_template
from zhtrain.distributed import sharded
from zhtrain.distributed.engines import close_process_group
from zhtrain.errors import (
    ZhtrainError,
    at_least,
    check_distinct,
    check_output_file,
    check_writable,
    run_command,
)
from zhtrain.model.loading import (
    cast_trainable_to_fp32,
    count_parameters,
    load_base_model,
    load_config,
    warn_if_pure_half,
)
from zhtrain.model.lora import apply_lora
from zhtrain.model.vocab import (
    NEEDS_BASE_TOKENIZER,
    SEED_VOCAB_SIZES,
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
    load_finished_full_model,
    prepare_output_dir,
)
from zhtrain.training.setup import start_run
from zhtrain.training.trainer import (
    RunResult,
    build_trainer,
    evaluate_and_log,
    train_and_log,
)
from zhtrain.weights.adapter_file import check_adapter_folder

logger = logging.getLogger("zhtrain.sft")

DEFAULT_MAX_LENGTH = 512  # both seeds' default (FastChat model_max_length, Chinese-Alpaca max_seq_length)


@dataclass
class SftDataArguments:
    data_path: Optional[str] = field(
        default=None,
        metadata={"help": "FastChat: training data, a JSON/JSONL file (or comma-separated files, or a folder)."},
    )
    eval_data_path: Optional[str] = field(default=None, metadata={"help": "FastChat: evaluation data file."})
    dataset_dir: Optional[str] = field(
        default=None, metadata={"help": "Chinese-Alpaca: a folder of *.json / *.jsonl training files."}
    )
    validation_file: Optional[str] = field(default=None, metadata={"help": "Chinese-Alpaca: evaluation data file."})
    train_file: Optional[str] = field(default=None, metadata={"help": "Alias of --data_path."})
    data_format: str = field(
        default="auto", metadata={"help": "auto | sharegpt (FastChat) | openai (messages) | alpaca."}
    )
    template: Optional[str] = field(
        default=None,
        metadata={
            "help": "Prompt template: vicuna_v1.1 | alpaca | llama2_chat | tokenizer. Default: alpaca with "
            "--dataset_dir (run_sft.sh), vicuna_v1.1 otherwise (FastChat)."
        },
    )
    system_prompt: Optional[str] = field(
        default=None, metadata={"help": "System prompt for samples without one (default: the template's)."}
    )
    model_max_length: Optional[int] = field(
        default=None, metadata={"help": f"Max tokens per sample (FastChat's name; default {DEFAULT_MAX_LENGTH})."}
    )
    max_seq_length: Optional[int] = field(
        default=None, metadata={"help": "Chinese-Alpaca's name for --model_max_length."}
    )
    lazy_preprocess: bool = field(
        default=False, metadata={"help": "Tokenize each sample when the trainer asks for it, not up front."}
    )
    preprocess_only: bool = field(default=False, metadata={"help": "Encode the data, print the summary, and exit."})
    preprocessed_output: Optional[str] = field(
        default=None, metadata={"help": "With --preprocess_only: write one JSON line per sample here."}
    )
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Use at most this many training samples."})
    max_eval_samples: Optional[int] = field(
        default=None, metadata={"help": "Use at most this many evaluation samples."}
    )
    # Accepted so the seed's command lines parse; they did nothing in the seed's SFT either.
    data_cache_dir: Optional[str] = field(
        default=None, metadata={"help": "Unused (seed compatibility): encoding is fast and not cached."}
    )
    preprocessing_num_workers: Optional[int] = field(
        default=None, metadata={"help": "Unused (seed compatibility): the fast tokenizer batches in parallel."}
    )
    overwrite_cache: bool = field(default=False, metadata={"help": "Unused (seed compatibility)."})
    validation_split_percentage: Optional[float] = field(
        default=None, metadata={"help": "Unused (seed compatibility): pass --validation_file."}
    )
    keep_linebreaks: bool = field(default=True, metadata={"help": "Unused (seed compatibility)."})

    def __post_init__(self):
        for flag in ("max_train_samples", "max_eval_samples", "model_max_length", "max_seq_length"):
            at_least(getattr(self, flag), 1, f"--{flag}")
        if self.preprocessed_output and not self.preprocess_only:
            raise ZhtrainError(
                "--preprocessed_output is written only with --preprocess_only; add it, or drop --preprocessed_output"
            )


@dataclass
class SftLoraArguments(LoraArguments):
    lora_rank: Optional[int] = field(
        default=None, metadata={"help": "LoRA rank r. Giving it (or --peft_path) turns LoRA SFT on."}
    )
    full_finetuning: bool = field(
        default=False, metadata={"help": "Train all weights even if LoRA flags are given (Chinese-Alpaca-2's flag)."}
    )

    @property
    def use_lora(self) -> bool:
        return not self.full_finetuning and (self.lora_rank is not None or self.peft_path is not None)


ARGUMENT_GROUPS = (ModelArguments, SftDataArguments, SftLoraArguments, ZhtrainTrainingArguments)


def parse_sft_args(argv=None):
    return parse_args(ARGUMENT_GROUPS, argv, prog="zhtrain sft")


def sft(model_args, data_args, lora_args, training_args) -> RunResult:
    """The SFT recipe. Returns the metrics and the trainer (None with --preprocess_only)."""
    run_started = time.perf_counter()
    start_run(training_args, logger)
    on_gpu = torch.cuda.is_available()

    # 1. Template, tokenizer, data: everything checkable before the model loads.
    template = get_template(data_args.template or ("alpaca" if data_args.dataset_dir else "vicuna_v1.1"))
    logger.info(
        "template %s%s",
        template.name,
        ""
        if data_args.template
        else " (default for " + ("--dataset_dir" if data_args.dataset_dir else "--data_path") + ")",
    )
    config = load_config(model_args)
    max_length = choose_max_length(data_args, config)
    tokenizer = load_tokenizer(
        model_args.tokenizer_name_or_path,
        model_args.use_fast_tokenizer,
        model_args.trust_remote_code,
        model_args.tokenizer_backend,
    )
    logger.info(choose_pad_token(tokenizer))
    train_files, eval_files = data_files(data_args)
    if training_args.do_eval and not eval_files and not data_args.preprocess_only:
        raise ZhtrainError("--do_eval needs evaluation data: pass --validation_file or --eval_data_path")
    check_vocabulary(model_vocab_size(config), len(tokenizer))
    if lora_args.use_lora and training_args.fsdp:
        raise ZhtrainError(
            "--fsdp with LoRA: an adapter is small; use DDP or --deepspeed for LoRA SFT, FSDP for full fine-tuning"
        )
    if lora_args.use_lora and lora_args.peft_path:
        check_adapter_folder(lora_args.peft_path, "--peft_path")
    if data_args.preprocessed_output:
        check_output_file(
            data_args.preprocessed_output,
            "--preprocessed_output",
            [("a data file", file) for file in train_files + eval_files],
        )
    elif not data_args.preprocess_only:
        check_output_keeps_inputs(
            training_args.output_dir, model_args, lora_args, "sft_lora_model"
        )  # every rank: paths only
        if training_args.should_save:
            check_writable(training_args.output_dir, "--output_dir")
    train_convs = load_conversations(train_files, data_args.data_format)[: data_args.max_train_samples]
    unanswered = sum(c.unanswered for c in train_convs)
    if unanswered:
        logger.info("%d final user messages without a reply are left out (nothing to train on them)", unanswered)
    eval_convs = (
        load_conversations(eval_files, data_args.data_format)[: data_args.max_eval_samples] if eval_files else None
    )

    # 2. Encode: ids and masks segment by segment (lazily: in __getitem__).
    started = time.perf_counter()
    if data_args.lazy_preprocess and not data_args.preprocess_only:
        encode_conversations(
            train_convs[:1], tokenizer, template, max_length, data_args.system_prompt
        )  # fail fast on the template
        train_data = LazySupervisedDataset(train_convs, tokenizer, template, max_length, data_args.system_prompt)
        eval_data = (
            LazySupervisedDataset(eval_convs, tokenizer, template, max_length, data_args.system_prompt)
            if eval_convs
            else None
        )
        if training_args.train_sampling_strategy == "group_by_length":
            logger.warning(
                "--group_by_length needs every sample's length: with --lazy_preprocess each sample is tokenized once "
                "more up front for it"
            )
        summaries = {}
        logger.info(
            "data: %d conversations, encoded lazily when the trainer asks (truncated or dropped samples are reported "
            "then)",
            len(train_convs),
        )
    else:
        train_samples = encode_conversations(train_convs, tokenizer, template, max_length, data_args.system_prompt)
        eval_samples = (
            encode_conversations(eval_convs, tokenizer, template, max_length, data_args.system_prompt)
            if eval_convs
            else []
        )
        flag = "--max_seq_length" if data_args.max_seq_length else "--model_max_length"
        summaries = {"train": summarize(train_samples, "train", max_length, flag, train_files)}
        if eval_samples:
            summaries["eval"] = summarize(eval_samples, "eval", max_length, flag, eval_files)
        seconds = time.perf_counter() - started
        for summary in summaries.values():
            logger.info("%s", summary.line("data"))
        train_data = SupervisedDataset(train_samples)
        eval_data = SupervisedDataset(eval_samples) if eval_samples else None
        if data_args.preprocess_only:
            return finish_preprocess_only(data_args, training_args, summaries, train_samples + eval_samples, seconds)

    resume_from = prepare_output_dir(
        training_args, run_identity(model_args, train_files, template.name, max_length, lora_args)
    )
    rotation_limit = apply_overrides(model_args, lora_args, training_args)

    # 3. Model: load, then LoRA over the frozen base or every weight trained.
    model = load_base_model(model_args, config, on_gpu)
    build_model = build_lora_model if lora_args.use_lora else build_full_model
    model = build_model(model, tokenizer, model_args, lora_args, training_args)
    set_checkpointing_kwargs(model, training_args)
    warn_if_pure_half(model, training_args)
    trainable, total = count_parameters(model)
    logger.info("trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)

    # 4. Train and evaluate through the HF Trainer.
    sp_model = sentencepiece_file(model_args.tokenizer_name_or_path)
    callbacks = [SaveTemplateCallback(template.name, data_args.system_prompt, lora_args.use_lora)]
    if lora_args.use_lora:
        callbacks.insert(0, SaveAdapterCallback(tokenizer, sp_model, "sft_lora_model"))
    throughput = ThroughputCallback()  # the report's tokens/s, from the Trainer's count of non-padding tokens
    callbacks.append(throughput)
    collator = PadToLongest(tokenizer.pad_token_id)
    # FastChat's train.py always trains and passes no --do_train: train unless only --do_eval was asked.
    do_train = training_args.do_train or not training_args.do_eval
    trainer = build_trainer(
        model,
        training_args,
        train_data if do_train else None,
        eval_data,
        tokenizer,
        callbacks,
        rotation_limit,
        collator,
    )
    metrics: dict = {"trainable_parameters": trainable, "resumed_from": resume_from, "template": template.name}
    data_summaries = {name: {k: v for k, v in vars(s).items() if k != "reasons"} for name, s in summaries.items()}
    metrics.update(
        {f"{name}_{key}": value for name, summary in data_summaries.items() for key, value in summary.items()}
    )
    if do_train:
        train = train_lora if lora_args.use_lora else train_full
        metrics.update(
            train(
                trainer,
                training_args,
                resume_from,
                len(train_data),
                tokenizer,
                sp_model,
                template.name,
                data_args.system_prompt,
            )
        )
    if training_args.do_eval:
        metrics.update(evaluate_and_log(trainer, len(eval_data)))
    if training_args.should_save:  # report.md / report.json / loss.png and the summary line
        where = Path(training_args.output_dir) / ("sft_lora_model" if lora_args.use_lora else "")
        report = build_report(
            "sft",
            trainer,
            data_summaries,
            vocabulary={"model": model_vocab_size(config), "tokenizer": len(tokenizer), "template": template.name},
            parameters=(trainable, total),
            throughput=throughput,
            extra={
                "resumed_from": resume_from,
                ("adapter" if lora_args.use_lora else "model"): str(where) if do_train else None,
            },
        )
        report_path = write_report(training_args.output_dir, report, trainer.state.log_history)
        print(
            f"zhtrain sft: done in {time.perf_counter() - run_started:.0f}s; {summary_line(report)} (template "
            f"{template.name}); report in {report_path}",
            flush=True,
        )
    return RunResult(metrics, trainer)


def choose_max_length(data_args, config) -> int:
    given = {v for v in (data_args.model_max_length, data_args.max_seq_length) if v is not None}
    if len(given) > 1:
        raise ZhtrainError(
            f"--model_max_length {data_args.model_max_length} and --max_seq_length {data_args.max_seq_length} "
            "disagree; they are the same setting, pass one"
        )
    length = given.pop() if given else DEFAULT_MAX_LENGTH
    context = getattr(config, "max_position_embeddings", None)
    if length < 2:
        raise ZhtrainError(f"--model_max_length {length}: must be at least 2 tokens")
    if context and length > context:
        raise ZhtrainError(
            f"--model_max_length {length} is larger than the model's context ({context} positions); use {context} or "
            "less"
        )
    return length


def data_files(data_args) -> tuple[list[Path], list[Path]]:
    sources = [
        (data_args.data_path, "--data_path"),
        (data_args.train_file, "--train_file"),
        (data_args.dataset_dir, "--dataset_dir"),
    ]
    given = [(value, flag) for value, flag in sources if value]
    if not given:
        raise ZhtrainError(
            "no training data: pass --data_path FILE (FastChat) or --dataset_dir FOLDER (Chinese-Alpaca)"
        )
    if len(given) > 1:
        raise ZhtrainError(f"{' and '.join(flag for _, flag in given)} both given; pass one source of training data")
    train = find_data_files(*given[0])
    check_distinct(train, given[0][1])  # a file listed twice would be trained on twice
    if data_args.eval_data_path and data_args.validation_file:
        raise ZhtrainError("--eval_data_path and --validation_file both given; they are the same setting, pass one")
    eval_spec = data_args.eval_data_path or data_args.validation_file
    return train, find_data_files(eval_spec, "--eval_data_path" if data_args.eval_data_path else "--validation_file")


def finish_preprocess_only(data_args, training_args, summaries, samples, seconds) -> RunResult:
    if data_args.preprocessed_output and training_args.should_save:
        write_preprocessed(samples, Path(data_args.preprocessed_output))
    if training_args.should_log:
        for name, summary in summaries.items():
            print(f"zhtrain sft: {summary.line(name)}", flush=True)
        print(
            f"zhtrain sft: encoded {len(samples)} samples in {seconds:.2f} s ({len(samples) / max(seconds, 1e-9):.0f} "
            "samples/s)" + (f"; written to {data_args.preprocessed_output}" if data_args.preprocessed_output else ""),
            flush=True,
        )
    metrics = {
        f"{name}_{key}": value for name, s in summaries.items() for key, value in vars(s).items() if key != "reasons"
    }
    return RunResult(dict(metrics, preprocess_seconds=seconds))


def run_identity(model_args, files, template: str, max_length: int, lora_args) -> dict:
    """What must match for checkpoints in --output_dir to be resumed by this run."""
    lora = (
        [lora_args.trainable, lora_args.lora_rank, lora_args.lora_alpha, lora_args.modules_to_save, lora_args.peft_path]
        if lora_args.use_lora
        else "full"
    )
    return {
        "model": str(Path(model_args.model_name_or_path).resolve()),
        "tokenizer": str(Path(model_args.tokenizer_name_or_path).resolve()),
        "data": [str(Path(f).resolve()) for f in files],
        "template": template,
        "max_length": max_length,
        "lora": lora,
    }


def modules_to_save(lora_args) -> list[str]:
    """The modules the adapter trains in full: from the flags, or from --peft_path's adapter_config.json."""
    if lora_args.peft_path:
        config = Path(lora_args.peft_path) / "adapter_config.json"
        try:
            return list(json.loads(config.read_text(encoding="utf-8")).get("modules_to_save") or [])
        except (OSError, ValueError) as err:
            raise ZhtrainError(
                f"--peft_path {lora_args.peft_path}: cannot read adapter_config.json ({err}); pass a LoRA adapter "
                "folder"
            ) from err
    return lora_args.modules_to_save_list


def check_vocabulary(model_rows: int, tokenizer_len: int) -> None:
    """SFT keeps the model's vocabulary unless the tokenizer is larger (e.g. base LLaMA + the Alpaca
    tokenizer and LoRA of the reference's "continue the Alpaca LoRA" path): then it grows. A smaller
    tokenizer is fine for a padded embedding matrix, not for one of the seed's sizes."""
    if tokenizer_len < model_rows and model_rows in SEED_VOCAB_SIZES:
        raise ZhtrainError(
            f"tokenizer has {tokenizer_len} tokens but the model has {model_rows} rows: this is not the model's "
            "tokenizer; pass the tokenizer the model was trained with"
        )


def apply_overrides(model_args, lora_args, training_args) -> Optional[int]:
    """Every setting `zhtrain sft` changes from what the flags say, each logged in one line. Returns the
    checkpoint rotation limit (see checkpoints.take_over_rotation)."""
    if not lora_args.use_lora and model_args.torch_dtype is None:
        logger.info(
            "full fine-tuning loads float32 weights (--torch_dtype not given): fp32 master weights, --bf16/--fp16 "
            "add autocast"
        )
        model_args.torch_dtype = "float32"
    if training_args.include_num_input_tokens_seen == "no":
        logger.info(
            "--include_num_input_tokens_seen no -> non_padding: the report's tokens/s counts the non-padding tokens"
        )
        training_args.include_num_input_tokens_seen = "non_padding"
    return take_over_rotation(training_args, logger)


def build_lora_model(model, tokenizer, model_args, lora_args, training_args):
    """LoRA SFT: a new adapter (or --peft_path continued) over the frozen base; written to sft_lora_model/."""
    fully_trained = modules_to_save(lora_args)
    # New rows must be what merge/generate rebuild when the adapter does not carry them: the mean.
    init = model_args.new_token_init if {"embed_tokens", "lm_head"} <= set(fully_trained) else "mean"
    grows = len(tokenizer) > model_vocab_size(model.config)
    base_tokenizer = load_base_tokenizer(model_args, tokenizer) if init in NEEDS_BASE_TOKENIZER and grows else None
    grew = fit_vocabulary(
        model, tokenizer, untie="lm_head" in fully_trained, new_token_init=init, base_tokenizer=base_tokenizer
    )
    if grew and "embed_tokens" not in fully_trained:
        logger.warning(
            "the new tokens' embedding rows stay untrained under LoRA; add --modules_to_save embed_tokens,lm_head to "
            "train them"
        )
    model = apply_lora(model, lora_args, training_args.gradient_checkpointing)
    if (training_args.fp16 or training_args.bf16) and not training_args.deepspeed:
        cast_trainable_to_fp32(model)
    logger.info("LoRA SFT (--lora_rank/--peft_path given): the adapter goes to sft_lora_model/")
    return model


def build_full_model(model, tokenizer, model_args, lora_args, training_args):
    """Full fine-tuning (FastChat): every weight trained, FSDP units = the decoder layers; written as a model folder."""
    grows = len(tokenizer) > model_vocab_size(model.config)
    init = model_args.new_token_init
    base_tokenizer = load_base_tokenizer(model_args, tokenizer) if init in NEEDS_BASE_TOKENIZER and grows else None
    fit_vocabulary(model, tokenizer, untie=False, new_token_init=init, base_tokenizer=base_tokenizer)
    logger.info(
        "full fine-tuning (%s): the model goes to %s",
        "--full_finetuning" if lora_args.full_finetuning else "no --lora_rank/--peft_path",
        training_args.output_dir,
    )
    if training_args.fsdp:
        classes = sharded.layer_classes(model, (training_args.fsdp_config or {}).get("transformer_layer_cls_to_wrap"))
        training_args.fsdp_plugin_args["transformer_cls_names_to_wrap"] = ",".join(c.__name__ for c in classes)
        logger.info("FSDP wraps each %s", "/".join(c.__name__ for c in classes))
    return model


def train_lora(trainer, training_args, resume_from, samples: int, tokenizer, sp_model, template: str, system) -> dict:
    """Train the adapter (SaveAdapterCallback writes sft_lora_model/); a finished run changes nothing."""
    if finished_checkpoint(resume_from, training_args):
        finish_from_checkpoint(trainer, resume_from, "sft_lora_model", tokenizer, sp_model)
        return {}
    metrics = train_and_log(trainer, training_args, resume_from, samples)
    return dict(metrics, world_size=training_args.world_size, engine=type(trainer.model_wrapped).__name__)


def train_full(trainer, training_args, resume_from, samples: int, tokenizer, sp_model, template: str, system) -> dict:
    """Train every weight, then gather and write the model folder with its template."""
    metrics = {}
    if not (finished_checkpoint(resume_from, training_args) and load_finished_full_model(trainer, resume_from)):
        metrics = train_and_log(trainer, training_args, resume_from, samples)
        metrics = dict(metrics, world_size=training_args.world_size, engine=type(trainer.model_wrapped).__name__)
    # A collective: every rank takes part in the gather, rank 0 writes.
    sharded.save_full_model(trainer.model_wrapped, tokenizer, training_args.output_dir, sp_model)
    if training_args.should_save:
        save_template(training_args.output_dir, template, system)
    return metrics


class SaveTemplateCallback(TrainerCallback):
    """`zhtrain_template.json` beside every saved model/adapter, so generation uses the same template."""

    def __init__(self, template: str, system: Optional[str], lora: bool):
        self.template, self.system, self.lora = template, system, lora

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            for folder in [checkpoint] + ([checkpoint / "sft_lora_model"] if self.lora else []):
                save_template(folder, self.template, self.system)

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.lora:
            save_template(Path(args.output_dir) / "sft_lora_model", self.template, self.system)


def main(argv=None) -> None:
    sft(*parse_sft_args(argv))  # the result (trainer, engine) is dropped before the group closes
    close_process_group()


if __name__ == "__main__":
    run_command(main, sys.argv[1:])
