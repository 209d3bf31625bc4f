"""`zhtrain sft` end to end on tiny models: LoRA and --peft_path, full FT under DDP, FSDP gather-and-save,
--preprocess_only, lazy data, the seed scripts' flags, errors."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sft_fixtures import make_chat_tokenizer, write_alpaca, write_sharegpt

from zhtrain.errors import ZhtrainError
from zhtrain.sft import parse_sft_args, sft

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
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


def flags(model, tokenizer, out, *extra, steps=3):
    return [
        "--model_name_or_path",
        str(model),
        "--tokenizer_name_or_path",
        str(tokenizer),
        "--output_dir",
        str(out),
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
        "--disable_tqdm",
        "True",
        "--model_max_length",
        "256",
        *extra,
    ]


def run(argv):
    return sft(*parse_sft_args(argv))


def logits_of(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict:
    return {
        "PATH": f"{BIN}:/usr/bin:/bin",
        "HOME": str(Path.home()),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def test_lora_sft_writes_sft_lora_model_that_reloads(tmp_path, tiny_model_dir, sp_tokenizer_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = write_sharegpt(tmp_path / "conv.json", copies=3)
    valid = write_alpaca(tmp_path / "valid.json", n=4)
    result = run(
        flags(
            tiny_model_dir,
            sp_tokenizer_dir,
            tmp_path / "out",
            *SEED_LORA,
            "--data_path",
            str(data),
            "--validation_file",
            str(valid),
            "--do_eval",
            "--template",
            "llama2_chat",
            "--group_by_length",
        )
    )
    adapter = tmp_path / "out" / "sft_lora_model"
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.model", "zhtrain_template.json"} <= {
        p.name for p in adapter.iterdir()
    }
    assert json.loads((adapter / "zhtrain_template.json").read_text())["template"] == "llama2_chat"
    assert (tmp_path / "out" / "checkpoint-2" / "sft_lora_model" / "zhtrain_template.json").is_file()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 8 and set(config["modules_to_save"]) == {"embed_tokens", "lm_head"}
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(adapter))
    assert torch.allclose(logits_of(reloaded, ids), logits_of(result.trainer.model, ids), atol=1e-5)
    metrics = result.metrics
    assert (
        metrics["train_samples"] == 9 and metrics["train_turns"] == 15 and metrics["engine"] == "PeftModelForCausalLM"
    )
    assert 0 <= metrics["eval_accuracy"] <= 1 and metrics["eval_samples"] == 4
    assert result.trainer.args.train_sampling_strategy == "group_by_length"


def test_peft_path_continues_the_adapter_on_a_resized_base(tmp_path, tiny_model_dir, sp_tokenizer_dir):
    """The reference's "continue the Alpaca LoRA": base with fewer rows + a larger tokenizer + --peft_path."""
    from safetensors.torch import load_file

    tokenizer = make_chat_tokenizer(sp_tokenizer_dir, tmp_path / "chat_tok")  # 402 tokens vs the model's 400
    data = write_sharegpt(tmp_path / "conv.json", copies=2)
    first = run(
        flags(
            tiny_model_dir,
            tokenizer,
            tmp_path / "first",
            *SEED_LORA,
            "--data_path",
            str(data),
            "--template",
            "tokenizer",
        )
    )
    assert first.trainer.model.get_input_embeddings().weight.shape[0] == 402
    adapter = tmp_path / "first" / "sft_lora_model"
    # Continue with learning rate 0: the continued adapter must be the first one, loaded (not a fresh init).
    run(
        flags(
            tiny_model_dir,
            tokenizer,
            tmp_path / "second",
            "--data_path",
            str(data),
            "--template",
            "tokenizer",
            "--peft_path",
            str(adapter),
            "--learning_rate",
            "0",
            steps=1,
        )
    )
    before = load_file(str(adapter / "adapter_model.safetensors"))
    after = load_file(str(tmp_path / "second" / "sft_lora_model" / "adapter_model.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert any("lora_B" in k and before[k].abs().sum() > 0 for k in before)  # trained, so not PEFT's zero init
    # With a learning rate it trains on from there.
    run(
        flags(
            tiny_model_dir,
            tokenizer,
            tmp_path / "third",
            "--data_path",
            str(data),
            "--template",
            "tokenizer",
            "--peft_path",
            str(adapter),
            steps=1,
        )
    )
    third = load_file(str(tmp_path / "third" / "sft_lora_model" / "adapter_model.safetensors"))
    assert any(not torch.equal(before[k], third[k]) for k in before)


def test_full_finetuning_saves_a_transformers_model(tmp_path, tiny_model_dir, sp_tokenizer_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = write_alpaca(tmp_path / "d" / "a.json", n=6)
    result = run(
        flags(
            tiny_model_dir,
            sp_tokenizer_dir,
            tmp_path / "out",
            "--dataset_dir",
            str(tmp_path / "d"),
            "--gradient_checkpointing",
            "True",
            "--lazy_preprocess",
            "True",
        )
    )
    assert (
        data.is_file() and result.metrics["template"] == "alpaca"
    )  # --dataset_dir means run_sft.sh: the alpaca prompt
    out = tmp_path / "out"
    assert json.loads((out / "zhtrain_template.json").read_text())["template"] == "alpaca"
    saved = AutoModelForCausalLM.from_pretrained(str(out))
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    assert torch.allclose(logits_of(saved, ids), logits_of(result.trainer.model, ids), atol=1e-5)
    assert not torch.allclose(
        logits_of(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), ids), logits_of(saved, ids), atol=1e-4
    )
    assert len(AutoTokenizer.from_pretrained(str(out))) == 400 and (out / "tokenizer.model").is_file()
    # The model and the Trainer's checkpoint weights are readable as the umask allows, like config.json.
    plain = (out / "config.json").stat().st_mode & 0o777
    modes = {path: path.stat().st_mode & 0o777 for path in out.rglob("*.safetensors")}
    assert out / "model.safetensors" in modes and any("checkpoint-" in str(path) for path in modes)
    assert set(modes.values()) == {plain}, modes


def test_rerunning_a_finished_full_finetuning_changes_nothing(tmp_path, tiny_model_dir, sp_tokenizer_dir):
    """transformers 5's Trainer resumed at max_steps trains one more step; the rerun of a finished full
    fine-tuning (here killed while writing its final model) rewrites that model from checkpoint-4."""
    from safetensors.torch import load_file

    from zhtrain.training.checkpoints import list_checkpoints

    write_alpaca(tmp_path / "d" / "a.json", n=6)
    argv = flags(tiny_model_dir, sp_tokenizer_dir, tmp_path / "out", "--dataset_dir", str(tmp_path / "d"), steps=4)
    out = tmp_path / "out"
    run(argv)
    first = load_file(str(out / "model.safetensors"))
    (out / "model.safetensors").unlink()
    result = run(argv)
    assert result.metrics["resumed_from"] == str(out / "checkpoint-4") and "train_loss" not in result.metrics
    assert [step for step, _, _ in list_checkpoints(out)] == [2, 4] and result.trainer.state.global_step == 4
    again = load_file(str(out / "model.safetensors"))
    assert set(again) == set(first) and all(torch.equal(first[k], again[k]) for k in first)


def test_preprocess_only_writes_one_line_per_sample_and_a_summary(tmp_path, tiny_model_dir, sp_tokenizer_dir, capsys):
    data = write_sharegpt(tmp_path / "conv.json")
    records = json.loads(data.read_text())
    records.append(
        {"id": "too_long", "conversations": [{"from": "human", "value": "的" * 300}, {"from": "gpt", "value": "好"}]}
    )
    data.write_text(json.dumps(records, ensure_ascii=False))
    out = tmp_path / "pre.jsonl"
    result = run(
        flags(
            tiny_model_dir,
            sp_tokenizer_dir,
            tmp_path / "out",
            "--data_path",
            str(data),
            "--template",
            "alpaca",
            "--preprocess_only",
            "--preprocessed_output",
            str(out),
            "--model_max_length",
            "200",
        )
    )
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["id"] for line in lines] == ["conv_0_0", "conv_1_0", "conv_2_0", "too_long"]
    assert all(set(line) >= {"id", "input_ids", "labels", "dropped"} for line in lines)
    assert lines[0]["dropped"] is None and "nothing left to train" in lines[3]["dropped"]
    assert all(len(line["input_ids"]) == len(line["labels"]) <= 200 for line in lines)
    trained = sum(label != -100 for line in lines if not line["dropped"] for label in line["labels"])
    printed = capsys.readouterr().out
    assert (
        "train: 4 samples, 6 assistant turns" in printed
        and f"{trained} trained tokens" in printed
        and "1 dropped" in printed
    )
    assert re.search(r"encoded 4 samples in [\d.]+ s \(\d+ samples/s\)", printed)
    assert result.trainer is None and not (tmp_path / "out").exists()
    # If every sample's prompt alone is too long, that is an error, not an empty run.
    with pytest.raises(
        ZhtrainError, match=rf"train \({re.escape(str(data))}\): all 4 samples were dropped: .* --model_max_length 8"
    ):
        run(
            flags(
                tiny_model_dir,
                sp_tokenizer_dir,
                tmp_path / "out",
                "--data_path",
                str(data),
                "--preprocess_only",
                "--model_max_length",
                "8",
            )
        )


def test_lazy_dataset_tokenizes_only_in_getitem(tiny_model_dir, sp_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    from zhtrain.data.chat import load_conversations
    from zhtrain.data.supervised import LazySupervisedDataset, SupervisedDataset, encode_conversations
    from zhtrain.data.templates import get_template

    class CountingTokenizer:
        def __init__(self, inner):
            self.inner, self.calls = inner, 0

        def __call__(self, *args, **kwargs):
            self.calls += 1
            return self.inner(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    tokenizer = CountingTokenizer(AutoTokenizer.from_pretrained(str(sp_tokenizer_dir)))
    conversations = load_conversations([write_sharegpt(tmp_path / "c.json", copies=50)])
    template = get_template("vicuna_v1.1")
    lazy = LazySupervisedDataset(conversations, tokenizer, template, 256)
    assert tokenizer.calls == 0 and len(lazy) == 150
    eager = SupervisedDataset(encode_conversations(conversations, tokenizer.inner, template, 256))
    assert lazy[7] == eager[7] and tokenizer.calls == 1


@pytest.mark.parametrize(
    "extra, pattern",
    [
        (["--template", "chatml"], "--template chatml: unknown template"),
        (["--template", "tokenizer"], "has no chat_template"),
        (
            ["--model_max_length", "1024"],
            r"--model_max_length 1024 is larger than the model's context \(256 positions\)",
        ),
        (["--max_seq_length", "100"], "--model_max_length 256 and --max_seq_length 100 disagree"),
        (["--do_eval"], "--do_eval needs evaluation data"),
    ],
)
def test_bad_settings_are_one_line_errors(tmp_path, tiny_model_dir, sp_tokenizer_dir, extra, pattern):
    data = write_sharegpt(tmp_path / "conv.json")
    with pytest.raises(ZhtrainError, match=pattern):
        run(
            flags(
                tiny_model_dir,
                sp_tokenizer_dir,
                tmp_path / "out",
                "--data_path",
                str(data),
                "--lora_rank",
                "4",
                *extra,
                steps=1,
            )
        )


def test_cli_prints_one_line_and_exits_2(tmp_path, tiny_model_dir, sp_tokenizer_dir):
    bad = tmp_path / "bad.json"
    bad.write_text('[\n{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": ""}]}\n]')
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "zhtrain",
            "train_mem",
            "--model_name_or_path",
            str(tiny_model_dir),
            "--tokenizer_name_or_path",
            str(sp_tokenizer_dir),
            "--data_path",
            str(bad),
            "--output_dir",
            str(tmp_path / "out"),
            "--model_max_length",
            "64",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"zhtrain: error: {bad}: line 2 (record 1), message 2: 'value' is empty; "
        "remove the message or the record, or fill it in"
    )


# ---------------------------------------------------------------------------------------------
# The seed's two commands


def seed_script_args(script: Path, module: str = "zhtrain.sft") -> list[str]:
    text = script.read_text()
    variables = dict(re.findall(r"^(\w+)=(\S+)$", text, flags=re.M))
    command = text[text.index("torchrun") :].replace("\\\n", " ")
    command = re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m.group(1), "1"), command)
    argv = shlex.split(command)
    return argv[argv.index(module) + 1 :]


