"""The one Trainer zhtrain runs: the HF Trainer with the NaN/inf guard and the chunked loss, its
metrics, and the train / evaluate steps every training command shares."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from transformers import Trainer, TrainerCallback, default_data_collator

from zhtrain.distributed.engines import explain_lost_peer
from zhtrain.errors import ZhtrainError
from zhtrain.training.checkpoints import CheckpointGuard, last_complete_checkpoint
from zhtrain.training.loss import (
    IGNORE_INDEX,
    HeadInput,
    chunked_causal_lm_loss,
    plain_output_layers,
)
from zhtrain.training.resume import explain_disk_full

logger = logging.getLogger(__name__)


def _under_sharded_engine(trainer: Trainer) -> bool:
    """ZeRO-3 / FSDP hold only a shard of each weight outside the module's own forward."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return bool(is_deepspeed_zero3_enabled() or getattr(trainer, "is_fsdp_enabled", False))


class NonFiniteLossGuard(TrainerCallback):
    """Stop at the first NaN/inf training loss, before that step is logged as fine or saved.

    The Trainer's `logging_nan_inf_filter` (on by default) hides such losses from the log, and a
    NaN step would then be checkpointed and resumed from. `ZhtrainTrainer.training_step`
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


class ZhtrainTrainer(Trainer):
    """The HF Trainer, plus two things: every training loss goes to `loss_guard` (a NaN/inf stops the
    run before that step is saved), and with `chunked_loss` (the default --chunked_loss) the training
    loss is computed without the tokens x vocab logits (see training/loss.py).

    Evaluation (which needs logits for token accuracy) and any model the chunked loss cannot handle
    use the Trainer's own loss.
    """

    def __init__(self, *args, loss_guard: NonFiniteLossGuard, chunked_loss: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_guard = loss_guard
        self._chunked_layers = None
        if chunked_loss:
            self._chunked_layers = None if _under_sharded_engine(self) else plain_output_layers(self.model)
            if self._chunked_layers is None:
                logger.info("chunked lm_head loss not applicable to this model; using the plain loss")

    @property
    def chunked_loss_active(self) -> bool:
        return self._chunked_layers is not None

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.loss_guard.observe(loss)
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if (
            return_outputs
            or self._chunked_layers is None
            or not model.training
            or inputs.get("labels") is None
            or self.label_smoother is not None
            or self.compute_loss_func is not None
        ):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        capture = HeadInput()
        handles = [
            layer.register_forward_pre_hook(capture.hook_for(layer), with_kwargs=True) for layer in self._chunked_layers
        ]
        try:
            model(**model_inputs)  # through the wrappers (DDP/DeepSpeed/PEFT); the head projects nothing
        finally:
            for handle in handles:
                handle.remove()
        if capture.hidden is None:
            raise RuntimeError("chunked loss: the model's forward never called its output layer")
        normalizer = num_items_in_batch if self.model_accepts_loss_kwargs else None
        loss = chunked_causal_lm_loss(capture.hidden, capture.layer.weight, labels, normalizer)
        # Mirror Trainer.compute_loss: a token-count-normalised loss is averaged across processes.
        if (
            self.args.average_tokens_across_devices
            and self.model_accepts_loss_kwargs
            and num_items_in_batch is not None
        ):
            loss_scale = self.accelerator.num_processes // self.get_tp_size()
            loss = loss * (loss_scale if self.args.n_gpu <= 1 else self.args.n_gpu)
        return loss


def logits_to_predictions(logits, labels):
    """Keep what the metrics need (argmax and per-token NLL), not [batch, block, vocab] logits."""
    if isinstance(logits, tuple):
        logits = logits[0]
    shifted = logits[:, :-1, :].float()
    targets = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        shifted.reshape(-1, shifted.size(-1)), targets.reshape(-1), reduction="none", ignore_index=IGNORE_INDEX
    ).view_as(targets)
    return shifted.argmax(-1), nll


def token_metrics(eval_prediction) -> dict:
    (predictions, nll), labels = eval_prediction.predictions, eval_prediction.label_ids
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    accuracy = float((predictions == targets)[mask].mean()) if mask.any() else float("nan")
    mean_nll = float(nll[mask].mean()) if mask.any() else float("nan")
    return {"accuracy": accuracy, "perplexity": math.exp(min(mean_nll, 700.0))}


def build_trainer(
    model,
    training_args,
    train_dataset,
    eval_dataset,
    tokenizer,
    callbacks,
    rotation_limit: Optional[int],
    data_collator=None,
) -> ZhtrainTrainer:
    """The Trainer with the stage's callbacks, then zhtrain's guards (checkpoint guard LAST, so a
    checkpoint is marked complete only after every callback wrote its files into it; it keeps the
    newest `rotation_limit` checkpoints, see checkpoints.take_over_rotation)."""
    with_eval = eval_dataset is not None
    loss_guard = NonFiniteLossGuard()
    callbacks = [loss_guard, *callbacks, CheckpointGuard(rotation_limit)]
    trainer = ZhtrainTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=data_collator or default_data_collator,
        processing_class=tokenizer,
        compute_metrics=token_metrics if with_eval else None,
        preprocess_logits_for_metrics=logits_to_predictions if with_eval else None,
        callbacks=callbacks,
        loss_guard=loss_guard,
        chunked_loss=getattr(training_args, "chunked_loss", False),
    )
    return trainer


@dataclass
class RunResult:
    """What a training command returns: its metrics and the HF Trainer (None with --preprocess_only)."""

    metrics: dict
    trainer: object = None


def train_and_log(trainer, training_args, resume_from, train_samples: int) -> dict:
    """trainer.train with the lost-peer / full-disk sentences; logs and saves the train metrics."""

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
