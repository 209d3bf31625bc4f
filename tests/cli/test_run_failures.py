"""`zhtrain pretrain` runs that must stop with one line: a non-finite loss, and pickled weights that would run code
(base model, --peft_path adapter). Each runs as a user runs it, in a child of the warm CLI runner (the `cli` fixture).
A planted pickle in a checkpoint, refused on resume: tests/recipes/test_pretrain_lora.py."""

from __future__ import annotations

import math
import shutil

import torch
from helpers import make_tiny_llama, plant_pickle, pretrain_flags


def cli_flags(model, tokenizer, data, out):
    """What a user types: the defaults (LoRA shape, learning rate) except a few steps on a tiny model."""
    return pretrain_flags(
        model,
        tokenizer,
        data,
        out,
        lora=(),
        learning_rate=None,
        seed=None,
        logging_steps=None,
        validation_split_percentage=None,
    )


def test_cli_stops_on_an_inf_loss_with_one_line(tmp_path, sp_tokenizer_dir, text_dir, cli):
    from safetensors.torch import load_file, save_file

    model = make_tiny_llama(tmp_path / "broken", vocab_size=400)
    weights = load_file(str(model / "model.safetensors"))
    weights["lm_head.weight"][:, 0] = math.inf  # logits inf from the first forward pass
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    proc = cli.run(["pretrain", *cli_flags(model, sp_tokenizer_dir, text_dir, tmp_path / "out")], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    # The run got going (progress bars), then stopped: the error is the last line, and no traceback.
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("zhtrain: error: training loss became nan at step 1; stopped"), proc.stderr
    assert "Newest good checkpoint: none" in last and "Traceback" not in proc.stderr
    assert not list((tmp_path / "out").glob("checkpoint-*")) and not (tmp_path / "out" / "pt_lora_model").exists()


def test_planted_pickle_is_really_malicious(tmp_path):
    """Control: the planted file does run code when unpickled without weights_only."""
    plant_pickle(tmp_path / "evil.bin", tmp_path / "marker")
    torch.load(tmp_path / "evil.bin", weights_only=False)
    assert (tmp_path / "marker").exists()


def test_malicious_base_model_bin_is_refused(tmp_path, sp_tokenizer_dir, text_dir, tiny_model_dir, cli):
    model = tmp_path / "evil_model"
    model.mkdir()
    shutil.copy(tiny_model_dir / "config.json", model)
    marker = tmp_path / "PWNED"
    plant_pickle(model / "pytorch_model.bin", marker)
    proc = cli.run(["pretrain", *cli_flags(model, sp_tokenizer_dir, text_dir, tmp_path / "out")], cwd=tmp_path)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]  # found when the model loads, after tokenizing
    assert last == (
        f"zhtrain: error: {model}: pytorch_model.bin refused: unpickling it would call posix.system "
        "(zhtrain loads .bin files with torch.load(weights_only=True) only). "
        "Use safetensors weights from a source you trust"
    )
    assert "Traceback" not in proc.stderr and not marker.exists()


def test_malicious_adapter_bin_for_peft_path_is_refused(tmp_path, sp_tokenizer_dir, text_dir, tiny_model_dir, cli):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "evil_adapter"
    get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), LoraConfig(target_modules=["q_proj"])
    ).save_pretrained(str(adapter))
    (adapter / "adapter_model.safetensors").unlink()
    marker = tmp_path / "PWNED"
    plant_pickle(adapter / "adapter_model.bin", marker)
    proc = cli.run(
        ["pretrain", *cli_flags(tiny_model_dir, sp_tokenizer_dir, text_dir, tmp_path / "out"), "--peft_path", adapter],
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"zhtrain: error: --peft_path {adapter}: adapter_model.bin refused: unpickling it would call posix.system"
    )
    assert "Traceback" not in proc.stderr and not marker.exists()
