"""The Trainer's guards in a real training loop: rotation waits until the new checkpoint is complete, and a NaN loss
stops the run before its step is saved."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from helpers import training_args
from transformers import TrainerCallback

from zhtrain.errors import ZhtrainError
from zhtrain.training.args import LoraArguments
from zhtrain.training.checkpoints import (
    MANIFEST,
    SaveAdapterCallback,
    last_complete_checkpoint,
    list_checkpoints,
    take_over_rotation,
)
from zhtrain.training.trainer import build_trainer


def tiny_trainer(tmp_path, tiny_model_dir, sp_tokenizer_dir, text_dir, callbacks, **overrides):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zhtrain.data.text import load_text_blocks
    from zhtrain.model.lora import apply_lora

    tokenizer = AutoTokenizer.from_pretrained(str(sp_tokenizer_dir))
    train, _, _ = load_text_blocks(str(text_dir), tokenizer, 32, str(tmp_path / "cache"), 0.0, show_progress=False)
    args = training_args(tmp_path / "out", **overrides)
    torch.manual_seed(0)
    model = apply_lora(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), LoraArguments(), False)
    adapter = SaveAdapterCallback(tokenizer, None, "pt_lora_model")
    return build_trainer(
        model,
        args,
        train,
        None,
        tokenizer,
        [adapter, *callbacks],
        take_over_rotation(args, logging.getLogger(__name__)),
    )


class WatchSaves(TrainerCallback):
    """Runs in on_save before the guard: what is on disk while the new checkpoint is being finished."""

    def __init__(self):
        self.seen = []

    def on_save(self, args, state, control, **kwargs):
        out = Path(args.output_dir)
        self.seen.append((state.global_step, [(step, ok) for step, _, ok in list_checkpoints(out)]))


def test_rotation_waits_until_the_new_checkpoint_is_complete(tmp_path, tiny_model_dir, sp_tokenizer_dir, text_dir):
    watch = WatchSaves()
    trainer = tiny_trainer(
        tmp_path, tiny_model_dir, sp_tokenizer_dir, text_dir, [watch], max_steps=6, save_total_limit=1
    )
    trainer.train()
    # While checkpoint-N is unfinished (no manifest yet), the previous complete one is still there.
    assert watch.seen == [
        (2, [(2, False)]),
        (4, [(2, True), (4, False)]),
        (6, [(4, True), (6, False)]),
    ]
    out = tmp_path / "out"
    assert [(step, ok) for step, _, ok in list_checkpoints(out)] == [(6, True)]
    manifest = json.loads((out / "checkpoint-6" / MANIFEST).read_text())
    assert "pt_lora_model/adapter_model.safetensors" in manifest["files"] and "optimizer.pt" in manifest["files"]


class PoisonAt(TrainerCallback):
    """Make one LoRA weight NaN just before step `step`: the loss of that step is NaN."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if "lora_A" in n).fill_(math.nan)


def test_nan_loss_stops_before_the_step_is_saved(tmp_path, tiny_model_dir, sp_tokenizer_dir, text_dir):
    trainer = tiny_trainer(tmp_path, tiny_model_dir, sp_tokenizer_dir, text_dir, [PoisonAt(6)], max_steps=10)
    out = tmp_path / "out"
    with pytest.raises(
        ZhtrainError,
        match=rf"training loss became nan at step 6; stopped .* Newest good checkpoint: {out / 'checkpoint-4'}",
    ):
        trainer.train()
    # Step 6 would have been saved (save_steps 2): it was not, and checkpoint-4 stays the newest.
    assert [(step, ok) for step, _, ok in list_checkpoints(out)] == [(2, True), (4, True)]
    assert last_complete_checkpoint(out) == out / "checkpoint-4"
    assert not (out / "pt_lora_model").exists(), "no adapter is written from a NaN model"
