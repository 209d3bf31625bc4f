"""`zhtrain pretrain` end to end on tiny models: output, reload, resume, errors, seed flags."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures import seed_script_args

from zhtrain.errors import ZhtrainError
from zhtrain.pretrain import parse_pretrain_args, pretrain

REPO = Path(__file__).resolve().parents[2]
SEED_LORA = [
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
]


def flags(model, tokenizer, data, out, *extra, steps=4, cache=None):
    return [
        "--model_name_or_path",
        str(model),
        "--tokenizer_name_or_path",
        str(tokenizer),
        "--dataset_dir",
        str(data),
        "--data_cache_dir",
        str(cache or Path(out).parent / "cache"),
        "--output_dir",
        str(out),
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
        "7",
        "--report_to",
        "none",
        "--logging_steps",
        "1",
        "--save_steps",
        "2",
        "--save_total_limit",
        "3",
        "--validation_split_percentage",
        "0.05",
        "--disable_tqdm",
        "True",
        *SEED_LORA,
        *extra,
    ]


def run(argv):
    return pretrain(*parse_pretrain_args(argv))


def logits_of(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_adapter_folder_reloads_to_the_trained_model(tmp_path, tiny_model_dir, sp_tokenizer_dir, text_dir):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    result = run(flags(tiny_model_dir, sp_tokenizer_dir, text_dir, tmp_path / "out", "--do_eval"))
    adapter = tmp_path / "out" / "pt_lora_model"
    names = {p.name for p in adapter.iterdir()}
    assert {
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.model",
        "tokenizer_config.json",
    } <= names  # the seed's files
    assert (tmp_path / "out" / "checkpoint-2" / "pt_lora_model" / "adapter_model.safetensors").is_file()
    # Weights are readable as the umask allows, like every other file (safetensors itself writes 0600).
    for folder in (adapter, tmp_path / "out" / "checkpoint-2", tmp_path / "out" / "checkpoint-2" / "pt_lora_model"):
        plain = (folder / "adapter_config.json").stat().st_mode & 0o777
        assert (folder / "adapter_model.safetensors").stat().st_mode & 0o777 == plain, folder
    config = json.loads((adapter / "adapter_config.json").read_text())
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
    # Embeddings are stored once each (not PEFT's three copies after a resize), and the file is small.
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert sum("embed_tokens" in k for k in keys) == 1 and sum("lm_head" in k for k in keys) == 1
    vocab, hidden = 400, 32
    expected = 2 * vocab * hidden * 4
    size = (adapter / "adapter_model.safetensors").stat().st_size
    assert expected < size < expected * 1.6
    # Trained logits == base + adapter through PEFT's own loader.
    ids = torch.tensor([[1, 20, 30, 40, 50, 60]])
    trained = logits_of(result.trainer.model, ids)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    reloaded = PeftModel.from_pretrained(base, str(adapter))
    assert torch.allclose(logits_of(reloaded, ids), trained, atol=1e-5)
    assert not torch.allclose(
        logits_of(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), ids), trained, atol=1e-3
    )
    # Evaluation metrics are there and consistent.
    metrics = result.metrics
    assert 0 <= metrics["eval_accuracy"] <= 1
    assert metrics["eval_perplexity"] == pytest.approx(torch.tensor(metrics["eval_loss"]).exp().item(), rel=1e-3)


def test_resized_and_tied_model_reloads(tmp_path, tied_model_dir, sp_tokenizer_dir, text_dir):
    """A larger tokenizer (custom vocab) grows the model; tied embeddings are untied and both trained."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bigger = tmp_path / "bigger_tok"
    tok = AutoTokenizer.from_pretrained(str(sp_tokenizer_dir))
    tok.add_tokens(["白日依山尽", "黄河入海流", "number"])
    tok.save_pretrained(str(bigger))
    result = run(flags(tied_model_dir, bigger, text_dir, tmp_path / "out", "--custom_vocab"))
    model = result.trainer.model
    assert model.get_input_embeddings().weight.shape[0] == 403
    ids = torch.tensor([[1, 401, 402, 30]])
    base = AutoModelForCausalLM.from_pretrained(str(tied_model_dir))
    base.resize_token_embeddings(403)
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "out" / "pt_lora_model"))
    assert torch.allclose(logits_of(reloaded, ids), logits_of(model, ids), atol=1e-5)


def test_gradient_checkpointing_with_frozen_embeddings(tmp_path, tiny_model_dir, sp_tokenizer_dir, text_dir):
    argv = flags(tiny_model_dir, sp_tokenizer_dir, text_dir, tmp_path / "out", "--gradient_checkpointing", steps=2)
    argv[argv.index("--modules_to_save") + 1] = ""  # no trainable embeddings: the seed's classic crash
    result = run(argv)
    assert result.metrics["train_loss"] > 0


