"""Trainer callbacks that keep a run safe: complete checkpoints only, and a stop on a non-finite loss.

The HF Trainer writes `checkpoint-N/` in place and rotates old checkpoints (`--save_total_limit`)
before the callbacks have added their files. A kill -9 in that window leaves a half-written folder
that `get_last_checkpoint` would resume from, possibly after the last good one was deleted. Here:

* `CheckpointGuard` runs after every other `on_save`: it flushes the folder to disk, then writes a
  manifest (`zhtrain_checkpoint.json`: every file and its size) last, by rename. A checkpoint is
  complete only when its manifest is there and matches. Rotation happens here, after that, and
  deletes by renaming the old folder away first, so a kill mid-delete leaves no "complete" husk.
* `NonFiniteLossGuard` checks every training loss; on NaN/inf it stops the run before that step
  can be saved, naming the step and the newest good checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Optional

from transformers import TrainerCallback

from zhtrain.distributed.sharded import barrier, gather_trainable_state, unwrap
from zhtrain.files import discard, give_default_mode, write_aside

logger = logging.getLogger(__name__)


MANIFEST = "zhtrain_checkpoint.json"


CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


# Leftovers of an interrupted atomic write: temp folders (save_adapter), moved-away old ones, trash.
LEFTOVER_RE = re.compile(r"^\.(.+)\.(tmp|old|trash)-(\d+)$")


def checkpoint_step(path: Path) -> Optional[int]:
    match = CHECKPOINT_RE.match(path.name)
    return int(match.group(1)) if match and path.is_dir() else None


def is_complete(checkpoint: Path) -> bool:
    """True when the manifest was written (last) and every file it lists has its recorded size."""
    try:
        manifest = json.loads((Path(checkpoint) / MANIFEST).read_text(encoding="utf-8"))
        return all((Path(checkpoint) / name).stat().st_size == size for name, size in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path, bool]]:
    """(step, folder, complete) for every checkpoint-N folder, oldest first."""
    found = []
    if Path(output_dir).is_dir():
        for path in Path(output_dir).iterdir():
            step = checkpoint_step(path)
            if step is not None:
                found.append((step, path, is_complete(path)))
    return sorted(found)


def last_complete_checkpoint(output_dir: Path) -> Optional[Path]:
    complete = [path for _, path, ok in list_checkpoints(output_dir) if ok]
    return complete[-1] if complete else None


def clean_interrupted_writes(output_dir: Path) -> list[str]:
    """Remove what a killed run left half-done: checkpoints without a manifest, temp/trash folders.

    Leftovers of a process that is still alive (another rank, another run) are kept.
    Returns the names removed, for the log.
    """
    removed = []
    roots = [Path(output_dir)] + [path for _, path, _ in list_checkpoints(output_dir)]
    for root in roots:
        for path in root.iterdir() if root.is_dir() else ():
            match = LEFTOVER_RE.match(path.name)
            if match and not _process_alive(int(match.group(3))):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(str(path.relative_to(output_dir)))
    for _, path, complete in list_checkpoints(output_dir):
        if not complete:
            discard(path)
            removed.append(path.name)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_manifest(checkpoint: Path, step: int) -> None:
    """fsync every file, then write the manifest by rename: it exists only if all else is on disk."""
    files = {}
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.name != MANIFEST):
        _fsync(path)
        files[str(path.relative_to(checkpoint))] = path.stat().st_size
    with write_aside(checkpoint / MANIFEST) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        json.dump({"step": step, "files": files}, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    _fsync(checkpoint)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rotate(output_dir: Path, limit: Optional[int], keep: Optional[str] = None) -> list[Path]:
    """Keep the newest `limit` complete checkpoints (and `keep`, the best one); delete older ones."""
    if not limit or limit <= 0:
        return []
    complete = [path for _, path, ok in list_checkpoints(output_dir) if ok]
    protected = {complete[-1]} if complete else set()
    if keep:
        protected.add(Path(keep))
    excess = len(complete) - max(limit, len(protected))
    removed = []
    for path in complete:
        if excess <= 0:
            break
        if path not in protected:
            discard(path)
            removed.append(path)
            excess -= 1
    return removed


def take_over_rotation(training_args, log) -> Optional[int]:
    """--save_total_limit is applied by `CheckpointGuard` after a checkpoint is complete, not by the
    Trainer (which rotates before the callbacks have written their files): the Trainer's own limit is
    switched off. Returns the limit for the guard."""
    limit = training_args.save_total_limit
    if limit:
        log.info(
            "--save_total_limit %d: old checkpoints are deleted by zhtrain once the new one is complete "
            "(the Trainer's own rotation is off)",
            limit,
        )
    training_args.save_total_limit = None
    return limit


class CheckpointGuard(TrainerCallback):
    """Mark each checkpoint complete once everything is written; rotate only then. Add it LAST."""

    def __init__(self, save_total_limit: Optional[int]):
        self.save_total_limit = save_total_limit

    def _about_to_save(self, args, state, control):
        # A folder of that name is from an abandoned run (e.g. killed mid-save): the Trainer would
        # write over it in place, mixing old and new files under an old manifest.
        if not control.should_save:
            return
        if state.is_world_process_zero:
            stale = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if stale.exists():
                discard(stale)
        barrier()  # only on save steps (every rank decides alike), never once per step

    def on_step_end(self, args, state, control, **kwargs):
        self._about_to_save(args, state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._about_to_save(args, state, control)

    def on_save(self, args, state, control, **kwargs):
        barrier()  # every rank has written its shards (DeepSpeed) before the folder is called complete
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            give_default_mode(checkpoint)  # the Trainer's safetensors files, written 0600 by safetensors >= 0.8
            write_manifest(checkpoint, state.global_step)
            for old in rotate(Path(args.output_dir), self.save_total_limit, state.best_model_checkpoint):
                logger.info("deleted %s (--save_total_limit %d)", old.name, self.save_total_limit)
        barrier()


SAFE_ADAPTER_NAME = "adapter_model.safetensors"  # PEFT's file name, in the adapter folder and the Trainer's checkpoint


def save_adapter(
    model, tokenizer, sentencepiece_model: Optional[Path], dest: Path, state_dict: Optional[dict] = None
) -> Path:
    """Write a self-contained adapter folder: LoRA + full modules_to_save weights (once), config, tokenizer.

    `state_dict`: the gathered trainable weights when the model is sharded (ZeRO-3, FSDP); there
    the model's own tensors are empty shards (the seed's 0-size adapters under ZeRO-3).
    """
    dest = Path(dest)
    with write_aside(dest) as tmp:
        # save_embedding_layers=False: embed_tokens/lm_head are already saved in full as modules_to_save;
        # PEFT's "auto" would add two more copies after a resize (gigabytes for a 7B model).
        unwrap(model).save_pretrained(
            str(tmp), state_dict=state_dict, save_embedding_layers=False, safe_serialization=True
        )
        tokenizer.save_pretrained(str(tmp))
        if sentencepiece_model is not None:
            shutil.copyfile(sentencepiece_model, tmp / "tokenizer.model")  # transformers 5 no longer writes it
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
    with write_aside(trainer_file) as tmp:
        try:
            os.link(adapter / SAFE_ADAPTER_NAME, tmp)
        except OSError:
            shutil.copyfile(adapter / SAFE_ADAPTER_NAME, tmp)


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
            path = save_adapter(
                model, self.tokenizer, self.sentencepiece_model, Path(args.output_dir) / self.folder, gathered
            )
            logger.info("adapter written to %s", path)
