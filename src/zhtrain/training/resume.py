"""Where a run starts: the output folder checked and cleaned, the checkpoint to resume from, and a
finished run left as it is.

Checkpoints of the same run (same model, tokenizer, data, LoRA shape) are resumed automatically from
the newest complete one (see checkpoints.CheckpointGuard); what a killed run left half-written is
removed; checkpoints of another run are refused unless --overwrite_output_dir.
"""

from __future__ import annotations

import errno
import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch

from zhtrain.distributed.sharded import unwrap
from zhtrain.errors import ZhtrainError, check_not_an_input, check_writable
from zhtrain.files import discard, write_json_atomic
from zhtrain.training.checkpoints import (
    clean_interrupted_writes,
    is_complete,
    last_complete_checkpoint,
    list_checkpoints,
    save_adapter,
)
from zhtrain.weights.hf_folder import iter_shard, open_checkpoint

logger = logging.getLogger(__name__)


RUN_FILE = "zhtrain_run.json"


def check_output_keeps_inputs(output_dir, model_args, lora_args, adapter_folder: str) -> None:
    """--output_dir is not the model, tokenizer or adapter the run starts from, and does not hold one
    in a `checkpoint-*` folder (--overwrite_output_dir and --save_total_limit remove those) or where
    the run writes its own adapter (`<output_dir>/<adapter_folder>`, replaced at the end)."""
    peft_path = getattr(lora_args, "peft_path", None)
    inputs = [
        ("--model_name_or_path", model_args.model_name_or_path),
        ("--tokenizer_name_or_path", model_args.tokenizer_name_or_path),
        ("--peft_path", peft_path),
    ]
    check_not_an_input(output_dir, "--output_dir", inputs, under="checkpoint-*")
    if peft_path:
        check_not_an_input(
            Path(output_dir) / adapter_folder,
            f"--output_dir {output_dir}: the run's adapter",
            [("--peft_path", peft_path)],
        )


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
            raise ZhtrainError(
                f"--resume_from_checkpoint {requested}: not a checkpoint (no trainer_state.json); pass a checkpoint-N "
                "folder"
            )
        if not is_complete(Path(requested)):
            logger.warning(
                "%s has no zhtrain completeness manifest (written by another tool?); resuming anyway", requested
            )
    elif has_checkpoints and not training_args.overwrite_output_dir:
        if recorded is None:
            raise ZhtrainError(
                f"--output_dir {out} holds checkpoint folders not written by zhtrain; pass --resume_from_checkpoint "
                "<one of them> to continue from it, --overwrite_output_dir to start afresh, or choose another "
                "--output_dir"
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
        if getattr(err, "errno", None) != errno.ENOSPC and not any(
            s in text for s in ("No space left", "StorageFull", "file write failed")
        ):
            raise
        last = last_complete_checkpoint(Path(output_dir))
        raise ZhtrainError(
            f"--output_dir {output_dir}: the disk is full (writing failed: {text.splitlines()[0][:120]}); free space "
            f"and run again: zhtrain resumes from {last or 'the start'} and ignores the unfinished checkpoint"
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


def finish_from_checkpoint(
    trainer, checkpoint: str, folder: str, tokenizer, sentencepiece_model: Optional[Path]
) -> None:
    """Nothing left to train: the model and state of the final checkpoint, and <output_dir>/<folder>
    (re)written from them (the run may have been killed while writing it)."""
    from transformers import TrainerState

    model = trainer.model
    model.load_adapter(checkpoint, model.active_adapter, is_trainable=True)  # as the Trainer resumes a PEFT model
    trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
    if trainer.args.should_save:
        save_adapter(model, tokenizer, sentencepiece_model, Path(trainer.args.output_dir) / folder)
    logger.info(
        "%s already reached --max_steps %d: nothing to train; %s/%s is that checkpoint's adapter",
        checkpoint,
        trainer.args.max_steps,
        trainer.args.output_dir,
        folder,
    )


def load_finished_full_model(trainer, checkpoint: str) -> bool:
    """Full fine-tuning's counterpart of `finish_from_checkpoint`: the final checkpoint's weights and
    state into the (not yet wrapped) model, so the caller saves them without training a step.

    False, and nothing changed, when the checkpoint holds no full set of weights for this model (e.g.
    FSDP's sharded state): the caller then resumes through the Trainer as usual.
    """
    from transformers import TrainerState

    try:
        saved = open_checkpoint(checkpoint, flag="checkpoint")
    except ZhtrainError:
        return False
    model = unwrap(trainer.model)
    params = model.state_dict()  # tied weights appear under both names, saved under one
    unique = {id(tensor): name for name, tensor in reversed(list(params.items()))}
    shapes_match = all(
        tuple(params[name].shape) == saved.shapes.get(name) for name in unique.values() if name in saved.shapes
    )
    covered = {id(params[name]) for name in saved.shapes if name in params}
    if not shapes_match or covered != set(unique) or any(name not in params for name in saved.shapes):
        return False
    with torch.no_grad():
        for shard in saved.shards:
            for name, tensor in iter_shard(shard, saved.keys[shard]):
                params[name].copy_(tensor)
    trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
    logger.info(
        "%s already reached --max_steps %d: nothing to train; the model is that checkpoint's",
        checkpoint,
        trainer.args.max_steps,
    )
    return True


def _read_run_file(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
