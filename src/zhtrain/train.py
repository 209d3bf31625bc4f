"""Around the HF Trainer: output folder and resume, adapter saving, metrics, run summary.

Everything a run does is visible in the stage recipes (`pretrain.py`); this module holds the
pieces they share.
"""

from __future__ import annotations

import errno
import json
from dataclasses import dataclass
import logging
import math
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from transformers import Trainer, TrainerCallback, default_data_collator

from zhtrain.callbacks import (
    CheckpointGuard,
    NonFiniteLossGuard,
    clean_interrupted_writes,
    discard,
    is_complete,
    last_complete_checkpoint,
    list_checkpoints,
    with_loss_check,
)
from zhtrain.distributed import gather_trainable_state, unwrap
from zhtrain.errors import ZhtrainError, check_not_an_input, check_writable  # noqa: F401  (check_writable: re-exported for the stages)
from zhtrain.loss import ChunkedLossTrainer
from zhtrain.weights import give_default_mode

logger = logging.getLogger(__name__)

RUN_FILE = "zhtrain_run.json"


# ---------------------------------------------------------------------------------------------
# Output folder, resume


def check_output_keeps_inputs(output_dir, model_args, lora_args, adapter_folder: str) -> None:
    """--output_dir is not the model, tokenizer or adapter the run starts from, and does not hold one
    in a `checkpoint-*` folder (--overwrite_output_dir and --save_total_limit remove those) or where
    the run writes its own adapter (`<output_dir>/<adapter_folder>`, replaced at the end)."""
    peft_path = getattr(lora_args, "peft_path", None)
    inputs = [("--model_name_or_path", model_args.model_name_or_path), ("--tokenizer_name_or_path", model_args.tokenizer_name_or_path),
              ("--peft_path", peft_path)]
    check_not_an_input(output_dir, "--output_dir", inputs, under="checkpoint-*")
    if peft_path:
        check_not_an_input(Path(output_dir) / adapter_folder, f"--output_dir {output_dir}: the run's adapter", [("--peft_path", peft_path)])


def prepare_output_dir(training_args, identity: dict) -> Optional[str]:
    """Decide where training starts: a checkpoint to resume from, or None for a fresh run.

    Checkpoints of the same run (same model, tokenizer, data, LoRA shape) are resumed
    automatically, from the newest *complete* one (see callbacks.CheckpointGuard); what a killed
    run left half-written is removed. Checkpoints of a different run, or not written by zhtrain,
    are an error unless --overwrite_output_dir.
    """
    out = Path(training_args.output_dir)
    check_writable(out, "--output_dir")
    requested = training_args.resume_from_checkpoint
    explicit = bool(requested) and requested.lower() not in ("true", "false")
    recorded = _read_run_file(out / RUN_FILE)
    has_checkpoints = bool(list_checkpoints(out))
    if explicit:
        if not (Path(requested) / "trainer_state.json").is_file():
            raise ZhtrainError(f"--resume_from_checkpoint {requested}: not a checkpoint (no trainer_state.json); pass a checkpoint-N folder")
        if not is_complete(Path(requested)):
            logger.warning("%s has no zhtrain completeness manifest (written by another tool?); resuming anyway", requested)
    elif has_checkpoints and not training_args.overwrite_output_dir:
        if recorded is None:
            raise ZhtrainError(
                f"--output_dir {out} holds checkpoint folders not written by zhtrain; pass --resume_from_checkpoint "
                "<one of them> to continue from it, --overwrite_output_dir to start afresh, or choose another --output_dir"
            )
        if recorded != identity:
            changed = sorted(k for k in set(recorded) | set(identity) if recorded.get(k) != identity.get(k))
            raise ZhtrainError(
                f"--output_dir {out} holds checkpoints of a different run (differs in: {', '.join(changed)}); "
                "pass --overwrite_output_dir to start afresh there, or choose another --output_dir"
            )
    if training_args.should_save:
        out.mkdir(parents=True, exist_ok=True)
        if training_args.overwrite_output_dir and not explicit:
            for _, old, _ in list_checkpoints(out):
                discard(old)
        elif recorded == identity:
            # A killed run leaves checkpoints without their manifest and temp folders: never resume from those.
            for name in clean_interrupted_writes(out):
                logger.warning("removed %s: left incomplete by an interrupted run", out / name)
        write_json_atomic(out / RUN_FILE, identity)
    training_args_barrier(training_args)
    resume: Optional[str] = requested if explicit else None
    if not explicit and not training_args.overwrite_output_dir:
        last = last_complete_checkpoint(out)
        resume = str(last) if last else None
    if resume:
        logger.info("resuming from %s", resume)
    return resume