def test_run_sft_sh_flags_parse_with_the_seed_meaning():
    model_args, data_args, lora_args, training_args = parse_sft_args(seed_script_args(REPO / "examples" / "run_sft.sh"))
    assert (
        training_args.learning_rate == 1e-4 and training_args.warmup_steps == 0.03 and training_args.weight_decay == 0
    )
    assert (
        training_args.eval_strategy == "steps" and training_args.eval_steps == 100 and training_args.save_steps == 200
    )
    assert training_args.do_train and training_args.do_eval and training_args.gradient_accumulation_steps == 8
    assert training_args.gradient_checkpointing and training_args.ddp_find_unused_parameters is False
    assert data_args.max_seq_length == 512 and data_args.dataset_dir == "path/to/sft/data/dir"
    assert data_args.validation_file == "validation_file_name" and model_args.torch_dtype == "float16"
    assert lora_args.use_lora and lora_args.lora_rank == 8 and lora_args.peft_path == "path/to/peft/model/dir"
    assert lora_args.modules_to_save_list == ["embed_tokens", "lm_head"] and len(lora_args.target_modules) == 7
    assert training_args.deepspeed.endswith("ds_zero2_no_offload.json")
    if not torch.cuda.is_available():
        assert training_args.fp16 is False and any("--fp16 needs a CUDA GPU" in n for n in training_args.compat_notes)


