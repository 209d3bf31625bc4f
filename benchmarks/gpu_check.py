"""The GPU check behind benchmarks/gpu_check.sh: two real runs on one GPU, with measured figures.

1. `zhtrain pretrain` as the seed's run_pt.sh runs it: DeepSpeed ZeRO-2 (src/zhtrain/configs/ds_zero2_no_offload.json),
   --fp16, --torch_dtype float16, gradient checkpointing, LoRA r 8 on the seven projections with
   embed_tokens + lm_head trained in full, on a ~1.1B random LLaMA (TinyLlama-1.1B's shape, vocab
   32000) grown to a 49953-token tokenizer (the seed's "train Chinese LLaMA" mode), block 2048.
2. `zhtrain sft` as the seed's FastChat command runs it: full fine-tuning with
   --fsdp "full_shard auto_wrap" --fsdp_transformer_layer_cls_to_wrap LlamaDecoderLayer --bf16 --tf32,
   --model_max_length 2048, gradient checkpointing, on the same base.

Each run prints tokens/s (steady state: steps after the first two, from the Trainer's step-end
times), peak GPU memory (torch.cuda.max_memory_allocated) and MFU, and is checked: the engine
(DeepSpeedEngine / FSDP), the world size, a finite loss, and the outputs (a non-empty adapter
with 49953-row embeddings; a loadable model folder).

MFU = tokens/s x (6 N + 12 L H T) / peak, with N the weights that do matrix work (all but the input
embedding), L layers, H hidden size, T the block; peak = the GPU's dense fp16/bf16 rate (989 TFLOP/s
for H100/H200). LoRA skips the frozen weights' gradients (a third less real work) and gradient
checkpointing re-runs the forward (more real work); the usual 6N convention counts neither.

GPU_CHECK_TINY=1 runs the same script with a tiny model and few steps, on CPU if there is no GPU
(there fp16/bf16 are switched off by zhtrain and FSDP becomes DDP, as the log says): it proves the
script, not the figures.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = os.environ.get("GPU_CHECK_TINY", "0") not in ("", "0", "false", "False")
VOCAB, TOKENIZER_SIZE = 32000, 49953  # the seed's "train Chinese LLaMA from original LLaMA"
MODEL = dict(
    hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4
)
TINY_MODEL = dict(
    hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)
SIZES = {  # block, per-device batch and steps of each run
    "pretrain": (2048, 8, 20) if not TINY else (64, 2, 4),
    "sft": (2048, 4, 10) if not TINY else (64, 2, 4),
}
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12}
WARM_STEPS = 2


# ---------------------------------------------------------------------------------------------
# Inside a run (under torchrun): time the Trainer's steps and record the figures


def run_in_worker(command: str, result_file: str, argv: list[str]) -> None:
    import torch
    from transformers import TrainerCallback

    import zhtrain.pretrain as pretrain_module
    import zhtrain.sft as sft_module

    step_ends: list[tuple[float, int]] = []

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            step_ends.append((time.perf_counter(), state.num_input_tokens_seen))

    module = pretrain_module if command == "pretrain" else sft_module
    build = module.build_trainer

    def build_with_timer(*args, **kwargs):  # Trainer.add_callback: the public way to add one more
        trainer = build(*args, **kwargs)
        trainer.add_callback(StepTimer())
        return trainer

    module.build_trainer = build_with_timer
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    parse = pretrain_module.parse_pretrain_args if command == "pretrain" else sft_module.parse_sft_args
    run = pretrain_module.pretrain if command == "pretrain" else sft_module.sft
    parsed = parse(argv)
    training_args = parsed[-1]
    result = run(*parsed)
    trainer = result.trainer
    if not trainer.args.should_save:
        return
    block, batch, _ = SIZES[command]
    first = WARM_STEPS if len(step_ends) > WARM_STEPS + 1 else 0
    (t0, seen0), (t1, seen1) = step_ends[first], step_ends[-1]
    steps = len(step_ends) - 1 - first
    fixed = batch * block * training_args.world_size * training_args.gradient_accumulation_steps
    tokens = (seen1 - seen0) if seen1 > seen0 else steps * fixed
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    record = {
        "command": command,
        "engine": type(trainer.model_wrapped).__name__,
        "world_size": training_args.world_size,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "steps_timed": steps,
        "tokens_per_second": tokens / (t1 - t0) if t1 > t0 else None,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "losses": losses,
        "block": block,
        "output_dir": training_args.output_dir,
    }
    Path(result_file).write_text(json.dumps(record, indent=1))


def matmul_parameters(shape: dict, vocab: int) -> int:
    """Weights that do matrix work per token: the decoder layers and lm_head (the input embedding is a lookup)."""
    hidden, inter, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv_width = shape["num_key_value_heads"] * hidden // shape["num_attention_heads"]
    return layers * (2 * hidden * hidden + 2 * hidden * kv_width + 3 * hidden * inter) + vocab * hidden


# ---------------------------------------------------------------------------------------------
# Assets: tokenizer, base model, pre-training text, conversations


WORDS = [f"w{i:05d}" for i in range(TOKENIZER_SIZE - 3)]


def make_tokenizer(folder: Path) -> Path:
    """A fast tokenizer of exactly 49953 tokens: <unk> <s> </s> and 49950 words (LLaMA's special ids).

    Plain vocabulary entries, built directly: a SentencePiece model cannot learn 49953 merges from
    synthetic text, and 49950 *added* tokens would make every tokenizer slow."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{word: 3 + i for i, word in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(str(folder))
    assert len(tokenizer) == TOKENIZER_SIZE, len(tokenizer)
    return folder


def make_model(folder: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        **(TINY_MODEL if TINY else MODEL),
    )
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):  # a 1.1B random init takes seconds on the GPU, a minute on CPU
        model = LlamaForCausalLM(config).to(torch.float16 if device == "cuda" else torch.float32)
    model.save_pretrained(str(folder))
    del model
    return folder


