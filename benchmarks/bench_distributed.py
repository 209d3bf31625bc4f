"""Tokens/s of LoRA pre-training by engine on this machine, side by side (the seed's run_pt.sh LoRA:
r 8 on the seven projections, embed_tokens + lm_head trained in full), same global batch for all:

  one process   `zhtrain pretrain`, 1 process, per-device batch B x P
  DDP           `torchrun --nproc_per_node P -m zhtrain.pretrain`, batch B each
  ZeRO-2        the same with --deepspeed src/zhtrain/configs/ds_zero2_no_offload.json
  ZeRO-3        the same with --deepspeed src/zhtrain/configs/ds_zero3.json
  FSDP          `torchrun --nproc_per_node P benchmarks/bench_distributed.py --worker`: the HF Trainer
                cannot shard on CPU (accelerate enables FSDP on GPUs only), so this runs zhtrain's own
                pieces (tokenizer, token blocks, model, vocabulary, LoRA, `zhtrain.distributed.sharded.shard`, adapter
                save) with AdamW in a plain loop; "FSDP loop, 1 proc" is that loop unsharded.

The one-process runs go without torchrun, as users run them, once with zhtrain's default threads
(all cores) and once with OMP_NUM_THREADS=1: on a machine that other work shares, OpenMP threads
waiting for busy cores can lose most of their speed, and the ratios use the 1-thread runs.

tokens/s = steps x global batch x block / seconds from the first step's start to the last step's end
(`report.json` of the Trainer runs, the same definition in the loop): start-up is excluded, the
first step's warm-up is not. The losses of all runs are printed too: they should agree.

    python benchmarks/bench_distributed.py                      # P = 2, a ~3.5M-parameter LLaMA
    python benchmarks/bench_distributed.py --modes single,ddp,fsdp --steps 40 --hidden 512

The worker (`--worker`) is also what tests/test_distributed.py runs to prove FSDP2 wrapping and
rank-0 adapter saving over gloo.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = ("single", "single_1t", "ddp", "zero2", "zero3", "fsdp_single", "fsdp")
LABELS = {
    "single": "one process (Trainer)",
    "single_1t": "one process, 1 thread",
    "ddp": "DDP",
    "zero2": "DeepSpeed ZeRO-2",
    "zero3": "DeepSpeed ZeRO-3",
    "fsdp_single": "FSDP loop, 1 proc, 1 thr",
    "fsdp": "FSDP (fully_shard)",
}
LORA = [
    "--trainable",
    "q_proj,v_proj,k_proj,o_proj,gate_proj,down_proj,up_proj",
    "--modules_to_save",
    "embed_tokens,lm_head",
    "--lora_rank",
    "8",
    "--lora_alpha",
    "32",
    "--lora_dropout",
    "0",
]


# ---------------------------------------------------------------------------------------------
# The FSDP worker (runs under torchrun, or alone as the 1-process baseline)


def worker(argv: list[str]) -> None:
    """Train LoRA (+ embeddings) with zhtrain's pieces, sharded with FSDP2 when world size > 1."""
    parser = argparse.ArgumentParser(prog="bench_distributed.py --worker")
    for flag in ("--model", "--tokenizer", "--data", "--cache", "--out"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--block_size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1, help="per process")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)

    import numpy as np
    import torch
    import torch.distributed as dist
    from transformers import default_data_collator, set_seed

    from zhtrain.data.text import load_text_blocks
    from zhtrain.distributed import sharded
    from zhtrain.distributed.sharded import full_trainable_state
    from zhtrain.model.loading import load_base_model, load_config
    from zhtrain.model.lora import apply_lora
    from zhtrain.model.vocab import fit_vocabulary
    from zhtrain.tokenizer.loading import load_tokenizer, sentencepiece_file
    from zhtrain.training.args import LoraArguments, ModelArguments
    from zhtrain.training.checkpoints import save_adapter
    from zhtrain.training.setup import set_cpu_threads

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    threads = set_cpu_threads()
    set_seed(args.seed)
    out = Path(args.out)

    model_args = ModelArguments(model_name_or_path=args.model, tokenizer_name_or_path=args.tokenizer)
    lora_args = LoraArguments(
        trainable=LORA[1], lora_rank=8, lora_alpha=32.0, lora_dropout=0.0, modules_to_save=LORA[3]
    )
    tokenizer = load_tokenizer(args.tokenizer)
    for turn in range(2 if world > 1 else 1):  # rank 0 tokenizes first, the others read its cache
        if (rank == 0) == (turn == 0):
            train_data, _, _ = load_text_blocks(
                args.data, tokenizer, args.block_size, args.cache, 0.05, show_progress=False
            )
        if world > 1:
            dist.barrier()
    model = load_base_model(model_args, load_config(model_args), on_gpu=False)
    fit_vocabulary(model, tokenizer, untie=True)
    model = apply_lora(model, lora_args, gradient_checkpointing=False)
    units = 0
    if world > 1:
        classes = sharded.layer_classes(model)
        sharded.shard(model, classes)
        units = sum(1 for m in model.modules() if isinstance(m, torch.distributed.fsdp.FSDPModule))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)

    # Step k takes blocks order[k*G : (k+1)*G] of one global order; rank r its slice of them.
    order = np.random.default_rng(args.seed).permutation(len(train_data))
    global_batch = args.batch * world
    losses, start = [], 0.0
    for step in range(args.steps):
        if step == 0:
            start = time.perf_counter()
        first = step * global_batch + rank * args.batch
        batch = default_data_collator([train_data[int(i)] for i in order[first : first + args.batch]])
        loss = model(**batch).loss
        loss.backward()  # FSDP2 reduce-scatters the mean gradient, as DDP all-reduces it
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean)
            mean /= world
        losses.append(float(mean))
    seconds = time.perf_counter() - start

    # The trained model's logits on a fixed block (a collective under FSDP), then the adapter:
    # gathered on every rank, written by rank 0 only.
    model.eval()
    with torch.no_grad():
        probe = model(input_ids=train_data[0]["input_ids"][None]).logits
    state = full_trainable_state(model)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_adapter(model, tokenizer, sentencepiece_file(args.tokenizer), out / "pt_lora_model", state)
        torch.save({"input_ids": train_data[0]["input_ids"], "logits": probe}, out / "probe_logits.pt")
        result = {
            "world_size": world,
            "wrapper": type(model).__name__,
            "fsdp_units": units,
            "threads": threads,
            "losses": losses,
            "seconds": seconds,
            "tokens_per_second": args.steps * global_batch * args.block_size / seconds,
        }
        (out / "fsdp_result.json").write_text(json.dumps(result, indent=1))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# The benchmark


