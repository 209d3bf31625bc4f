"""Causal-LM loss without the `tokens x vocab` logits tensor: lm_head + cross-entropy in chunks.

With the Chinese vocabulary (49953 rows) and `lm_head` trained in full, the plain path builds the
fp32 logits of every position, keeps them (and their softmax) for backward, and walks them several
times: for a 512-token block that is 100 MB per tensor, per sequence. Here the head is applied to a
few hundred positions at a time; each chunk's softmax is turned into its gradients for the hidden
states and the head weight right away (as in Liger's fused linear cross-entropy), so only one
chunk's logits exist at any moment and nothing vocab-sized is kept for backward beyond the weight
gradient the optimizer needs anyway.

It plugs into the HF Trainer through `compute_loss` (training.trainer.ZhtrainTrainer); transformers
itself is not patched. The model still runs through its wrapper (PEFT, DDP, DeepSpeed), so LoRA,
gradient checkpointing and gradient synchronisation behave as usual: a forward pre-hook on the
output layer hands us its input (the final hidden states) and lets the layer project zero
positions. Equality with the plain path (loss and gradients) is tested in the unit tests of training/loss.
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import torch
from torch import nn

from zhtrain.data.supervised import IGNORE_INDEX

logger = logging.getLogger(__name__)


CHUNK_ELEMENTS = 1 << 23  # logits per chunk on CPU (at most 32 MB in fp32; 128 rows of 49953 for a 512 block)


GPU_CHUNK_ELEMENTS = 1 << 25  # on a GPU fewer, larger chunks: each chunk is a few kernel launches (128 MB in fp32)


# Model types whose forward is exactly `logits = lm_head(final_hidden_states)` (no soft-capping,
# no logit scale, no auxiliary loss), so computing the loss from the head's input is the same loss.
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


class _LinearCrossEntropy(torch.autograd.Function):
    """sum over rows of CE(hidden @ weight.T, target) * scale, with the gradients computed chunk by chunk.

    `scale` (1 / the normaliser) is folded into the gradients here, on chunk-sized tensors: done in
    backward it would cost a pass over the vocab-sized weight gradient (the Trainer's backward
    passes 1/num_items, not 1). The chunks' logits and log-probabilities live in two buffers reused
    by every chunk (no fresh 30 MB allocation, and its page faults, per chunk); the first chunk
    writes the weight gradient (no zero-filled vocab-sized tensor), the others add to it. Under
    autocast (fp16/bf16) each chunk's weight gradient is one half-precision matmul, as in the plain
    path's backward, summed in fp32 and scaled once at the end (1/N folded into fp16 values could
    underflow).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows: int, scale):
        device_type = hidden.device.type
        compute_dtype = (
            torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
        )
        want_hidden_grad, want_weight_grad = hidden.requires_grad, weight.requires_grad
        want_grad = want_hidden_grad or want_weight_grad
        w = weight.to(compute_dtype)
        rows_total = hidden.size(0)
        grad_hidden = torch.empty_like(hidden) if want_hidden_grad else None
        grad_weight = None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        buffer_rows = min(chunk_rows, rows_total)
        logits_buffer = torch.empty((buffer_rows, w.size(0)), dtype=compute_dtype, device=hidden.device)
        log_probs_buffer = torch.empty((buffer_rows, w.size(0)), dtype=torch.float32, device=hidden.device)
        half = compute_dtype != torch.float32
        all_valid = bool((targets != IGNORE_INDEX).all())  # once: on a GPU each bool() waits for the device
        with torch.autocast(device_type, enabled=False):
            for start in range(0, rows_total, chunk_rows):
                h = hidden[start : start + chunk_rows].to(compute_dtype)
                t = targets[start : start + chunk_rows]
                n = t.size(0)
                valid = t != IGNORE_INDEX
                safe_t = t if all_valid else torch.where(valid, t, 0)
                logits = torch.mm(h, w.t(), out=logits_buffer[:n])
                # log_softmax + gather is exactly what cross_entropy computes.
                log_probs = torch.log_softmax(logits.float(), dim=-1, out=log_probs_buffer[:n])
                picked = log_probs.gather(1, safe_t.unsqueeze(1)).squeeze(1)
                total -= picked.sum() if all_valid else torch.where(valid, picked, 0.0).sum()
                if not want_grad:
                    continue
                # d(sum CE)/d logits = softmax - one_hot(target), zero on ignored rows; in place.
                grad_logits = log_probs.exp_()
                grad_logits[torch.arange(n, device=t.device), safe_t] -= 1.0
                if not all_valid:  # only the ignored rows are written (a block's last row: no next token)
                    grad_logits.index_fill_(0, (~valid).nonzero().squeeze(1), 0.0)
                g = grad_logits.to(compute_dtype)
                if want_hidden_grad:
                    grad_hidden[start : start + n] = (torch.mm(g, w).float() * scale).to(hidden.dtype)
                if want_weight_grad:
                    if half:  # summed in fp32, scaled after the loop
                        partial = torch.mm(g.t(), h)
                        grad_weight = partial.float() if grad_weight is None else grad_weight.add_(partial)
                    elif grad_weight is None:
                        grad_weight = torch.mm(g.t(), h * scale)
                    else:
                        grad_weight.addmm_(g.t(), h * scale)
        if want_weight_grad and grad_weight is None:  # no rows at all
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        elif want_weight_grad and half:
            grad_weight.mul_(scale)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        ctx.has = (want_hidden_grad, want_weight_grad)
        return total * scale

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        want_hidden_grad, want_weight_grad = ctx.has
        # grad_total is 1 unless the loss was scaled after us (fp16 loss scaling, ...): then no vocab-sized copy.
        unscaled = bool(grad_total == 1)
        dh = (grad_hidden if unscaled else grad_hidden * grad_total.to(grad_hidden.dtype)) if want_hidden_grad else None
        dw = (grad_weight if unscaled else grad_weight * grad_total).to(ctx.weight_dtype) if want_weight_grad else None
        return dh, dw, None, None, None


