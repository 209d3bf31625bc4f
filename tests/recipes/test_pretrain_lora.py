"""`zhtrain pretrain` with the seed's LoRA on a tiny model: ONE trained run (6 steps, checkpoints every 2, evaluation
every 2) serves the adapter, report, evaluation and checkpoint assertions; resume, rerun and a run of another shape
each start from a copy of its output folder."""

from __future__ import annotations

import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch
from helpers import copy_run, logits_of, make_text_dir, plant_pickle, pretrain_flags, run_pretrain

from zhtrain.errors import ZhtrainError
from zhtrain.training.checkpoints import list_checkpoints, write_manifest


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, sp_tokenizer_dir):
    root = tmp_path_factory.mktemp("pretrain_lora")
    data = make_text_dir(root / "corpus")

    def argv(out, *extra, **settings):
        values = dict(
            max_steps=6,
            save_total_limit=3,
            do_eval=True,
            eval_strategy="steps",
            eval_steps=2,
            validation_split_percentage=0.1,
        )
        values.update(settings)
        return pretrain_flags(tiny_model_dir, sp_tokenizer_dir, data, out, *extra, cache=root / "cache", **values)

    result = run_pretrain(argv(root / "out"))
    return SimpleNamespace(root=root, out=root / "out", argv=argv, result=result, data=data)


def test_adapter_folder_holds_the_seeds_files_readable_as_the_umask_allows(trained):
    adapter = trained.out / "pt_lora_model"
    names = {p.name for p in adapter.iterdir()}
    assert {
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.model",
        "tokenizer_config.json",
    } <= names  # the seed's files
    assert (trained.out / "checkpoint-2" / "pt_lora_model" / "adapter_model.safetensors").is_file()
    # Weights are readable as the umask allows, like every other file (safetensors itself writes 0600).
    for folder in (adapter, trained.out / "checkpoint-2", trained.out / "checkpoint-2" / "pt_lora_model"):
        plain = (folder / "adapter_config.json").stat().st_mode & 0o777
        assert (folder / "adapter_model.safetensors").stat().st_mode & 0o777 == plain, folder
    assert [step for step, _, _ in list_checkpoints(trained.out)] == [2, 4, 6]