@contextmanager
def explain_disk_full(output_dir):
    """A full disk while saving: one line naming the folder and where a rerun resumes from."""
    try:
        yield
    except Exception as err:  # torch.save, safetensors and tokenizers each report ENOSPC in their own type
        text = str(err)
        if getattr(err, "errno", None) != errno.ENOSPC and not any(s in text for s in ("No space left", "StorageFull", "file write failed")):
            raise
        last = last_complete_checkpoint(Path(output_dir))
        raise ZhtrainError(
            f"--output_dir {output_dir}: the disk is full (writing failed: {text.splitlines()[0][:120]}); free space and run "
            f"again: zhtrain resumes from {last or 'the start'} and ignores the unfinished checkpoint"
        ) from None


def training_args_barrier(training_args) -> None:
    """Other ranks wait until the main process has cleaned the output folder."""
    if training_args.world_size > 1:
        with training_args.main_process_first(desc="preparing --output_dir"):
            pass


def finished_checkpoint(resume_from: Optional[str], training_args) -> bool:
    """True when resuming from a checkpoint that already reached --max_steps.

    The HF Trainer (5.x) would still run one step past it and save checkpoint-N+1: rerunning a
    finished run, or one killed while writing its final adapter, must change nothing.
    """
    if not resume_from or not training_args.max_steps or training_args.max_steps <= 0:
        return False
    state = _read_run_file(Path(resume_from) / "trainer_state.json") or {}
    return int(state.get("global_step", 0)) >= training_args.max_steps


def finish_from_checkpoint(trainer, checkpoint: str, folder: str, tokenizer, sentencepiece_model: Optional[Path]) -> None:
    """Nothing left to train: the model and state of the final checkpoint, and <output_dir>/<folder>
    (re)written from them (the run may have been killed while writing it)."""
    from transformers import TrainerState

    model = trainer.model
    model.load_adapter(checkpoint, model.active_adapter, is_trainable=True)  # as the Trainer resumes a PEFT model
    trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
    if trainer.args.should_save:
        save_adapter(model, tokenizer, sentencepiece_model, Path(trainer.args.output_dir) / folder)
    logger.info("%s already reached --max_steps %d: nothing to train; %s/%s is that checkpoint's adapter",
                checkpoint, trainer.args.max_steps, trainer.args.output_dir, folder)


def load_finished_full_model(trainer, checkpoint: str) -> bool:
    """Full fine-tuning's counterpart of `finish_from_checkpoint`: the final checkpoint's weights and
    state into the (not yet wrapped) model, so the caller saves them without training a step.

    False, and nothing changed, when the checkpoint holds no full set of weights for this model (e.g.
    FSDP's sharded state): the caller then resumes through the Trainer as usual.
    """
    from transformers import TrainerState

    from zhtrain.weights import iter_shard, open_checkpoint

    try:
        saved = open_checkpoint(checkpoint, flag="checkpoint")
    except ZhtrainError:
        return False
    model = unwrap(trainer.model)
    params = model.state_dict()  # tied weights appear under both names, saved under one
    unique = {id(tensor): name for name, tensor in reversed(list(params.items()))}
    shapes_match = all(tuple(params[name].shape) == saved.shapes.get(name) for name in unique.values() if name in saved.shapes)
    covered = {id(params[name]) for name in saved.shapes if name in params}
    if not shapes_match or covered != set(unique) or any(name not in params for name in saved.shapes):
        return False
    with torch.no_grad():
        for shard in saved.shards:
            for name, tensor in iter_shard(shard, saved.keys[shard]):
                params[name].copy_(tensor)
    trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
    logger.info("%s already reached --max_steps %d: nothing to train; the model is that checkpoint's",
                checkpoint, trainer.args.max_steps)
    return True