def make_text(folder: Path, tokens: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1)
    lines, count = [], 0
    while count < tokens:
        n = rng.randint(20, 200)
        lines.append(" ".join(rng.choice(WORDS) for _ in range(n)))
        count += n + 2  # one token per word, BOS and EOS
    (folder / "corpus.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def make_conversations(path: Path, samples: int, block: int) -> Path:
    """FastChat conversations long enough to be cut at `block` tokens inside the second reply."""
    rng = random.Random(2)
    data = []
    for k in range(samples):
        turns = []
        for t in range(4):
            words = block // 8 if t % 2 == 0 else block // 2
            turns.append(
                {"from": "human" if t % 2 == 0 else "gpt", "value": " ".join(rng.choice(WORDS) for _ in range(words))}
            )
        data.append({"id": f"identity_{k}", "conversations": turns})
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# The check


def launch(command: str, flags: list[str], workdir: Path) -> dict:
    result_file = workdir / f"{command}_result.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        "1",
        "--master_port",
        "29531",
        __file__,
        "--gpu-check-run",
        command,
        str(result_file),
        *flags,
    ]
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])),
    )
    started = time.perf_counter()
    log = workdir / f"{command}.log"
    with open(log, "w") as handle:
        proc = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    if proc.returncode != 0 or not result_file.is_file():
        sys.stdout.write(log.read_text()[-6000:])
        raise SystemExit(f"gpu_check: {command} failed (exit {proc.returncode}); its log is above")
    record = json.loads(result_file.read_text())
    record["wall_seconds"] = time.perf_counter() - started
    return record


def mfu(record: dict) -> float | None:
    peak = next((v for k, v in PEAK_FLOPS.items() if k in record["device"]), None)
    if not peak or not record["tokens_per_second"]:
        return None
    shape = TINY_MODEL if TINY else MODEL
    per_token = (
        6 * matmul_parameters(shape, TOKENIZER_SIZE)
        + 12 * shape["num_hidden_layers"] * shape["hidden_size"] * record["block"]
    )
    return record["tokens_per_second"] * per_token / peak


def check(record: dict, on_gpu: bool) -> list[str]:
    problems = []
    engine = record["engine"]
    if record["world_size"] != 1:
        problems.append(f"world size {record['world_size']}, expected 1")
    if record["command"] == "pretrain" and engine != "DeepSpeedEngine":
        problems.append(f"engine {engine}, expected DeepSpeedEngine")
    if (
        record["command"] == "sft"
        and on_gpu
        and "FullyShardedDataParallel" not in engine
        and not engine.startswith("FSDP")
    ):
        problems.append(f"engine {engine}, expected FSDP")
    if not record["losses"] or not all(math.isfinite(x) for x in record["losses"]):
        problems.append(f"losses {record['losses']}")
    out = Path(record["output_dir"])
    if record["command"] == "pretrain":
        from safetensors import safe_open

        adapter = out / "pt_lora_model" / "adapter_model.safetensors"
        with safe_open(str(adapter), "pt") as handle:
            shapes = {k: handle.get_slice(k).get_shape() for k in handle.keys()}
        rows = [s[0] for k, s in shapes.items() if k.endswith(("embed_tokens.weight", "lm_head.weight"))]
        if rows != [TOKENIZER_SIZE, TOKENIZER_SIZE] or not any("lora_A" in k for k in shapes):
            problems.append(f"adapter {adapter}: embedding rows {rows}, {len(shapes)} tensors")
    elif not any(out.glob("model*.safetensors")):
        problems.append(f"no model*.safetensors in {out}")
    return problems