def test_fastchat_command_flags_parse_with_the_seed_meaning():
    model_args, data_args, lora_args, training_args = parse_sft_args(
        seed_script_args(REPO / "examples" / "train_fastchat.sh")
    )
    assert not lora_args.use_lora  # FastChat: full fine-tuning
    assert (
        data_args.data_path == "data/dummy_conversation.json"
        and data_args.lazy_preprocess
        and data_args.model_max_length == 2048
    )
    assert training_args.num_train_epochs == 5 and training_args.per_device_train_batch_size == 2
    assert training_args.gradient_accumulation_steps == 16 and training_args.learning_rate == 2e-5
    assert (
        training_args.save_steps == 1200 and training_args.save_total_limit == 10 and training_args.warmup_steps == 0.03
    )
    assert training_args.eval_strategy == "no" and training_args.gradient_checkpointing
    assert training_args.fsdp_config["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]
    if not torch.cuda.is_available():
        notes = " ".join(training_args.compat_notes)
        assert (
            training_args.fsdp is None and "--fsdp 'full_shard auto_wrap' needs CUDA GPUs" in notes and "DDP" in notes
        )
        assert training_args.bf16 is False and training_args.tf32 is None and "--tf32 needs a CUDA GPU" in notes


@pytest.mark.slow
def test_fastchat_command_runs_full_finetuning_under_ddp_with_2_processes(tmp_path, tiny_model_dir, sp_tokenizer_dir):
    """The seed's FastChat command, program name changed only, on 2 CPU processes: DDP, then a loadable model."""
    from transformers import AutoModelForCausalLM

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    for item in sp_tokenizer_dir.iterdir():
        shutil.copy(item, model / item.name)  # FastChat reads the tokenizer from the model folder
    data = write_sharegpt(tmp_path / "conv.json", copies=4)
    script = (REPO / "examples" / "train_fastchat.sh").read_text()
    for old, new in {
        "--nproc_per_node=8 --master_port=20001": f"--nproc_per_node=2 --master_port={free_port()}",
        "~/model_weights/Alpaca-Plus-13b": str(model),
        "data/dummy_conversation.json": str(data),
        "--output_dir output": f"--output_dir {tmp_path / 'out'}",
        "--num_train_epochs 5": "--num_train_epochs 2",
        "--model_max_length 2048": "--model_max_length 256",  # the tiny model's context
    }.items():
        assert old in script
        script = script.replace(old, new)
    (tmp_path / "train.sh").write_text(script)
    proc = subprocess.run(
        ["bash", str(tmp_path / "train.sh")], capture_output=True, text=True, timeout=600, cwd=tmp_path, env=clean_env()
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    log = proc.stdout + proc.stderr
    assert "trained with engine DistributedDataParallel, world size 2" in log
    assert "--fsdp 'full_shard auto_wrap' needs CUDA GPUs" in log and "--tf32 needs a CUDA GPU" in log
    assert "truncated" in log  # the longest conversation does not fit 256 tokens: said per sample
    out = tmp_path / "out"
    saved = AutoModelForCausalLM.from_pretrained(str(out))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    assert not torch.allclose(logits_of(saved, ids), logits_of(base, ids), atol=1e-5)
    assert json.loads((out / "zhtrain_template.json").read_text())["template"] == "vicuna_v1.1"


@pytest.mark.slow
@pytest.mark.parametrize("layer_cls", ["LlamaDecoderLayer"])
def test_fsdp_gather_and_save_under_torchrun_on_cpu(tmp_path, tiny_model_dir, sp_tokenizer_dir, layer_cls):
    """zhtrain.fsdp: fully_shard over gloo with 2 processes, one step, full state dict on rank 0, loadable folder."""
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(Path(__file__).parents[1] / "workers"))
    from sft_fsdp_worker import BATCH, LR

    result_path, out = tmp_path / "result.json", tmp_path / "saved"
    proc = subprocess.run(
        [
            str(BIN / "torchrun"),
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            str(Path(__file__).parents[1] / "workers" / "sft_fsdp_worker.py"),
            str(tiny_model_dir),
            str(sp_tokenizer_dir),
            str(out),
            str(result_path),
            layer_cls,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(clean_env(), PYTHONPATH=str(REPO / "src")),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(result_path.read_text())
    assert result["world_size"] == 2 and result["is_fsdp_module"] and result["wrapper"].startswith("FSDP")
    assert result["units"] == 2 + 1 and result["layer_classes"] == ["LlamaDecoderLayer"]  # 2 decoder layers + root
    assert result["local_numel"] < result["full_numel"]  # really sharded
    # The saved model is the one-step-trained model: the same SGD step in one process gives the same weights.
    reference = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    ids = torch.tensor(BATCH)
    loss = reference(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.optim.SGD(reference.parameters(), lr=LR).step()
    assert loss.item() == pytest.approx(result["loss"], rel=1e-5)
    saved = AutoModelForCausalLM.from_pretrained(str(out))
    expected = reference.state_dict()
    for name, tensor in saved.state_dict().items():
        assert torch.allclose(tensor, expected[name], atol=1e-6), name
    assert not torch.allclose(
        saved.state_dict()["model.layers.0.mlp.up_proj.weight"],
        AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).state_dict()["model.layers.0.mlp.up_proj.weight"],
    )


def test_demo_conversation_set_is_valid_chinese_and_its_sft_flags_parse(tmp_path):
    from zhtrain import demo
    from zhtrain.data.chat import load_conversations

    train, valid = demo.write_conversations(tmp_path / "data")
    train_convs, valid_convs = load_conversations([train]), load_conversations([valid])
    assert 20 <= len(train_convs) + len(valid_convs) <= 50 and len(valid_convs) >= 5
    assert {c.id for c in train_convs}.isdisjoint(c.id for c in valid_convs)
    assert any(len(c.messages) > 3 for c in train_convs)  # multi-turn and system prompts are in it
    replies = [m["content"] for c in train_convs for m in c.messages if m["role"] == "assistant"]
    assert all(re.search(r"[\u4e00-\u9fff]", r) for r in replies)
    opts = demo.parse_demo_args(["--output_dir", str(tmp_path / "run"), "--sft_steps", "5"])
    model_args, data_args, lora_args, training_args = parse_sft_args(demo.sft_flags(tmp_path, train, valid, opts))
    assert lora_args.use_lora and lora_args.peft_path == str(tmp_path / "run" / "pt_lora_model")
    assert data_args.template == "tokenizer" and training_args.max_steps == 5 and training_args.eval_on_start
    with pytest.raises(ZhtrainError, match="--sft_steps -1"):
        demo.parse_demo_args(["--sft_steps", "-1"])
