"""Gradient checkpointing that draws each LoRA dropout mask once on CPU.

Under gradient checkpointing each checkpointed layer runs its forward twice, and every LoRA
dropout draws its mask both times: the recompute restores the random generator's state first,
so the second draw repeats the first. On CPU that draw is a serial generator loop, ~13 ns per
element: in the P3 benchmark model (4 layers, hidden 256, 28 LoRA modules) ~115 ms of a ~650 ms
step, half of it redrawing masks already drawn.

`KeptMaskDropout` remembers its last mask (one bit per element) with the generator state before and after
the draw. A mask is a function of that state and the shape, so when it is asked again from the
same state it returns the same mask and moves the generator to where the draw would have left
it: the same values bit for bit (tests/recipes/test_fast_paths.py), one draw, and nothing that depends on
how checkpointing is implemented. The cost is one bit per LoRA input element, held from a
layer's forward to its recompute.

(torch's selective activation checkpointing can keep an op's output too, but its Python dispatch
mode on every op of every layer cost as much as the draws it saved: measured 288 vs 291 ms.)
On a GPU, dropout is one fused kernel with its own generator, cheap to redraw; it stays as is.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)


class KeptMaskDropout(nn.Dropout):
    """`nn.Dropout` with the same output, that reuses its last mask when drawn again from the same
    generator state (see the module docstring). CPU tensors only; others go to `nn.Dropout`."""

    def __init__(self, p: float):
        super().__init__(p)
        self._last: tuple[torch.Tensor, torch.Tensor, torch.Size, np.ndarray] | None = (
            None  # state before, after, shape, bits
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu":
            return super().forward(x)
        keep = 1.0 - self.p
        state = torch.get_rng_state()
        last, self._last = self._last, None
        if last is not None and last[2] == x.shape and torch.equal(last[0], state):
            torch.set_rng_state(last[1])
            noise = torch.from_numpy(np.unpackbits(last[3], count=x.numel())).view(x.shape).to(x.dtype)
        else:
            noise = torch.empty_like(x).bernoulli_(keep)  # what F.dropout draws on CPU
            # One bit per element (0.03 ms to pack, 0.12 ms to unpack a 512 x 688 mask; its draw: 3 ms).
            self._last = (state, torch.get_rng_state(), x.shape, np.packbits(noise.bool().numpy().reshape(-1)))
        return x * noise.div_(keep)  # F.dropout: x * (mask / keep)


def keep_lora_dropout_masks(model: nn.Module) -> int:
    """Swap each LoRA layer's `nn.Dropout` (0 < p < 1) for a KeptMaskDropout; returns how many."""
    swapped = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for name, dropout in dropouts.items():
            if type(dropout) is nn.Dropout and 0.0 < dropout.p < 1.0 and not dropout.inplace:
                dropouts[name] = KeptMaskDropout(dropout.p)
                swapped += 1
    return swapped


def set_checkpointing_kwargs(model: nn.Module, training_args) -> None:
    """Non-reentrant checkpointing (works with frozen inputs and LoRA) unless the user gave kwargs;
    on CPU, LoRA dropout masks drawn once (`--keep_dropout_masks`)."""
    if not training_args.gradient_checkpointing:
        return
    if training_args.device.type == "cpu" and getattr(training_args, "keep_dropout_masks", True):
        swapped = keep_lora_dropout_masks(model)
        if swapped:
            logger.info(
                "gradient checkpointing: %d LoRA dropouts draw each mask once, not again in the recompute", swapped
            )
    # transformers 5.x renamed the field: after TrainingArguments.__post_init__ the Trainer reads only the
    # new name (the old one mirrors it, so it tells whether the user gave kwargs); both are set.
    if training_args.gradient_checkpointing_kwargs is None:
        training_args.activation_checkpointing_kwargs = training_args.gradient_checkpointing_kwargs = {
            "use_reentrant": False
        }
