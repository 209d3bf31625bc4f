"""`zhtrain sft` with LoRA on a tiny model: ONE trained run (ShareGPT data, a validation file, the llama2_chat template,
a tokenizer with two more tokens than the model has rows) serves the folder, reload and metric assertions; two
--peft_path runs continue its adapter (the reference's "continue the Alpaca LoRA" on a resized base)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from helpers import SEED_LORA, logits_of, make_chat_tokenizer, run_sft, sft_flags, write_alpaca, write_sharegpt


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, sp_tokenizer_dir):
    root = tmp_path_factory.mktemp("sft_lora")
    tokenizer = make_chat_tokenizer(sp_tokenizer_dir, root / "chat_tok")  # 402 tokens vs the model's 400
    data = write_sharegpt(root / "conv.json", copies=3)
    valid = write_alpaca(root / "valid.json", n=4)
    result = run_sft(
        sft_flags(
            tiny_model_dir,
            tokenizer,
            root / "out",
            *SEED_LORA,
            "--data_path",
            data,
            "--validation_file",
            valid,
            "--do_eval",
            "--template",
            "llama2_chat",
            "--group_by_length",
        )
    )
    return SimpleNamespace(
        root=root,
        out=root / "out",
        adapter=root / "out" / "sft_lora_model",
        tokenizer=tokenizer,
        data=data,
        result=result,
    )


def test_sft_lora_model_folder_has_the_adapter_and_the_template(trained):
    adapter = trained.adapter
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.model", "zhtrain_template.json"} <= {
        p.name for p in adapter.iterdir()
    }
    assert json.loads((adapter / "zhtrain_template.json").read_text())["template"] == "llama2_chat"
    assert (trained.out / "checkpoint-2" / "sft_lora_model" / "zhtrain_template.json").is_file()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 8 and set(config["modules_to_save"]) == {"embed_tokens", "lm_head"}


def test_sft_lora_model_reloads_to_the_trained_model(trained, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert trained.result.trainer.model.get_input_embeddings().weight.shape[0] == 402
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    base.resize_token_embeddings(402)
    ids = torch.tensor([[1, 20, 30, 40, 50, 401]])
    reloaded = PeftModel.from_pretrained(base, str(trained.adapter))
    assert torch.allclose(logits_of(reloaded, ids), logits_of(trained.result.trainer.model, ids), atol=1e-5)


def test_metrics_count_samples_turns_and_evaluation(trained):
    metrics = trained.result.metrics
    assert (
        metrics["train_samples"] == 9 and metrics["train_turns"] == 15 and metrics["engine"] == "PeftModelForCausalLM"
    )
    assert 0 <= metrics["eval_accuracy"] <= 1 and metrics["eval_samples"] == 4
    assert trained.result.trainer.args.train_sampling_strategy == "group_by_length"


def test_peft_path_loads_the_adapter_it_continues(trained, tiny_model_dir, tmp_path):
    """Continue with learning rate 0: the continued adapter must be the first one, loaded (not a fresh init)."""
    from safetensors.torch import load_file

    run_sft(
        sft_flags(
            tiny_model_dir,
            trained.tokenizer,
            tmp_path / "second",
            "--data_path",
            trained.data,
            "--template",
            "tokenizer",
            "--peft_path",
            trained.adapter,
            "--learning_rate",
            "0",
            max_steps=1,
        )
    )
    before = load_file(str(trained.adapter / "adapter_model.safetensors"))
    after = load_file(str(tmp_path / "second" / "sft_lora_model" / "adapter_model.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert any("lora_B" in k and before[k].abs().sum() > 0 for k in before)  # trained, so not PEFT's zero init


def test_peft_path_trains_on_from_the_adapter(trained, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    run_sft(
        sft_flags(
            tiny_model_dir,
            trained.tokenizer,
            tmp_path / "third",
            "--data_path",
            trained.data,
            "--template",
            "tokenizer",
            "--peft_path",
            trained.adapter,
            max_steps=1,
        )
    )
    before = load_file(str(trained.adapter / "adapter_model.safetensors"))
    third = load_file(str(tmp_path / "third" / "sft_lora_model" / "adapter_model.safetensors"))
    assert any(not torch.equal(before[k], third[k]) for k in before)