def _read_run_file(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Saving the adapter folder (pt_lora_model / sft_lora_model)

SAFE_ADAPTER_NAME = "adapter_model.safetensors"  # PEFT's file name, in the adapter folder and the Trainer's checkpoint


def replace_dir(tmp: Path, dest: Path) -> None:
    """Move a finished temp folder into place; the old folder stays until the new one is there."""
    give_default_mode(tmp)
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


def save_adapter(model, tokenizer, sentencepiece_model: Optional[Path], dest: Path, state_dict: Optional[dict] = None) -> Path:
    """Write a self-contained adapter folder: LoRA + full modules_to_save weights (once), config, tokenizer.

    `state_dict`: the gathered trainable weights when the model is sharded (ZeRO-3, FSDP); there
    the model's own tensors are empty shards (the seed's 0-size adapters under ZeRO-3).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    # save_embedding_layers=False: embed_tokens/lm_head are already saved in full as modules_to_save;
    # PEFT's "auto" would add two more copies after a resize (gigabytes for a 7B model).
    unwrap(model).save_pretrained(str(tmp), state_dict=state_dict, save_embedding_layers=False, safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    if sentencepiece_model is not None:
        shutil.copyfile(sentencepiece_model, tmp / "tokenizer.model")  # transformers 5 no longer writes it
    replace_dir(tmp, dest)
    return dest


def link_checkpoint_adapter(checkpoint: Path, adapter: Path) -> None:
    """Make the Trainer's `checkpoint-N/adapter_model.safetensors` (what a resume loads) the adapter
    folder's file, by a hard link (a copy where links are not possible).

    After a vocabulary resize PEFT's default `save_embedding_layers="auto"` stores embed_tokens and
    lm_head three times in the Trainer's file (the trained copy, PEFT's frozen original, the base
    key) and the adapter folder beside it a fourth: ~6.5 GB a checkpoint for a 7B model with 49953
    tokens where 1.6 GB hold everything. The folder's file has the same LoRA and trained weights,
    which is all a resume restores (the frozen originals are rebuilt by the run's own resize).
    """
    trainer_file = checkpoint / SAFE_ADAPTER_NAME
    if not trainer_file.is_file():  # not a PEFT checkpoint, or an engine that writes its own format
        return
    tmp = trainer_file.with_name(f".{trainer_file.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(adapter / SAFE_ADAPTER_NAME, tmp)
    except OSError:
        shutil.copyfile(adapter / SAFE_ADAPTER_NAME, tmp)
    os.replace(tmp, trainer_file)


class SaveAdapterCallback(TrainerCallback):
    """`<output_dir>/checkpoint-N/<folder>/` at each save and `<output_dir>/<folder>/` at the end."""

    def __init__(self, tokenizer, sentencepiece_model: Optional[Path], folder: str = "pt_lora_model"):
        self.tokenizer = tokenizer
        self.sentencepiece_model = sentencepiece_model
        self.folder = folder

    def on_save(self, args, state, control, model=None, **kwargs):
        gathered = gather_trainable_state(model)  # every rank: a collective under ZeRO-3 / FSDP
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            adapter = save_adapter(model, self.tokenizer, self.sentencepiece_model, checkpoint / self.folder, gathered)
            link_checkpoint_adapter(checkpoint, adapter)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        gathered = gather_trainable_state(model)
        if state.is_world_process_zero:
            path = save_adapter(model, self.tokenizer, self.sentencepiece_model, Path(args.output_dir) / self.folder, gathered)
            logger.info("adapter written to %s", path)


# ---------------------------------------------------------------------------------------------
# Metrics


def logits_to_predictions(logits, labels):
    """Keep what the metrics need (argmax and per-token NLL), not [batch, block, vocab] logits."""
    if isinstance(logits, tuple):
        logits = logits[0]
    shifted = logits[:, :-1, :].float()
    targets = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        shifted.reshape(-1, shifted.size(-1)), targets.reshape(-1), reduction="none", ignore_index=-100
    ).view_as(targets)
    return shifted.argmax(-1), nll


def token_metrics(eval_prediction) -> dict:
    (predictions, nll), labels = eval_prediction.predictions, eval_prediction.label_ids
    targets = labels[:, 1:]
    mask = targets != -100
    accuracy = float((predictions == targets)[mask].mean()) if mask.any() else float("nan")
    mean_nll = float(nll[mask].mean()) if mask.any() else float("nan")
    return {"accuracy": accuracy, "perplexity": math.exp(min(mean_nll, 700.0))}


def build_trainer(model, training_args, train_dataset, eval_dataset, tokenizer, callbacks, data_collator=None) -> Trainer:
    """The HF Trainer with the stage's callbacks, then zhtrain's guards (checkpoint guard LAST, so
    a checkpoint is marked complete only after every callback wrote its files into it)."""
    with_eval = eval_dataset is not None
    # The Trainer would rotate before the callbacks finish the new checkpoint; the guard rotates after.
    guard = CheckpointGuard(training_args.save_total_limit)
    training_args.save_total_limit = None
    loss_guard = NonFiniteLossGuard()
    callbacks = [loss_guard, *callbacks, guard]
    trainer_class = ChunkedLossTrainer if getattr(training_args, "chunked_loss", False) else Trainer
    trainer = with_loss_check(trainer_class)(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=data_collator or default_data_collator,
        processing_class=tokenizer,
        compute_metrics=token_metrics if with_eval else None,
        preprocess_logits_for_metrics=logits_to_predictions if with_eval else None,
        callbacks=callbacks,
    )
    trainer.loss_guard = loss_guard
    return trainer


# ---------------------------------------------------------------------------------------------
# Process setup


@dataclass
class RunResult:
    """What a training command returns: its metrics and the HF Trainer (None with --preprocess_only)."""

    metrics: dict
    trainer: object = None


def train_and_log(trainer, training_args, resume_from, train_samples: int) -> dict:
    """trainer.train with the lost-peer / full-disk sentences; logs and saves the train metrics."""
    from zhtrain.distributed import explain_lost_peer

    with explain_lost_peer(training_args), explain_disk_full(training_args.output_dir):
        result = trainer.train(resume_from_checkpoint=resume_from)
    # A misconfigured distributed run trains one copy per rank silently: say what actually ran.
    logger.info("trained with engine %s, world size %d", type(trainer.model_wrapped).__name__, training_args.world_size)
    train_metrics = dict(result.metrics, train_samples=train_samples)
    trainer.log_metrics("train", train_metrics)
    trainer.save_metrics("train", train_metrics)
    trainer.save_state()
    return train_metrics


def evaluate_and_log(trainer, eval_samples: int) -> dict:
    eval_metrics = trainer.evaluate()
    eval_metrics["eval_samples"] = eval_samples
    trainer.log_metrics("eval", eval_metrics)
    trainer.save_metrics("eval", eval_metrics)
    return eval_metrics


def start_run(training_args, log: logging.Logger) -> int:
    """The prologue every training command shares: logging, notes, threads, DeepSpeed, seed."""
    from transformers import set_seed

    from zhtrain.distributed import prepare_deepspeed

    setup_logging(training_args)
    for note in training_args.compat_notes:
        log.warning(note)
    threads = set_cpu_threads()
    prepare_deepspeed(training_args)  # before any model is built: ZeRO-3 partitions weights as they are created
    set_seed(training_args.seed)
    log.info("world size %d, %d CPU threads per process, device %s", training_args.world_size, threads, training_args.device)
    return threads


def set_cpu_threads() -> int:
    """One sensible thread count per process: cores / local processes (unless OMP_NUM_THREADS is set).

    N processes x all-cores threads oversubscribe the CPU, and OpenMP collapses under it.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    # The cores this process may run on (taskset, cpusets), not the host's count.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // max(local, 1))
    torch.set_num_threads(threads)
    return threads


def setup_logging(training_args) -> None:
    import transformers

    level = logging.INFO if training_args.should_log else logging.WARNING
    # The log goes to stdout, as in the seed's scripts (HF examples): stderr keeps progress bars,
    # and a run that fails on bad input prints its one-line error there alone.
    handler = logging.StreamHandler(sys.stdout)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=level, force=True, handlers=[handler])
    logging.getLogger("zhtrain").setLevel(level)
    # transformers' INFO dumps every config; its warnings and the Trainer's progress still show.
    transformers.utils.logging.set_verbosity(logging.WARNING)
    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