def main() -> None:
    if sys.argv[1:2] == ["--gpu-check-run"]:
        run_in_worker(sys.argv[2], sys.argv[3], sys.argv[4:])
        return
    import torch

    on_gpu = torch.cuda.is_available()
    if not on_gpu and not TINY:
        raise SystemExit("gpu_check: no CUDA GPU here; run with GPU_CHECK_TINY=1 to check the script on CPU")
    workdir = Path(os.environ.get("GPU_CHECK_DIR") or tempfile.mkdtemp(prefix="zhtrain-gpu-check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(
        f"gpu_check: {'TINY ' if TINY else ''}on {torch.cuda.get_device_name(0) if on_gpu else 'CPU'}, work in "
        f"{workdir}",
        flush=True,
    )

    tokenizer = make_tokenizer(workdir / "tokenizer")
    model = make_model(workdir / "base")
    block, batch, steps = SIZES["pretrain"]
    data = make_text(workdir / "text", int(block * batch * (steps + 2) * 1.1))
    sft_block, sft_batch, sft_steps = SIZES["sft"]
    conversations = make_conversations(workdir / "conversations.json", sft_batch * (sft_steps + 2), sft_block)
    print(f"gpu_check: assets ready in {time.perf_counter() - started:.0f}s", flush=True)

    common = [
        "--do_train",
        "--model_name_or_path",
        str(model),
        "--tokenizer_name_or_path",
        str(tokenizer),
        "--report_to",
        "none",
        "--logging_steps",
        "1",
        "--disable_tqdm",
        "True",
        "--gradient_checkpointing",
        "True",
        "--overwrite_output_dir",
    ]
    pretrain = launch(
        "pretrain",
        [
            *common,
            "--deepspeed",
            str(REPO / "configs" / "ds_zero2_no_offload.json"),
            "--fp16",
            "--torch_dtype",
            "float16",
            "--dataset_dir",
            str(data),
            "--data_cache_dir",
            str(workdir / "cache"),
            "--output_dir",
            str(workdir / "pt_out"),
            "--validation_split_percentage",
            "0.001",
            "--block_size",
            str(block),
            "--per_device_train_batch_size",
            str(batch),
            "--gradient_accumulation_steps",
            "1",
            "--max_steps",
            str(steps),
            "--learning_rate",
            "2e-4",
            "--lr_scheduler_type",
            "cosine",
            "--warmup_ratio",
            "0.05",
            "--weight_decay",
            "0.01",
            "--save_steps",
            "100000",
            "--seed",
            "42",
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
            "--ddp_find_unused_parameters",
            "False",
        ],
        workdir,
    )
    sft = launch(
        "sft",
        [
            *common,
            "--data_path",
            str(conversations),
            "--output_dir",
            str(workdir / "sft_out"),
            "--fsdp",
            "full_shard auto_wrap",
            "--fsdp_transformer_layer_cls_to_wrap",
            "LlamaDecoderLayer",
            "--bf16",
            "True",
            "--tf32",
            "True",
            "--model_max_length",
            str(sft_block),
            "--per_device_train_batch_size",
            str(sft_batch),
            "--max_steps",
            str(sft_steps),
            "--learning_rate",
            "2e-5",
            "--weight_decay",
            "0.",
            "--warmup_ratio",
            "0.03",
            "--lr_scheduler_type",
            "cosine",
            "--save_strategy",
            "no",
            "--lazy_preprocess",
            "True",
            "--include_num_input_tokens_seen",
            "True",
        ],
        workdir,
    )

    print(
        f"\n{'run':<44} {'engine':<28} {'tokens/s':>9} {'peak GPU GiB':>12} {'MFU':>6} {'last loss':>9} {'wall s':>7}"
    )
    problems = []
    for label, record in (
        ("pretrain: ZeRO-2 fp16 LoRA+embeddings, block " + str(block), pretrain),
        ("sft: FSDP full_shard bf16 full fine-tune, " + str(sft_block), sft),
    ):
        value = mfu(record)
        memory = f"{record['peak_gpu_memory_gib']:.1f}" if record["peak_gpu_memory_gib"] is not None else "n/a"
        tps = f"{record['tokens_per_second']:.0f}" if record["tokens_per_second"] else "n/a"
        print(
            f"{label:<44} {record['engine']:<28} {tps:>9} {memory:>12} "
            f"{(f'{100 * value:.1f}%' if value else 'n/a'):>6} {record['losses'][-1]:>9.4f} "
            f"{record['wall_seconds']:>7.0f}"
        )
        problems += [f"{record['command']}: {p}" for p in check(record, on_gpu)]
    shape = TINY_MODEL if TINY else MODEL
    print(
        f"(model: {matmul_parameters(shape, TOKENIZER_SIZE) / 1e9:.2f}B matmul weights, {shape['num_hidden_layers']} "
        f"layers, hidden {shape['hidden_size']}; tokens/s over steps {WARM_STEPS + 2}..end; total "
        f"{time.perf_counter() - started:.0f}s)"
    )
    if problems:
        raise SystemExit("gpu_check: FAILED: " + "; ".join(problems))
    print("gpu_check: OK", flush=True)


if __name__ == "__main__":
    main()
