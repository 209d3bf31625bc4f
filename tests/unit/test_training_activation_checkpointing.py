"""LoRA dropout masks kept through gradient checkpointing: drawn once, same values."""

from __future__ import annotations

from collections import Counter

import torch
from helpers import tiny_peft_model
from torch.utils._python_dispatch import TorchDispatchMode


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def mask_draws(self) -> int:
        return sum(n for name, n in self.counts.items() if name.startswith("bernoulli"))


def checkpointed_step(tiny_model_dir, keep_masks: bool):
    """Loss, gradients and the dropout masks drawn in forward and in backward (the recompute)."""
    from zhtrain.training.activation_checkpointing import keep_lora_dropout_masks

    model = tiny_peft_model(tiny_model_dir, (), targets=("q_proj", "v_proj", "down_proj"), dropout=0.3)
    if keep_masks:
        assert keep_lora_dropout_masks(model) == 3 * model.config.num_hidden_layers
    model.base_model.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(3, 400, (2, 32), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(9)
    with _CountOps() as forward:
        loss = model(input_ids=ids, labels=ids).loss
    with _CountOps() as backward:
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, forward.mask_draws, backward.mask_draws, torch.get_rng_state()


def test_kept_dropout_masks_give_the_same_gradients_from_one_draw(tiny_model_dir):
    plain_loss, plain_grads, plain_forward, plain_backward, plain_rng = checkpointed_step(
        tiny_model_dir, keep_masks=False
    )
    kept_loss, kept_grads, kept_forward, kept_backward, kept_rng = checkpointed_step(tiny_model_dir, keep_masks=True)
    layers_times_targets = 2 * 3
    assert plain_forward == plain_backward == layers_times_targets, "PyTorch draws each mask again in the recompute"
    assert (kept_forward, kept_backward) == (layers_times_targets, 0)
    assert torch.equal(plain_loss, kept_loss)
    assert plain_grads.keys() == kept_grads.keys() and any("lora_A" in n for n in plain_grads)
    for name in plain_grads:  # bit for bit: the same masks and the same arithmetic
        assert torch.equal(plain_grads[name], kept_grads[name]), name
    assert torch.equal(plain_rng, kept_rng), "the generator ends where the plain run leaves it"


def test_kept_mask_dropout_is_plain_dropout_in_values():
    from zhtrain.training.activation_checkpointing import KeptMaskDropout

    x = torch.randn(3, 17, 40)
    for p in (0.05, 0.5):
        dropout = KeptMaskDropout(p)
        torch.manual_seed(4)
        plain = torch.nn.Dropout(p)
        first, second = plain(x), plain(x)
        torch.manual_seed(4)
        assert torch.equal(dropout(x), first)
        assert torch.equal(dropout(x), second), "the generator moved on: a new mask, as nn.Dropout draws"
        torch.manual_seed(4)
        assert torch.equal(dropout(x), first), "the kept mask is another state's: drawn"
        torch.manual_seed(4)
        assert torch.equal(dropout(x), first), "drawn again from the same state: the kept mask"
        assert torch.equal(dropout(x), second)
        torch.manual_seed(4)
        part = torch.nn.Dropout(p)(x[:, :5])
        after_part = torch.get_rng_state()
        torch.manual_seed(4)
        dropout(x)
        torch.manual_seed(4)
        assert torch.equal(dropout(x[:, :5]), part), "another shape from the same state: drawn, not the kept mask"
        assert torch.equal(torch.get_rng_state(), after_part), "and the generator moved as far as that draw"
    assert KeptMaskDropout(0.5).eval()(x) is x


def test_checkpointing_kwargs_reach_the_trainer(tmp_path, tiny_model_dir):
    from zhtrain.training.activation_checkpointing import KeptMaskDropout, set_checkpointing_kwargs
    from zhtrain.training.args import ZhtrainTrainingArguments

    def args(**extra):
        return ZhtrainTrainingArguments(
            output_dir=str(tmp_path), report_to="none", use_cpu=True, gradient_checkpointing=True, **extra
        )

    def kept(model) -> int:
        return sum(isinstance(m, KeptMaskDropout) for m in model.modules())

    model = tiny_peft_model(tiny_model_dir, (), dropout=0.1)
    training_args = args()
    set_checkpointing_kwargs(model, training_args)
    # The field the Trainer reads (transformers 5.x renamed it; the old name is only copied at init).
    assert training_args.activation_checkpointing_kwargs == {"use_reentrant": False}
    assert kept(model) == 2 * model.config.num_hidden_layers
    off = args(keep_dropout_masks=False)
    model = tiny_peft_model(tiny_model_dir, (), dropout=0.1)
    set_checkpointing_kwargs(model, off)
    assert kept(model) == 0
    given = args(activation_checkpointing_kwargs={"use_reentrant": True})
    set_checkpointing_kwargs(model, given)
    assert given.activation_checkpointing_kwargs == {"use_reentrant": True}, "the user's own kwargs are kept"
