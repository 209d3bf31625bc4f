"""The chunked lm_head + cross-entropy: same loss and gradients as cross-entropy over full logits, whatever scales the
loss afterwards, in equal chunks; and where it does not apply."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_peft_model
from torch import nn

from zhtrain.training.loss import chunk_rows_for, chunked_causal_lm_loss


def test_rows_are_split_into_equal_chunks_of_at_most_the_budget():
    assert chunk_rows_for(49953, 512) == 128  # 4 x 128, not 3 x 167 + an 11-row tail
    assert chunk_rows_for(49953, 100) == 100  # one chunk
    assert chunk_rows_for(32000, 1000) == 250  # at most 262 rows of 32000 logits -> 4 chunks
    assert chunk_rows_for(400, 96) == 96


def plain_loss(hidden, weight, labels, num_items):
    logits = hidden @ weight.t()
    shifted = nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, weight.size(0)), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )
    count = (labels[:, 1:] != -100).sum() if num_items is None else num_items
    return shifted / count


@pytest.mark.parametrize("num_items", [None, 29, "tensor"])
@pytest.mark.parametrize("chunk_rows", [None, 7, 1000])
@pytest.mark.parametrize("upstream", [1.0, 3.0])
def test_chunked_loss_equals_full_logits_cross_entropy(num_items, chunk_rows, upstream):
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(300, 16, generator=gen) * 0.3).requires_grad_()
    hidden = torch.randn(2, 40, 16, generator=gen).requires_grad_()
    labels = torch.randint(0, 300, (2, 40), generator=gen)
    labels[0, :9] = -100
    labels[1, -4:] = -100
    items = torch.tensor(29) if num_items == "tensor" else num_items
    want = plain_loss(hidden, weight, labels, items)
    (want * upstream).backward()  # upstream != 1: a loss scaled after the loss function (fp16 scaling, DDP average)
    want_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    got = chunked_causal_lm_loss(hidden, weight, labels, items, chunk_rows)
    (got * upstream).backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hidden.grad, want_grads[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(weight.grad, want_grads[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunked_loss_under_autocast_matches_the_plain_loss_under_autocast(dtype):
    """fp16/bf16 (the GPU recipes): half-precision matmuls as in the plain path, fp32 sums, no underflow
    of the 1/N-scaled gradients (run here with CPU autocast; same code path as CUDA's)."""
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(300, 16, generator=gen) * 0.3).requires_grad_()
    hidden = torch.randn(2, 40, 16, generator=gen).requires_grad_()
    labels = torch.randint(0, 300, (2, 40), generator=gen)
    labels[0, :9] = -100
    grads = []
    for fn in (
        lambda: plain_loss(hidden, weight, labels, None),
        lambda: chunked_causal_lm_loss(hidden, weight, labels, None, 7),
    ):
        hidden.grad = weight.grad = None
        with torch.autocast("cpu", dtype=dtype):
            loss = fn()
        loss.float().backward()
        assert weight.grad.dtype == torch.float32 and torch.isfinite(weight.grad).all()
        grads.append((loss.float().detach(), hidden.grad.clone(), weight.grad.clone()))
    (want, want_h, want_w), (got, got_h, got_w) = grads
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
    for a, b in ((got_h, want_h), (got_w, want_w)):
        assert ((a - b).norm() / b.norm()).item() < 2e-2


def test_lora_on_lm_head_keeps_the_plain_loss(tiny_model_dir):
    from zhtrain.training.loss import plain_output_layers

    model = tiny_peft_model(tiny_model_dir, (), targets=("q_proj", "lm_head"))
    assert plain_output_layers(model) is None
