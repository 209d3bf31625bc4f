"""`zhtrain sft` full fine-tuning (no LoRA, run_sft.sh's --dataset_dir meaning): ONE trained run (4 steps, gradient
checkpointing, lazy encoding) serves the saved-model assertions; a rerun of a copy shows that a finished run is
not extended."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from helpers import copy_run, logits_of, run_sft, sft_flags, write_alpaca


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, sp_tokenizer_dir):
    root = tmp_path_factory.mktemp("sft_full")
    data = write_alpaca(root / "d" / "a.json", n=6)

    def argv(out):
        return sft_flags(
            tiny_model_dir,
            sp_tokenizer_dir,
            out,
            "--dataset_dir",
            root / "d",
            "--gradient_checkpointing",
            "True",
            "--lazy_preprocess",
            "True",
            max_steps=4,
        )

    result = run_sft(argv(root / "out"))
    return SimpleNamespace(root=root, out=root / "out", data=data, argv=argv, result=result)


def test_dataset_dir_means_the_alpaca_prompt(trained):
    assert (
        trained.data.is_file() and trained.result.metrics["template"] == "alpaca"
    )  # --dataset_dir means run_sft.sh: the alpaca prompt
    assert json.loads((trained.out / "zhtrain_template.json").read_text())["template"] == "alpaca"


def test_full_finetuning_saves_a_transformers_model(trained, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = trained.out
    saved = AutoModelForCausalLM.from_pretrained(str(out))
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    assert torch.allclose(logits_of(saved, ids), logits_of(trained.result.trainer.model, ids), atol=1e-5)
    assert not torch.allclose(
        logits_of(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), ids), logits_of(saved, ids), atol=1e-4
    )
    assert len(AutoTokenizer.from_pretrained(str(out))) == 400 and (out / "tokenizer.model").is_file()


def test_weights_are_readable_as_the_umask_allows(trained):
    """The model and the Trainer's checkpoint weights, like config.json."""
    out = trained.out
    plain = (out / "config.json").stat().st_mode & 0o777
    modes = {path: path.stat().st_mode & 0o777 for path in out.rglob("*.safetensors")}
    assert out / "model.safetensors" in modes and any("checkpoint-" in str(path) for path in modes)
    assert set(modes.values()) == {plain}, modes


def test_rerunning_a_finished_full_finetuning_changes_nothing(trained, tmp_path):
    """transformers 5's Trainer resumed at max_steps trains one more step; the rerun of a finished full
    fine-tuning (here killed while writing its final model) rewrites that model from checkpoint-4."""
    from safetensors.torch import load_file

    from zhtrain.training.checkpoints import list_checkpoints

    out = copy_run(trained.out, tmp_path / "out")
    first = load_file(str(trained.out / "model.safetensors"))
    (out / "model.safetensors").unlink()
    result = run_sft(trained.argv(out))
    assert result.metrics["resumed_from"] == str(out / "checkpoint-4") and "train_loss" not in result.metrics
    assert [step for step, _, _ in list_checkpoints(out)] == [2, 4] and result.trainer.state.global_step == 4
    again = load_file(str(out / "model.safetensors"))
    assert set(again) == set(first) and all(torch.equal(first[k], again[k]) for k in first)
