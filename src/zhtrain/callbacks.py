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
import math
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
from transformers import TrainerCallback

from zhtrain.errors import ZhtrainError
from zhtrain.weights import give_default_mode

logger = logging.getLogger(__name__)

MANIFEST = "zhtrain_checkpoint.json"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# Leftovers of an interrupted atomic write: temp folders (save_adapter), moved-away old ones, trash.
LEFTOVER_RE = re.compile(r"^\.(.+)\.(tmp|old|trash)-(\d+)$")


# ---------------------------------------------------------------------------------------------
# Complete checkpoints


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


def discard(path: Path) -> None:
    """Delete a folder so that an interruption never leaves a partial one under its real name."""
    trash = path.with_name(f".{path.name}.trash-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


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
    tmp = checkpoint / f".{MANIFEST}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump({"step": step, "files": files}, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, checkpoint / MANIFEST)
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
        _barrier()  # only on save steps (every rank decides alike), never once per step

    def on_step_end(self, args, state, control, **kwargs):
        self._about_to_save(args, state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._about_to_save(args, state, control)

    def on_save(self, args, state, control, **kwargs):
        _barrier()  # every rank has written its shards (DeepSpeed) before the folder is called complete
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            give_default_mode(checkpoint)  # the Trainer's safetensors files, written 0600 by safetensors >= 0.8
            write_manifest(checkpoint, state.global_step)
            for old in rotate(Path(args.output_dir), self.save_total_limit, state.best_model_checkpoint):
                logger.info("deleted %s (--save_total_limit %d)", old.name, self.save_total_limit)
        _barrier()


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


# ---------------------------------------------------------------------------------------------
# Non-finite loss


class NonFiniteLossGuard(TrainerCallback):
    """Stop at the first NaN/inf training loss, before that step is logged as fine or saved.

    The Trainer's `logging_nan_inf_filter` (on by default) hides such losses from the log, and a
    NaN step would then be checkpointed and resumed from. `LossCheck` (mixed into the Trainer)
    hands this guard the loss of every micro-batch, as backpropagated (the model's own loss or
    zhtrain's chunked one); the guard looks at it once per optimizer step.
    """

    def __init__(self):
        self._bad: Optional[torch.Tensor] = None  # on the loss's device: no host sync per micro-batch
        self._value: Optional[torch.Tensor] = None

    def observe(self, loss: torch.Tensor) -> None:
        loss = loss.detach().float().reshape(-1)[0]
        bad = ~torch.isfinite(loss)
        if self._bad is None:
            self._bad, self._value = bad, loss
        else:
            self._value = torch.where(bad & ~self._bad, loss, self._value)
            self._bad = self._bad | bad

    def on_step_end(self, args, state, control, **kwargs):
        bad = self._bad is not None and bool(self._bad.item())
        value = float(self._value) if bad else None
        self._bad = self._value = None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([1.0 if bad else 0.0], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            bad = bool(flag.item())  # every rank stops together (one rank's NaN is everyone's)
        if not bad:
            return
        control.should_save = False
        control.should_training_stop = True
        shown = "nan" if value is None or math.isnan(value) else str(value)
        good = last_complete_checkpoint(Path(args.output_dir))
        precision = " (fp16)" if args.fp16 else " (bf16)" if args.bf16 else ""
        raise ZhtrainError(
            f"training loss became {shown}{precision} at step {state.global_step}; stopped without saving that step. "
            f"Newest good checkpoint: {good or 'none'}. Lower --learning_rate (or use --bf16 instead of --fp16) "
            "and run again: zhtrain resumes from that checkpoint"
        )


class LossCheck:
    """Trainer mixin: every training loss goes to `self.loss_guard` (a NonFiniteLossGuard)."""

    loss_guard: NonFiniteLossGuard

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.loss_guard.observe(loss)
        return loss


def with_loss_check(trainer_class: type) -> type:
    """`trainer_class` (the HF Trainer, or zhtrain's ChunkedLossTrainer) with LossCheck mixed in."""
    return type(trainer_class.__name__, (LossCheck, trainer_class), {})