def chunk_rows_for(vocab_size: int, rows: int, device_type: str = "cpu") -> int:
    """Rows per chunk: at most CHUNK_ELEMENTS logits, and chunks of equal size (512 rows of a 49953
    vocabulary: 4 x 128, not 3 x 167 + a slow 11-row tail that streams the whole weight again)."""
    budget = CHUNK_ELEMENTS if device_type == "cpu" else GPU_CHUNK_ELEMENTS
    most = max(16, budget // max(vocab_size, 1))
    chunks = max(1, math.ceil(rows / most))
    return max(1, math.ceil(rows / chunks))


def chunked_causal_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: Optional[torch.Tensor | int] = None,
    chunk_rows: Optional[int] = None,
) -> torch.Tensor:
    """Same value and gradients as transformers' ForCausalLMLoss(hidden @ weight.T, labels).

    Tokens < n predict token n; label -100 is ignored; the sum is divided by `num_items_in_batch`
    when given (the Trainer's count over all gradient-accumulation micro-batches), else by the
    number of counted tokens.
    """
    shift_labels = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    flat_hidden = hidden.reshape(-1, hidden.size(-1))
    flat_labels = shift_labels.reshape(-1).to(flat_hidden.device)
    rows = chunk_rows or chunk_rows_for(weight.size(0), flat_hidden.size(0), flat_hidden.device.type)
    if num_items_in_batch is None:
        num_items_in_batch = (flat_labels != IGNORE_INDEX).sum()
    if torch.is_tensor(num_items_in_batch):
        scale = 1.0 / num_items_in_batch.to(device=flat_hidden.device, dtype=torch.float32)
    else:
        scale = 1.0 / num_items_in_batch
    return _LinearCrossEntropy.apply(flat_hidden, weight, flat_labels, rows, scale)


def plain_output_layers(model) -> Optional[list[nn.Linear]]:
    """The plain `nn.Linear` layers that may compute the logits, or None when the chunked loss can't apply.

    `model.get_output_embeddings()` is the lm_head itself, or PEFT's ModulesToSaveWrapper around
    the original head and the trained copy (which one runs depends on the active adapter, so all
    are hooked and the one that runs reports itself). A LoRA on lm_head or a head with a bias or a
    post-processing step (soft-capping, logit scale) keeps the plain path.
    """
    unwrapped = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(unwrapped, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_HEAD_MODEL_TYPES:
        return None
    head = unwrapped.get_output_embeddings()
    if head is None:
        return None
    leaves = [m for m in head.modules() if not list(m.children())]
    if not leaves or any(type(m) is not nn.Linear or m.bias is not None for m in leaves):
        return None
    return leaves


class HeadInput:
    """Forward pre-hook: keep the head's input (the final hidden states), let the head see 0 positions."""

    def __init__(self):
        self.hidden: Optional[torch.Tensor] = None
        self.layer: Optional[nn.Linear] = None

    def hook_for(self, layer: nn.Linear):
        def pre_hook(module, args, kwargs):
            self.hidden, self.layer = args[0], module
            return (args[0][..., :0, :],) + tuple(args[1:]), kwargs

        return pre_hook
