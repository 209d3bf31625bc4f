"""Reliability: complete checkpoints only, rotation after completion, NaN stop, safe loading, run report.

The kill -9 trials themselves are `benchmarks/crash_trials.py`; the slow test at the end runs
them with a few kills.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from zhtrain.errors import ZhtrainError
from zhtrain.training.args import LoraArguments, ZhtrainTrainingArguments
from zhtrain.training.checkpoints import (
    MANIFEST,
    SaveAdapterCallback,
    is_complete,
    last_complete_checkpoint,
    list_checkpoints,
    rotate,
    take_over_rotation,
    write_manifest,
)
from zhtrain.training.resume import RUN_FILE, prepare_output_dir
from zhtrain.training.trainer import build_trainer

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")


# ---------------------------------------------------------------------------------------------
# Complete checkpoints and resume


def fake_checkpoint(out: Path, step: int, complete: bool = True) -> Path:
    folder = out / f"checkpoint-{step}"
    (folder / "pt_lora_model").mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (folder / "optimizer.pt").write_bytes(b"x" * 100)
    (folder / "pt_lora_model" / "adapter_model.safetensors").write_bytes(b"y" * 50)
    if complete:
        write_manifest(folder, step)
    return folder


def test_only_checkpoints_with_a_matching_manifest_are_complete(tmp_path):
    good = fake_checkpoint(tmp_path, 2)
    assert is_complete(good)
    truncated = fake_checkpoint(tmp_path, 4)
    (truncated / "optimizer.pt").write_bytes(b"x" * 10)  # a file cut short after the manifest was written
    missing = fake_checkpoint(tmp_path, 6)
    (missing / "pt_lora_model" / "adapter_model.safetensors").unlink()
    unmarked = fake_checkpoint(tmp_path, 8, complete=False)
    assert [(step, ok) for step, _, ok in list_checkpoints(tmp_path)] == [(2, True), (4, False), (6, False), (8, False)]
    assert not is_complete(unmarked)
    assert last_complete_checkpoint(tmp_path) == good


def training_args(out: Path, **overrides) -> ZhtrainTrainingArguments:
    values = dict(
        output_dir=str(out),
        max_steps=8,
        save_steps=2,
        save_total_limit=2,
        per_device_train_batch_size=2,
        logging_steps=1,
        learning_rate=1e-3,
        seed=0,
        report_to="none",
        disable_tqdm=True,
    )
    values.update(overrides)
    return ZhtrainTrainingArguments(**values)


def test_resume_skips_and_removes_what_a_kill_left_half_written(tmp_path):
    out = tmp_path / "out"
    identity = {"run": 1}
    prepare_output_dir(training_args(out), identity)  # records the run
    fake_checkpoint(out, 2)
    fake_checkpoint(out, 4)
    fake_checkpoint(out, 6, complete=False)  # killed while the Trainer was writing it
    (out / ".pt_lora_model.tmp-999999").mkdir()  # an adapter temp folder of a dead process
    (out / "checkpoint-4" / ".pt_lora_model.tmp-999999").mkdir()
    resume = prepare_output_dir(training_args(out), identity)
    assert resume == str(out / "checkpoint-4")
    assert not (out / "checkpoint-6").exists()
    assert (
        not (out / ".pt_lora_model.tmp-999999").exists()
        and not (out / "checkpoint-4" / ".pt_lora_model.tmp-999999").exists()
    )
    assert (out / "checkpoint-2").exists()


def test_checkpoints_not_written_by_zhtrain_are_not_touched(tmp_path):
    out = tmp_path / "out"
    fake_checkpoint(out, 3, complete=False)  # e.g. the seed's own run: no zhtrain_run.json
    with pytest.raises(ZhtrainError, match="not written by zhtrain; pass --resume_from_checkpoint"):
        prepare_output_dir(training_args(out), {"run": 1})
    assert (out / "checkpoint-3").exists() and not (out / RUN_FILE).exists()
    # Named explicitly, it is resumed (with a warning: no manifest).
    explicit = training_args(out, resume_from_checkpoint=str(out / "checkpoint-3"))
    assert prepare_output_dir(explicit, {"run": 1}) == str(out / "checkpoint-3")


def test_rotation_keeps_the_newest_complete_and_the_best(tmp_path):
    for step in (2, 4, 6, 8):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 10, complete=False)
    removed = rotate(tmp_path, 2, keep=str(tmp_path / "checkpoint-2"))
    assert [p.name for p in removed] == ["checkpoint-4", "checkpoint-6"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-2", "checkpoint-8"]


def tiny_trainer(tmp_path, tiny_model_dir, sp_tokenizer_dir, text_dir, callbacks, **overrides):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zhtrain.data.text import load_text_blocks
    from zhtrain.model.lora import apply_lora

    tokenizer = AutoTokenizer.from_pretrained(str(sp_tokenizer_dir))
    train, _, _ = load_text_blocks(str(text_dir), tokenizer, 32, str(tmp_path / "cache"), 0.0, show_progress=False)
    args = training_args(tmp_path / "out", **overrides)
    torch.manual_seed(0)
    model = apply_lora(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), LoraArguments(), False)
    adapter = SaveAdapterCallback(tokenizer, None, "pt_lora_model")
    return build_trainer(
        model,
        args,
        train,
        None,
        tokenizer,
        [adapter, *callbacks],
        take_over_rotation(args, logging.getLogger(__name__)),
    )


class WatchSaves(TrainerCallback):
    """Runs in on_save before the guard: what is on disk while the new checkpoint is being finished."""

    def __init__(self):
        self.seen = []

    def on_save(self, args, state, control, **kwargs):
        out = Path(args.output_dir)
        self.seen.append((state.global_step, [(step, ok) for step, _, ok in list_checkpoints(out)]))


def test_rotation_waits_until_the_new_checkpoint_is_complete(tmp_path, tiny_model_dir, sp_tokenizer_dir, text_dir):
    watch = WatchSaves()
    trainer = tiny_trainer(
        tmp_path, tiny_model_dir, sp_tokenizer_dir, text_dir, [watch], max_steps=6, save_total_limit=1
    )
    trainer.train()
    # While checkpoint-N is unfinished (no manifest yet), the previous complete one is still there.
    assert watch.seen == [
        (2, [(2, False)]),
        (4, [(2, True), (4, False)]),
        (6, [(4, True), (6, False)]),
    ]
    out = tmp_path / "out"
    assert [(step, ok) for step, _, ok in list_checkpoints(out)] == [(6, True)]
    manifest = json.loads((out / "checkpoint-6" / MANIFEST).read_text())
    assert "pt_lora_model/adapter_model.safetensors" in manifest["files"] and "optimizer.pt" in manifest["files"]


def test_rerunning_a_finished_run_changes_nothing(tmp_path, tiny_model_dir, sp_tokenizer_dir, text_dir):
    """transformers' Trainer resumed at max_steps trains one step more and saves checkpoint-N+1; zhtrain does not."""
    import shutil

    from safetensors.torch import load_file

    from zhtrain.pretrain import parse_pretrain_args, pretrain

    out = tmp_path / "out"
    argv = [str(a) for a in pretrain_flags(tiny_model_dir, sp_tokenizer_dir, text_dir, out)[1:]]
    pretrain(*parse_pretrain_args(argv))
    first = load_file(str(out / "pt_lora_model" / "adapter_model.safetensors"))
    shutil.rmtree(out / "pt_lora_model")  # as if killed while writing the final adapter
    result = pretrain(*parse_pretrain_args(argv))
    assert result.metrics["resumed_from"] == str(out / "checkpoint-4")
    assert [step for step, _, _ in list_checkpoints(out)] == [2, 4] and result.trainer.state.global_step == 4
    again = load_file(str(out / "pt_lora_model" / "adapter_model.safetensors"))
    assert set(again) == set(first) and all(torch.equal(first[k], again[k]) for k in first)


