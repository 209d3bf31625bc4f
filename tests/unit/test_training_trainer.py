"""zhtrain's Trainer: the chunked loss gives the model's own loss and gradients."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_peft_model


def trainer_for(model, chunked: bool, tmp_path):
    from transformers import TrainingArguments

    from zhtrain.training.trainer import NonFiniteLossGuard, ZhtrainTrainer

    args = TrainingArguments(
        output_dir=str(tmp_path / "t"), report_to="none", use_cpu=True, per_device_train_batch_size=2
    )
    return ZhtrainTrainer(model=model, args=args, loss_guard=NonFiniteLossGuard(), chunked_loss=chunked)


def loss_and_grads(trainer, model, inputs, num_items):
    model.train()
    model.zero_grad()
    loss = trainer.compute_loss(model, dict(inputs), num_items_in_batch=num_items)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("modules_to_save", [("embed_tokens", "lm_head"), ()], ids=["trained-head", "frozen-head"])
@pytest.mark.parametrize("num_items", [None, 37], ids=["mean", "num_items_in_batch"])
def test_chunked_loss_equals_the_models_loss_and_gradients(
    tmp_path, tiny_model_dir, modules_to_save, num_items, monkeypatch
):
    import zhtrain.training.loss as loss_module
    from zhtrain.training.loss import plain_output_layers

    model = tiny_peft_model(tiny_model_dir, modules_to_save)
    assert plain_output_layers(model) is not None
    ids = torch.randint(3, 400, (2, 48), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :7] = -100  # masked prompt, as in SFT
    labels[1, -5:] = -100
    inputs = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    plain_loss, plain_grads = loss_and_grads(trainer_for(model, False, tmp_path), model, inputs, num_items)
    chunked = trainer_for(model, True, tmp_path)
    chunked_loss, chunked_grads = loss_and_grads(chunked, model, inputs, num_items)
    assert torch.allclose(plain_loss, chunked_loss, rtol=1e-6, atol=1e-6), (plain_loss, chunked_loss)
    assert plain_grads.keys() == chunked_grads.keys() and len(plain_grads) > 0
    if modules_to_save:
        assert any("lm_head" in name for name in chunked_grads), "the trained head gets its gradient"
    for name in plain_grads:
        torch.testing.assert_close(chunked_grads[name], plain_grads[name], rtol=1e-4, atol=1e-7, msg=name)
    # Several chunks (of 16 rows) per batch: the default chunk holds all 96 rows of this tiny vocabulary.
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 400 * 16)
    small_loss, small_grads = loss_and_grads(chunked, model, inputs, num_items)
    assert torch.allclose(plain_loss, small_loss, rtol=1e-6, atol=1e-6)
    for name in plain_grads:
        torch.testing.assert_close(small_grads[name], plain_grads[name], rtol=1e-4, atol=1e-7, msg=name)
