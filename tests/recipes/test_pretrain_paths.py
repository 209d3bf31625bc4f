"""zhtrain's defaults give the plain recipe's results, a whole `zhtrain pretrain` run at a time.

ONE default run (gradient checkpointing, LoRA dropout, trained embeddings) is compared with the same run
- without the fast paths (HF tokenization, full-logits loss, dropout masks drawn again in the recompute), and
- with PEFT's own two copies of modules_to_save (no sharing), also when continued with --peft_path.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import losses_of, make_text_dir, pretrain_flags, run_pretrain


def wrappers(model):
    from peft.utils.other import ModulesToSaveWrapper

    return [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, sp_tokenizer_dir):
    root = tmp_path_factory.mktemp("pretrain_paths")
    data = make_text_dir(root / "corpus")

    def run(name, steps, *extra):
        argv = pretrain_flags(
            tiny_model_dir,
            sp_tokenizer_dir,
            data,
            root / name,
            "--gradient_checkpointing",
            "True",
            *extra,
            cache=root / name / "cache",
            max_steps=steps,
            seed=5,
            save_strategy="no",
            save_steps=None,
        )
        result = run_pretrain(argv)
        shares = all(
            w.original_module.weight is w.modules_to_save["default"].weight for w in wrappers(result.trainer.model)
        )
        cache = sorted((root / name / "cache").glob("*.tokens"))
        return SimpleNamespace(
            losses=losses_of(result.trainer.state.log_history),
            adapter=root / name / "pt_lora_model",
            shares=shares,
            chunked=result.trainer.chunked_loss_active,
            tokens=[np.fromfile(p, dtype=np.uint16).tolist() for p in cache],
        )

    return SimpleNamespace(run=run, default=run("default", 4))


def test_pretrain_with_fast_paths_equals_pretrain_without(runs):
    fast = runs.default
    plain = runs.run(
        "plain", 4, "--fast_tokenization", "False", "--chunked_loss", "False", "--keep_dropout_masks", "False"
    )
    assert (fast.chunked, plain.chunked) == (True, False)
    assert fast.tokens == plain.tokens and len(fast.tokens) == 2
    assert len(fast.losses) == len(plain.losses) == 4
    np.testing.assert_allclose(fast.losses, plain.losses, rtol=0, atol=1e-5)


def test_pretrain_adapter_and_peft_path_continuation_equal_peft_copies(runs, monkeypatch):
    """The whole command, with and without the sharing: same losses, same pt_lora_model, and a
    --peft_path continuation of it (PEFT rebuilds the wrappers on load) trains the same too."""
    from safetensors.torch import load_file

    import zhtrain.model.lora

    shared = runs.default
    shared_more = runs.run("shared-more", 2, "--peft_path", shared.adapter)
    monkeypatch.setattr(zhtrain.model.lora, "share_trained_copies", lambda model: 0)  # PEFT's own two copies
    copies = runs.run("copies", 4)
    copies_more = runs.run("copies-more", 2, "--peft_path", copies.adapter)
    assert (shared.shares, shared_more.shares, copies.shares, copies_more.shares) == (True, True, False, False)
    for ours, theirs in ((shared, copies), (shared_more, copies_more)):
        assert len(ours.losses) == len(theirs.losses) > 0
        assert ours.losses == pytest.approx(theirs.losses, abs=1e-6)
        assert json.loads((ours.adapter / "adapter_config.json").read_text()) == json.loads(
            (theirs.adapter / "adapter_config.json").read_text()
        )
        a, b = (
            load_file(str(ours.adapter / "adapter_model.safetensors")),
            load_file(str(theirs.adapter / "adapter_model.safetensors")),
        )
        assert a.keys() == b.keys() and "base_model.model.lm_head.weight" in a
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_gradient_checkpointing_with_frozen_embeddings(tmp_path, tiny_model_dir, sp_tokenizer_dir, text_dir):
    argv = pretrain_flags(
        tiny_model_dir, sp_tokenizer_dir, text_dir, tmp_path / "out", "--gradient_checkpointing", max_steps=2
    )
    argv[argv.index("--modules_to_save") + 1] = ""  # no trainable embeddings: the seed's classic crash
    result = run_pretrain(argv)
    assert result.metrics["train_loss"] > 0
