"""`zhtrain pretrain --custom_vocab` with a larger tokenizer on a tied model: ONE trained run (6 steps) shows the model
grown and untied, an adapter that reloads, checkpoints that hold the embeddings once, and a resume from one of them."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch
from helpers import bigger_tokenizer, copy_run, logits_of, make_text_dir, pretrain_flags, run_pretrain


@pytest.fixture(scope="module")
def resized(tmp_path_factory, tied_model_dir, sp_tokenizer_dir):
    root = tmp_path_factory.mktemp("pretrain_resized")
    data = make_text_dir(root / "corpus")
    bigger = bigger_tokenizer(sp_tokenizer_dir, root / "bigger_tok")  # 400 + 3 tokens

    def argv(out):
        return pretrain_flags(tied_model_dir, bigger, data, out, "--custom_vocab", cache=root / "cache", max_steps=6)

    result = run_pretrain(argv(root / "out"))
    return SimpleNamespace(root=root, out=root / "out", argv=argv, result=result)


def test_tied_model_is_grown_and_the_adapter_reloads(resized, tied_model_dir):
    """A larger tokenizer (custom vocab) grows the model; tied embeddings are untied and both trained."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = resized.result.trainer.model
    assert model.get_input_embeddings().weight.shape[0] == 403
    ids = torch.tensor([[1, 401, 402, 30]])
    base = AutoModelForCausalLM.from_pretrained(str(tied_model_dir))
    base.resize_token_embeddings(403)
    reloaded = PeftModel.from_pretrained(base, str(resized.out / "pt_lora_model"))
    assert torch.allclose(logits_of(reloaded, ids), logits_of(model, ids), atol=1e-5)


def test_checkpoints_hold_the_embeddings_once(resized):
    """After a resize PEFT's Trainer checkpoint would store embed_tokens/lm_head three times; zhtrain's
    checkpoint file is the adapter folder's (one copy each, one file on disk)."""
    from safetensors import safe_open

    checkpoint = resized.out / "checkpoint-4"
    trainer_file = checkpoint / "adapter_model.safetensors"
    with safe_open(str(trainer_file), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    vocab_sized = sorted(k for k, shape in shapes.items() if shape[0] == 403)
    assert vocab_sized == ["base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight"], vocab_sized
    assert trainer_file.samefile(checkpoint / "pt_lora_model" / "adapter_model.safetensors")


def test_resuming_from_such_a_checkpoint_continues_the_run_exactly(resized, tmp_path):
    out = copy_run(resized.out, tmp_path / "out")
    full_losses = {e["step"]: e["loss"] for e in resized.result.trainer.state.log_history if "loss" in e}
    shutil.rmtree(out / "checkpoint-6")  # as if killed after saving checkpoint-4
    resumed = run_pretrain(resized.argv(out))
    assert resumed.metrics["resumed_from"] == str(out / "checkpoint-4")
    history = [e for e in resumed.trainer.state.log_history if "loss" in e and e["step"] > 4]
    assert [e["step"] for e in history] == [5, 6]
    for entry in history:
        assert entry["loss"] == pytest.approx(full_losses[entry["step"]], abs=1e-5)