def make_assets(root: Path, hidden: int, layers: int) -> tuple[Path, Path, Path]:
    sys.path.insert(0, str(REPO / "tests"))
    from helpers import make_lines, make_sp_tokenizer, make_tiny_llama  # the tests' in-process builders

    tokenizer = make_sp_tokenizer(root / "tokenizer")
    model = root / "model"
    make_tiny_llama(model, vocab_size=400, max_positions=1024)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(model)
    config.update(
        dict(
            hidden_size=hidden,
            intermediate_size=hidden * 8 // 3,
            num_hidden_layers=layers,
            num_attention_heads=max(1, hidden // 64),
            num_key_value_heads=max(1, hidden // 64),
        )
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(model)
    data = root / "data"
    data.mkdir()
    for k in range(2):
        (data / f"part{k}.txt").write_text("\n".join(make_lines(3000, seed=k)) + "\n", encoding="utf-8")
    return model, tokenizer, data


def run(cmd: list[str], log: Path, threads: int | None = None) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO / "src"))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    with open(log, "w") as handle:
        proc = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=log.parent)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:6])} ... failed (exit {proc.returncode}); see {log}")


def measure(mode: str, args, model: Path, tokenizer: Path, data: Path, root: Path) -> dict:
    out = root / f"out-{mode}"
    procs = 1 if mode in ("single", "single_1t", "fsdp_single") else args.procs
    batch = args.batch * (args.procs if procs == 1 else 1)
    threads = 1 if mode in ("single_1t", "fsdp_single") else None  # else zhtrain's default: cores / local processes
    # One process runs as users run it, without torchrun (under torchrun the Trainer would wrap a
    # 1-process DDP around it on CPU).
    launcher = (
        [sys.executable]
        if procs == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(procs),
            "--master_port",
            str(29400 + MODES.index(mode)),
        ]
    )
    if mode.startswith("fsdp"):
        cmd = launcher + [
            __file__,
            "--worker",
            "--model",
            str(model),
            "--tokenizer",
            str(tokenizer),
            "--data",
            str(data),
            "--cache",
            str(root / "cache"),
            "--out",
            str(out),
            "--steps",
            str(args.steps),
            "--block_size",
            str(args.block_size),
            "--batch",
            str(batch),
        ]
        run(cmd, root / f"{mode}.log", threads)
        result = json.loads((out / "fsdp_result.json").read_text())
        return {
            "tokens_per_second": result["tokens_per_second"],
            "loss": result["losses"][-1],
            "engine": result["wrapper"],
            "world": result["world_size"],
        }
    cmd = launcher + [
        "-m",
        "zhtrain.pretrain",
        "--model_name_or_path",
        str(model),
        "--tokenizer_name_or_path",
        str(tokenizer),
        "--dataset_dir",
        str(data),
        "--data_cache_dir",
        str(root / "cache"),
        "--output_dir",
        str(out),
        "--block_size",
        str(args.block_size),
        "--per_device_train_batch_size",
        str(batch),
        "--max_steps",
        str(args.steps),
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
        "100000",
        "--disable_tqdm",
        "True",
        "--validation_split_percentage",
        "0.05",
        "--overwrite_output_dir",
        *LORA,
    ]
    if mode in ("zero2", "zero3"):
        config = "ds_zero2_no_offload.json" if mode == "zero2" else "ds_zero3.json"
        cmd += ["--deepspeed", str(REPO / "configs" / config)]
    run(cmd, root / f"{mode}.log", threads)
    report = json.loads((out / "report.json").read_text())
    state = json.loads((out / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    engine = next(
        (
            line.split("engine ")[1].split(",")[0]
            for line in (root / f"{mode}.log").read_text().splitlines()
            if "trained with engine" in line
        ),
        "?",
    )
    return {
        "tokens_per_second": report["training"]["tokens_per_second"],
        "loss": losses[-1],
        "engine": engine,
        "world": procs,
    }


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        worker(argv[1:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)}")
    parser.add_argument("--procs", type=int, default=2, help="processes of the multi-process modes")
    parser.add_argument("--batch", type=int, default=2, help="per-process batch (the 1-process runs use batch x procs)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")

    with tempfile.TemporaryDirectory(prefix="bench_distributed-") as tmp:
        root = Path(tmp)
        model, tokenizer, data = make_assets(root, args.hidden, args.layers)
        tokens_per_step = args.batch * args.procs * args.block_size
        print(
            f"# LoRA pre-training, hidden {args.hidden}, {args.layers} layers, block {args.block_size}, global batch "
            f"{args.batch * args.procs} ({tokens_per_step} tokens/step), {args.steps} steps, {os.cpu_count()} CPU "
            "cores",
            flush=True,
        )
        results = {}
        for mode in modes:
            started = time.perf_counter()
            results[mode] = measure(mode, args, model, tokenizer, data, root)
            results[mode]["wall_seconds"] = round(time.perf_counter() - started, 1)
            print(f"  measured {mode}: {results[mode]}", flush=True)

    print(f"\n{'mode':<26} {'procs':>5} {'engine':<26} {'tokens/s':>9} {'vs 1 proc':>9} {'last loss':>9} {'wall s':>7}")
    for mode, r in results.items():
        base = results.get("fsdp_single" if mode.startswith("fsdp") else "single_1t")
        ratio = f"{r['tokens_per_second'] / base['tokens_per_second']:.2f}x" if base else "-"
        print(
            f"{LABELS[mode]:<26} {r['world']:>5} {r['engine']:<26} {r['tokens_per_second']:>9.0f} {ratio:>9} "
            f"{r['loss']:>9.4f} {r['wall_seconds']:>7}"
        )
    print(
        "(ratios: FSDP against the same loop in one process, the others against `zhtrain pretrain` in one process,\n"
        " both with 1 thread; the default-thread row shows what OpenMP does when other work shares the cores)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