def test_resume_continues_the_same_run(tmp_path, tiny_model_dir, sp_tokenizer_dir, text_dir):
    import shutil

    argv = flags(tiny_model_dir, sp_tokenizer_dir, text_dir, tmp_path / "out", steps=6)
    full = run(argv)
    full_losses = {e["step"]: e["loss"] for e in full.trainer.state.log_history if "loss" in e}
    shutil.rmtree(tmp_path / "out" / "checkpoint-6")  # as if killed after saving checkpoint-4
    resumed = run(argv)
    assert resumed.metrics["resumed_from"] == str(tmp_path / "out" / "checkpoint-4")
    history = [e for e in resumed.trainer.state.log_history if "loss" in e and e["step"] > 4]
    assert [e["step"] for e in history] == [5, 6]
    for entry in history:
        assert entry["loss"] == pytest.approx(full_losses[entry["step"]], abs=1e-5)


def test_resized_run_checkpoints_hold_embeddings_once_and_resume(tmp_path, tiny_model_dir, sp_tokenizer_dir, text_dir):
    """After a resize PEFT's Trainer checkpoint would store embed_tokens/lm_head three times; zhtrain's
    checkpoint file is the adapter folder's (one copy each, one file on disk), and resuming from it
    continues the run exactly."""
    import shutil

    from safetensors import safe_open
    from transformers import AutoTokenizer

    bigger = tmp_path / "bigger_tok"
    tok = AutoTokenizer.from_pretrained(str(sp_tokenizer_dir))
    tok.add_tokens(["白日依山尽", "黄河入海流", "number"])
    tok.save_pretrained(str(bigger))
    out = tmp_path / "out"
    argv = flags(tiny_model_dir, bigger, text_dir, out, "--custom_vocab", steps=6)
    full = run(argv)
    full_losses = {e["step"]: e["loss"] for e in full.trainer.state.log_history if "loss" in e}
    checkpoint = out / "checkpoint-4"
    trainer_file = checkpoint / "adapter_model.safetensors"
    with safe_open(str(trainer_file), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    vocab_sized = sorted(k for k, shape in shapes.items() if shape[0] == 403)
    assert vocab_sized == ["base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight"], vocab_sized
    assert trainer_file.samefile(checkpoint / "pt_lora_model" / "adapter_model.safetensors")
    shutil.rmtree(out / "checkpoint-6")  # as if killed after saving checkpoint-4
    resumed = run(argv)
    assert resumed.metrics["resumed_from"] == str(checkpoint)
    history = [e for e in resumed.trainer.state.log_history if "loss" in e and e["step"] > 4]
    assert [e["step"] for e in history] == [5, 6]
    for entry in history:
        assert entry["loss"] == pytest.approx(full_losses[entry["step"]], abs=1e-5)


def test_checkpoints_of_another_run_are_refused(tmp_path, tiny_model_dir, sp_tokenizer_dir, text_dir):
    out = tmp_path / "out"
    run(flags(tiny_model_dir, sp_tokenizer_dir, text_dir, out, steps=2))
    other = flags(tiny_model_dir, sp_tokenizer_dir, text_dir, out, steps=2)
    other[other.index("--lora_rank") + 1] = "4"
    with pytest.raises(ZhtrainError, match="different run .*lora.*--overwrite_output_dir"):
        run(other)
    result = run(other + ["--overwrite_output_dir"])
    assert json.loads((out / "pt_lora_model" / "adapter_config.json").read_text())["r"] == 4
    assert result.trainer.state.global_step == 2


@pytest.mark.parametrize(
    "change, pattern",
    [
        (["--trainable", "q_proj,qkv_proj"], "--trainable: 'qkv_proj' matches no module"),
        (["--modules_to_save", "embed,lm_head"], "--modules_to_save: 'embed' matches no module"),
        (["--block_size", "4096"], "--block_size 4096 is larger than the model's context \\(256"),
        (["--validation_split_percentage", "5"], "must be a fraction"),
        (["--model_name_or_path", "/nonexistent/model"], "no such folder"),
    ],
    ids=["trainable", "modules_to_save", "block_size", "split", "model"],
)
def test_bad_flags_give_one_line_errors(tmp_path, tiny_model_dir, sp_tokenizer_dir, text_dir, change, pattern):
    with pytest.raises(ZhtrainError, match=pattern):
        run(flags(tiny_model_dir, sp_tokenizer_dir, text_dir, tmp_path / "out", steps=1) + change)
    assert not (tmp_path / "out" / "pt_lora_model").exists()


def test_unsupported_vocab_pair_fails_before_any_work(tmp_path, sp_tokenizer_dir, text_dir):
    from fixtures import make_tiny_llama

    model = make_tiny_llama(tmp_path / "llama32000", vocab_size=32000)
    with pytest.raises(ZhtrainError, match="model vocabulary 32000 with tokenizer of 400 tokens"):
        run(flags(model, sp_tokenizer_dir, text_dir, tmp_path / "out", steps=1))
    assert not (tmp_path / "cache").exists(), "the check comes before tokenizing"


def test_preprocess_only_builds_the_cache_and_exits(tmp_path, tiny_model_dir, sp_tokenizer_dir, text_dir, capsys):
    result = run(flags(tiny_model_dir, sp_tokenizer_dir, text_dir, tmp_path / "out") + ["--preprocess_only"])
    assert result.trainer is None and result.metrics["preprocess_tokens"] > 0
    assert re.search(r"data: 2 files, 400 lines, [\d,]+ tokens .* tokens/s", capsys.readouterr().out)
    assert list((tmp_path / "cache").glob("*.tokens")) and not (tmp_path / "out").exists()


def test_run_pt_sh_flags_parse_with_the_seed_meaning():
    import warnings

    argv = seed_script_args(REPO / "examples" / "run_pt.sh", {})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model_args, data_args, lora_args, training_args = parse_pretrain_args(argv)
    # --gradient_checkpointing is the seed's flag: read under transformers 5's name, without its deprecation warning.
    assert getattr(training_args, "activation_checkpointing", True) is True
    assert not [w for w in caught if "gradient_checkpointing" in str(w.message)]
    assert training_args.learning_rate == 2e-4 and training_args.warmup_steps == 0.05
    assert training_args.lr_scheduler_type == "cosine" and training_args.weight_decay == 0.01
    assert training_args.max_steps == 100 and training_args.save_steps == 500 and training_args.save_total_limit == 3
    assert (
        training_args.overwrite_output_dir and training_args.gradient_checkpointing and training_args.logging_first_step
    )
    assert training_args.ddp_timeout == 30000 and training_args.ddp_find_unused_parameters is False
    assert data_args.validation_split_percentage == 0.001 and data_args.block_size == 512
    assert data_args.preprocessing_num_workers == 8 and model_args.torch_dtype == "float16"
    assert lora_args.lora_rank == 8 and lora_args.lora_alpha == 32 and lora_args.lora_dropout == 0.05
    assert lora_args.target_modules == ["q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]
    assert lora_args.modules_to_save_list == ["embed_tokens", "lm_head"]
    if not torch.cuda.is_available():
        assert training_args.fp16 is False and training_args.use_cpu
        assert any("--fp16 needs a CUDA GPU" in note for note in training_args.compat_notes)


def test_cli_prints_one_line_and_exits_2(tmp_path, tiny_model_dir, sp_tokenizer_dir):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "zhtrain",
            "pretrain",
            "--model_name_or_path",
            str(tiny_model_dir),
            "--tokenizer_name_or_path",
            str(sp_tokenizer_dir),
            "--dataset_dir",
            str(tmp_path / "missing"),
            "--output_dir",
            str(tmp_path / "out"),
            "--do_train",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip().splitlines()[-1]
        == f"zhtrain: error: --dataset_dir {tmp_path / 'missing'}: no such folder; pass a folder of *.txt files"
    )
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_run_pt_sh_runs_to_the_end_with_deepspeed(tmp_path, tiny_model_dir, sp_tokenizer_dir, text_dir):
    """The seed's script, program name changed only, under torchrun + DeepSpeed ZeRO-2 on CPU."""
    script = (REPO / "examples" / "run_pt.sh").read_text()
    for old, new in {
        "path/to/hf/llama/dir": str(tiny_model_dir),
        "path/to/chinese/llama/tokenizer/dir": str(sp_tokenizer_dir),
        "path/to/pt/data/dir": str(text_dir),
        "training_steps=100": "training_steps=3",
        "--block_size 512": "--block_size 32",
        "output_dir=output_dir": f"output_dir={tmp_path / 'out'}",
        "data_cache=temp_data_cache_dir": f"data_cache={tmp_path / 'cache'}",
        "deepspeed_config_file=ds_zero2_no_offload.json": "deepspeed_config_file="
        + str(REPO / "src" / "zhtrain" / "configs" / "ds_zero2_no_offload.json"),
    }.items():
        assert old in script
        script = script.replace(old, new)
    (tmp_path / "run_pt.sh").write_text(script)
    bin_dir = Path(sys.executable).parent
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(Path.home()), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        ["bash", str(tmp_path / "run_pt.sh")], capture_output=True, text=True, timeout=900, cwd=tmp_path, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr  # the log goes to stdout (as the seed's), progress bars to stderr
    assert "trained with engine DeepSpeedEngine, world size 1" in log
    assert "--fp16 needs a CUDA GPU" in log or torch.cuda.is_available()
    assert (tmp_path / "out" / "pt_lora_model" / "adapter_model.safetensors").stat().st_size > 1000
