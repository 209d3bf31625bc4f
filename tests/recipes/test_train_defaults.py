"""zhtrain's training defaults give the plain recipe's results.

- the chunked loss folds the normaliser into its gradients and splits rows into equal chunks:
  same loss and gradients as cross-entropy over full logits, whatever scales the loss afterwards;
- PEFT's frozen originals of modules_to_save share the trained weights: the same training steps
  and the same adapter folder (keys, tensors, adapter_config.json) as PEFT's own two copies.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from zhtrain.model.lora import share_trained_copies
from zhtrain.training.loss import chunk_rows_for, chunked_causal_lm_loss

# ---------------------------------------------------------------------------------------------
# Chunked loss


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


# ---------------------------------------------------------------------------------------------
# PEFT's frozen originals


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


@pytest.mark.slow
def test_pretrain_adapter_and_peft_path_continuation_equal_peft_copies(
    tmp_path, tiny_model_dir, sp_tokenizer_dir, text_dir, monkeypatch
):
    """The whole command, with and without the sharing: same losses, same pt_lora_model, and a
    --peft_path continuation of it (PEFT rebuilds the wrappers on load) trains the same too."""
    from safetensors.torch import load_file

    import zhtrain.model.lora
    from zhtrain.pretrain import parse_pretrain_args, pretrain

    def run(name, steps, *extra):
        argv = [
            "--model_name_or_path",
            str(tiny_model_dir),
            "--tokenizer_name_or_path",
            str(sp_tokenizer_dir),
            "--dataset_dir",
            str(text_dir),
            "--data_cache_dir",
            str(tmp_path / "cache"),
            "--output_dir",
            str(tmp_path / name),
            "--block_size",
            "32",
            "--per_device_train_batch_size",
            "2",
            "--max_steps",
            str(steps),
            "--learning_rate",
            "1e-3",
            "--do_train",
            "--seed",
            "5",
            "--report_to",
            "none",
            "--logging_steps",
            "1",
            "--save_strategy",
            "no",
            "--validation_split_percentage",
            "0.05",
            "--disable_tqdm",
            "True",
            "--trainable",
            "q_proj,v_proj,k_proj,o_proj,gate_proj,down_proj,up_proj",
            "--modules_to_save",
            "embed_tokens,lm_head",
            "--lora_rank",
            "8",
            "--lora_alpha",
            "32",
            "--lora_dropout",
            "0.05",
            "--gradient_checkpointing",
            *extra,
        ]
        result = pretrain(*parse_pretrain_args(argv))
        shares = all(
            w.original_module.weight is w.modules_to_save["default"].weight for w in wrappers(result.trainer.model)
        )
        losses = [entry["loss"] for entry in result.trainer.state.log_history if "loss" in entry]
        return losses, tmp_path / name / "pt_lora_model", shares

    shared = run("shared", 4)
    shared_more = run("shared-more", 2, "--peft_path", str(shared[1]))
    monkeypatch.setattr(zhtrain.model.lora, "share_trained_copies", lambda model: 0)  # PEFT's own two copies
    copies = run("copies", 4)
    copies_more = run("copies-more", 2, "--peft_path", str(copies[1]))
    assert (shared[2], shared_more[2], copies[2], copies_more[2]) == (True, True, False, False)
    for ours, theirs in ((shared, copies), (shared_more, copies_more)):
        assert len(ours[0]) == len(theirs[0]) > 0
        assert ours[0] == pytest.approx(theirs[0], abs=1e-6)
        assert json.loads((ours[1] / "adapter_config.json").read_text()) == json.loads(
            (theirs[1] / "adapter_config.json").read_text()
        )
        a, b = (
            load_file(str(ours[1] / "adapter_model.safetensors")),
            load_file(str(theirs[1] / "adapter_model.safetensors")),
        )
        assert a.keys() == b.keys() and "base_model.model.lm_head.weight" in a
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_half_weights_without_mixed_precision_are_warned_about(tiny_model_dir, caplog):
    """--torch_dtype float16 without --fp16 would update fp16 weights with no loss scaling (seen diverging on a GPU)."""
    import logging
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from zhtrain.model.loading import warn_if_pure_half

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float16)
    with caplog.at_level(logging.WARNING, logger="zhtrain"):
        warn_if_pure_half(model, SimpleNamespace(fp16=True, bf16=False, deepspeed=None))
        assert not caplog.records
        warn_if_pure_half(model, SimpleNamespace(fp16=False, bf16=False, deepspeed=None))
    assert "--torch_dtype float16 without --fp16" in caplog.text