def test_adapter_config_is_the_seeds_lora(trained):
    config = json.loads((trained.out / "pt_lora_model" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 32
    assert set(config["target_modules"]) == {
        "q_proj",
        "v_proj",
        "k_proj",
        "o_proj",
        "gate_proj",
        "down_proj",
        "up_proj",
    }
    assert set(config["modules_to_save"]) == {"embed_tokens", "lm_head"}


def test_embeddings_are_stored_once_and_the_file_is_small(trained):
    """Not PEFT's three copies after a resize."""
    from safetensors import safe_open

    adapter = trained.out / "pt_lora_model"
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert sum("embed_tokens" in k for k in keys) == 1 and sum("lm_head" in k for k in keys) == 1
    vocab, hidden = 400, 32
    expected = 2 * vocab * hidden * 4
    size = (adapter / "adapter_model.safetensors").stat().st_size
    assert expected < size < expected * 1.6


def test_adapter_folder_reloads_to_the_trained_model(trained, tiny_model_dir):
    """Trained logits == base + adapter through PEFT's own loader."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 20, 30, 40, 50, 60]])
    model = logits_of(trained.result.trainer.model, ids)
    reloaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(trained.out / "pt_lora_model")
    )
    assert torch.allclose(logits_of(reloaded, ids), model, atol=1e-5)
    assert not torch.allclose(
        logits_of(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), ids), model, atol=1e-3
    )


def test_evaluation_metrics_are_there_and_consistent(trained):
    metrics = trained.result.metrics
    assert 0 <= metrics["eval_accuracy"] <= 1
    assert metrics["eval_perplexity"] == pytest.approx(torch.tensor(metrics["eval_loss"]).exp().item(), rel=1e-3)


def test_run_report_and_plot(trained):
    out = trained.out
    report = json.loads((out / "report.json").read_text())
    assert report["command"] == "pretrain" and report["global_step"] == 6
    assert report["data"]["files"] == 2 and report["data"]["train_blocks"] > 0 and report["data"]["block_size"] == 32
    assert report["vocabulary"] == {
        "model": 400,
        "tokenizer": 400,
        "mode": "custom vocabulary of 400 tokens, unchanged",
    }
    assert 0 < report["parameters"]["trainable"] < report["parameters"]["total"]
    assert report["training"]["tokens_per_step"] == 64 and report["training"]["tokens_per_second"] > 0
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    eval_losses = [e["eval_loss"] for e in history if "eval_loss" in e]
    assert len(eval_losses) >= 3
    assert report["evaluation"]["final_eval_perplexity"] == pytest.approx(math.exp(eval_losses[-1]))
    assert report["evaluation"]["best_eval_perplexity"] == pytest.approx(math.exp(min(eval_losses)))
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and report["plot"] == "loss.png"
    markdown = (out / "report.md").read_text()
    assert "| tokens per second |" in markdown and "![train/eval loss and learning rate](loss.png)" in markdown


def test_resume_continues_the_same_run(trained, tmp_path):
    out = copy_run(trained.out, tmp_path / "out")
    full_losses = {e["step"]: e["loss"] for e in trained.result.trainer.state.log_history if "loss" in e}
    shutil.rmtree(out / "checkpoint-6")  # as if killed after saving checkpoint-4
    resumed = run_pretrain(trained.argv(out))
    assert resumed.metrics["resumed_from"] == str(out / "checkpoint-4")
    history = [e for e in resumed.trainer.state.log_history if "loss" in e and e["step"] > 4]
    assert [e["step"] for e in history] == [5, 6]
    for entry in history:
        assert entry["loss"] == pytest.approx(full_losses[entry["step"]], abs=1e-5)


def test_rerunning_a_finished_run_changes_nothing(trained, tmp_path):
    """transformers' Trainer resumed at max_steps trains one step more and saves checkpoint-N+1; zhtrain does not."""
    from safetensors.torch import load_file

    out = copy_run(trained.out, tmp_path / "out")
    first = load_file(str(trained.out / "pt_lora_model" / "adapter_model.safetensors"))
    shutil.rmtree(out / "pt_lora_model")  # as if killed while writing the final adapter
    result = run_pretrain(trained.argv(out))
    assert result.metrics["resumed_from"] == str(out / "checkpoint-6")
    assert [step for step, _, _ in list_checkpoints(out)] == [2, 4, 6] and result.trainer.state.global_step == 6
    again = load_file(str(out / "pt_lora_model" / "adapter_model.safetensors"))
    assert set(again) == set(first) and all(torch.equal(first[k], again[k]) for k in first)


def test_checkpoints_of_another_run_are_refused(trained, tmp_path):
    out = copy_run(trained.out, tmp_path / "out")
    other = trained.argv(out, max_steps=2)
    other[other.index("--lora_rank") + 1] = "4"
    with pytest.raises(ZhtrainError, match="different run .*lora.*--overwrite_output_dir"):
        run_pretrain(other)
    result = run_pretrain(other + ["--overwrite_output_dir"])
    assert json.loads((out / "pt_lora_model" / "adapter_config.json").read_text())["r"] == 4
    assert result.trainer.state.global_step == 2


def test_planted_pickle_in_a_checkpoint_is_refused_on_resume(trained, tmp_path, cli):
    """The Trainer reads optimizer/scheduler/RNG state with weights_only=True too (`zhtrain pretrain`, resuming)."""
    out = copy_run(trained.out, tmp_path / "out")
    marker = tmp_path / "PWNED"
    plant_pickle(out / "checkpoint-6" / "rng_state.pth", marker)
    write_manifest(out / "checkpoint-6", 6)  # even a checkpoint that looks complete
    proc = cli.run(["pretrain", *trained.argv(out, max_steps=8)], cwd=tmp_path)
    assert proc.returncode != 0 and not marker.exists()
    assert "Weights only load failed" in proc.stderr
