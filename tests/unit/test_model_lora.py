"""PEFT's frozen originals of modules_to_save share the trained weights: the same training steps and the same adapter
as PEFT's own two copies (the whole command: tests/recipes/test_pretrain_paths.py)."""

from __future__ import annotations

import pytest
import torch

from zhtrain.model.lora import share_trained_copies


def peft_model(tiny_model_dir, share: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj"],
        modules_to_save=["embed_tokens", "lm_head"],
    )
    model = get_peft_model(model, config)
    freed = share_trained_copies(model) if share else 0
    return model, freed


def wrappers(model):
    from peft.utils.other import ModulesToSaveWrapper

    return [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]


def test_shared_originals_train_and_save_exactly_as_peft_copies(tiny_model_dir):
    from peft import get_peft_model_state_dict

    shared, freed = peft_model(tiny_model_dir, share=True)
    copies, _ = peft_model(tiny_model_dir, share=False)
    assert len(wrappers(shared)) == 2
    for wrapper in wrappers(shared):
        trained = wrapper.modules_to_save["default"]
        assert wrapper.original_module.weight is trained.weight and trained.weight.requires_grad
    matrix = 400 * shared.config.hidden_size  # vocab x hidden
    assert freed == 2 * matrix * 4  # embed_tokens + lm_head, fp32
    assert sum(p.numel() for p in shared.parameters()) == sum(p.numel() for p in copies.parameters()) - 2 * matrix
    assert sum(p.numel() for p in shared.parameters() if p.requires_grad) == sum(
        p.numel() for p in copies.parameters() if p.requires_grad
    )

    ids = torch.randint(3, 400, (2, 24), generator=torch.Generator().manual_seed(1))
    losses = {}
    for name, model in (("shared", shared), ("copies", copies)):
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
        losses[name] = []
        for _ in range(3):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[name].append(loss.item())
    assert losses["shared"] == pytest.approx(losses["copies"], abs=1e-6)
    saved, reference = get_peft_model_state_dict(shared), get_peft_model_state_dict(copies)
    assert saved.keys() == reference.keys()
    assert "base_model.model.model.embed_tokens.weight" in saved and "base_model.model.lm_head.weight" in saved
    for key in saved:
        torch.testing.assert_close(saved[key], reference[key], rtol=0, atol=1e-6, msg=key)


def test_nothing_is_shared_under_zero3_partitions(tiny_model_dir):
    model, _ = peft_model(tiny_model_dir, share=False)
    for wrapper in wrappers(model):
        weight = wrapper.original_module.weight  # marked as deepspeed.zero.Init marks a partitioned parameter
        weight.ds_id, weight.ds_numel = id(weight), weight.numel()
    assert share_trained_copies(model) == 0
    assert all(w.original_module.weight is not w.modules_to_save["default"].weight for w in wrappers(model))