# ---------------------------------------------------------------------------------------------
# Non-finite loss


class PoisonAt(TrainerCallback):
    """Make one LoRA weight NaN just before step `step`: the loss of that step is NaN."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if "lora_A" in n).fill_(math.nan)


def test_nan_loss_stops_before_the_step_is_saved(tmp_path, tiny_model_dir, sp_tokenizer_dir, text_dir):
    trainer = tiny_trainer(tmp_path, tiny_model_dir, sp_tokenizer_dir, text_dir, [PoisonAt(6)], max_steps=10)
    out = tmp_path / "out"
    with pytest.raises(
        ZhtrainError,
        match=rf"training loss became nan at step 6; stopped .* Newest good checkpoint: {out / 'checkpoint-4'}",
    ):
        trainer.train()
    # Step 6 would have been saved (save_steps 2): it was not, and checkpoint-4 stays the newest.
    assert [(step, ok) for step, _, ok in list_checkpoints(out)] == [(2, True), (4, True)]
    assert last_complete_checkpoint(out) == out / "checkpoint-4"
    assert not (out / "pt_lora_model").exists(), "no adapter is written from a NaN model"


def run_cli(*argv, cwd=None, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "zhtrain", *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
        cwd=cwd or REPO,
    )


def pretrain_flags(model, tokenizer, data, out):
    return [
        "pretrain",
        "--model_name_or_path",
        model,
        "--tokenizer_name_or_path",
        tokenizer,
        "--dataset_dir",
        data,
        "--data_cache_dir",
        Path(out).parent / "cache",
        "--output_dir",
        out,
        "--block_size",
        "32",
        "--per_device_train_batch_size",
        "2",
        "--max_steps",
        "4",
        "--save_steps",
        "2",
        "--do_train",
        "--report_to",
        "none",
        "--disable_tqdm",
        "True",
    ]


def test_cli_stops_on_an_inf_loss_with_one_line(tmp_path, sp_tokenizer_dir, text_dir):
    from fixtures import make_tiny_llama
    from safetensors.torch import load_file, save_file

    model = make_tiny_llama(tmp_path / "broken", vocab_size=400)
    weights = load_file(str(model / "model.safetensors"))
    weights["lm_head.weight"][:, 0] = math.inf  # logits inf from the first forward pass
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    proc = run_cli(*pretrain_flags(model, sp_tokenizer_dir, text_dir, tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    # The run got going (progress bars), then stopped: the error is the last line, and no traceback.
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("zhtrain: error: training loss became nan at step 1; stopped"), proc.stderr
    assert "Newest good checkpoint: none" in last and "Traceback" not in proc.stderr
    assert not list((tmp_path / "out").glob("checkpoint-*")) and not (tmp_path / "out" / "pt_lora_model").exists()


# ---------------------------------------------------------------------------------------------
# Safe loading


def plant_pickle(path: Path, marker: Path) -> None:
    """A .bin whose unpickling would run `touch marker`."""

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"weight": Payload()}, path)


def test_planted_pickle_is_really_malicious(tmp_path):
    """Control: the planted file does run code when unpickled without weights_only."""
    plant_pickle(tmp_path / "evil.bin", tmp_path / "marker")
    torch.load(tmp_path / "evil.bin", weights_only=False)
    assert (tmp_path / "marker").exists()


def test_malicious_base_model_bin_is_refused(tmp_path, sp_tokenizer_dir, text_dir, tiny_model_dir):
    import shutil

    model = tmp_path / "evil_model"
    model.mkdir()
    shutil.copy(tiny_model_dir / "config.json", model)
    marker = tmp_path / "PWNED"
    plant_pickle(model / "pytorch_model.bin", marker)
    proc = run_cli(*pretrain_flags(model, sp_tokenizer_dir, text_dir, tmp_path / "out"))
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]  # found when the model loads, after tokenizing
    assert last == (
        f"zhtrain: error: {model}: pytorch_model.bin refused: unpickling it would call posix.system "
        "(zhtrain loads .bin files with torch.load(weights_only=True) only). "
        "Use safetensors weights from a source you trust"
    )
    assert "Traceback" not in proc.stderr and not marker.exists()


def test_malicious_adapter_bin_for_peft_path_is_refused(tmp_path, sp_tokenizer_dir, text_dir, tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "evil_adapter"
    get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), LoraConfig(target_modules=["q_proj"])
    ).save_pretrained(str(adapter))
    (adapter / "adapter_model.safetensors").unlink()
    marker = tmp_path / "PWNED"
    plant_pickle(adapter / "adapter_model.bin", marker)
    proc = run_cli(
        *pretrain_flags(tiny_model_dir, sp_tokenizer_dir, text_dir, tmp_path / "out"), "--peft_path", adapter
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"zhtrain: error: --peft_path {adapter}: adapter_model.bin refused: unpickling it would call posix.system"
    )
    assert "Traceback" not in proc.stderr and not marker.exists()


def test_planted_pickle_in_a_checkpoint_is_refused_on_resume(tmp_path, tiny_model_dir, sp_tokenizer_dir, text_dir):
    """The Trainer reads optimizer/scheduler/RNG state with weights_only=True too."""
    out = tmp_path / "out"
    first = run_cli(*pretrain_flags(tiny_model_dir, sp_tokenizer_dir, text_dir, out))
    assert first.returncode == 0, first.stderr[-2000:]
    marker = tmp_path / "PWNED"
    plant_pickle(out / "checkpoint-4" / "rng_state.pth", marker)
    write_manifest(out / "checkpoint-4", 4)  # even a checkpoint that looks complete
    proc = run_cli(*pretrain_flags(tiny_model_dir, sp_tokenizer_dir, text_dir, out), "--max_steps", "6")
    assert proc.returncode != 0 and not marker.exists()
    assert "Weights only load failed" in proc.stderr


# ---------------------------------------------------------------------------------------------
# Run report, TensorBoard default


def test_run_report_and_plot(tmp_path, tiny_model_dir, sp_tokenizer_dir, text_dir):
    from zhtrain.pretrain import parse_pretrain_args, pretrain

    out = tmp_path / "out"
    argv = [str(a) for a in pretrain_flags(tiny_model_dir, sp_tokenizer_dir, text_dir, out)[1:]]
    argv += [
        "--max_steps",
        "6",
        "--logging_steps",
        "1",
        "--do_eval",
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "2",
        "--validation_split_percentage",
        "0.1",
        "--learning_rate",
        "1e-2",
    ]
    pretrain(*parse_pretrain_args(argv))
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


def test_report_without_matplotlib_skips_the_plot(tmp_path, monkeypatch):
    from zhtrain.training.report import write_report

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    history = [{"step": 1, "loss": 2.0, "learning_rate": 1e-3}, {"step": 1, "eval_loss": 1.5}]
    write_report(str(tmp_path), {"command": "pretrain", "output_dir": str(tmp_path), "global_step": 1}, history)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["plot"] is None and "matplotlib is not installed" in report["plot_note"]
    assert (
        not (tmp_path / "loss.png").exists() and "matplotlib is not installed" in (tmp_path / "report.md").read_text()
    )


@pytest.mark.parametrize("available, expected", [(True, ["tensorboard"]), (False, [])])
def test_tensorboard_is_the_default_logger_when_installed(monkeypatch, tmp_path, available, expected):
    import transformers.integrations

    monkeypatch.setattr(transformers.integrations, "is_tensorboard_available", lambda: available)
    assert ZhtrainTrainingArguments(output_dir=str(tmp_path)).report_to == expected
    assert ZhtrainTrainingArguments(output_dir=str(tmp_path), report_to="none").report_to == []


# ---------------------------------------------------------------------------------------------
# Kill -9 trials (benchmarks/crash_trials.py), a few kills


@pytest.mark.slow
def test_crash_trials_lose_nothing(tmp_path):
    result_file = tmp_path / "result.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "crash_trials.py"),
            "--kills",
            "4",
            "--max_steps",
            "16",
            "--files",
            "4",
            "--lines",
            "1000",
            "--workdir",
            str(tmp_path / "work"),
            "--json",
            str(result_file),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert result_file.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(result_file.read_text())
    assert result["kills_landed"] >= 3, proc.stdout
    assert result["half_written_checkpoints"] == 0 and result["resumed_from_incomplete_checkpoint"] == 0
    assert result["broken_cache_entries"] == 0 and result["final_run_returncode"] == 0
    assert result["final_vs_uninterrupted"]["bitwise_equal"], result["final_vs_uninterrupted"]
    assert proc.returncode == 0, proc.stdout[-3000:]
