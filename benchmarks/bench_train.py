"""P3 / P4: pre-training throughput and peak memory against the seed's training recipe.

Model: LLaMA, 4 layers, hidden 256, vocabulary 49953 (the LLaMA+Chinese tokenizer), random init
saved once; LoRA r 8 / alpha 32 / dropout 0.05 on all seven projections and embed_tokens + lm_head
trained in full (`modules_to_save`), block 512, batch 1, the seed's run_pt.sh optimiser settings
(lr 2e-4, cosine, warmup 0.05, weight decay 0.01, gradient checkpointing).

  baseline  the seed's run_clm_pt_with_peft.py training: `LlamaForCausalLM.from_pretrained`,
            `get_peft_model(LoraConfig(..., modules_to_save=...))`, the plain HF `Trainer` with
            `default_data_collator`; the loss is the model's own (full `block x vocab` logits)
  zhtrain   `zhtrain pretrain` with the same flags, its defaults: the chunked lm_head loss (no
            block x vocab logits), PEFT's frozen originals of embed_tokens/lm_head sharing the
            trained weights, OMP_WAIT_POLICY=PASSIVE, threads = cores
  baseline-passive  the baseline with OMP_WAIT_POLICY=PASSIVE: separates the thread policy (which
            matters when other work shares the cores) from the rest

Both read the same token blocks (zhtrain's cache of People's Daily text, built once before the
runs) in the same order with the same seed, so their loss curves must agree. Each run is a fresh
child process; runs alternate; tokens/s is steps x 512 / seconds from the first step's start to
the last step's end (zhtrain.training.report.ThroughputCallback in both); peak memory is the child's whole
process, sampled (PSS and RSS). A process that only imports torch/transformers/peft/zhtrain is
measured in each round too: the peak above it is the training's own memory (weights, gradients,
AdamW states, activations, the loss), which is what the two recipes differ in.

    python benchmarks/bench_train.py --steps 30 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ENV, OUT, build_corpus, chinese_llama_tokenizer, gb, median, run_child, write_json  # noqa: E402

BLOCK = 512
SEED = 42
LORA = dict(
    trainable="q_proj,v_proj,k_proj,o_proj,gate_proj,down_proj,up_proj",
    modules_to_save="embed_tokens,lm_head",
    rank=8,
    alpha=32,
    dropout=0.05,
)

BASELINE = r"""
import json, sys
import torch
from peft import LoraConfig, TaskType, get_peft_model
from transformers import LlamaForCausalLM, Trainer, TrainingArguments, default_data_collator, set_seed
from zhtrain.data.text import load_text_blocks
from zhtrain.model import load_tokenizer
from zhtrain.report import ThroughputCallback
model_dir, tokenizer_dir, data_dir, cache, out, steps, seed, lora = sys.argv[1:9]
lora = json.loads(lora)
set_seed(int(seed))
torch.set_num_threads(len(__import__("os").sched_getaffinity(0)))
# The tokenizer as zhtrain loads it, so that both read the same cached blocks (the seed's slow
# LlamaTokenizer ids); tokenizing is not part of this measurement.
tokenizer = load_tokenizer(tokenizer_dir)
# the same blocks as zhtrain
train, _, _ = load_text_blocks(data_dir, tokenizer, 512, cache, 0.001, show_progress=False)
model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)  # --torch_dtype float16: fp32 on CPU
model.resize_token_embeddings(len(tokenizer))
peft_config = LoraConfig(task_type=TaskType.CAUSAL_LM, target_modules=lora["trainable"].split(","),
                         inference_mode=False, r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                         modules_to_save=lora["modules_to_save"].split(","))
model = get_peft_model(model, peft_config)
args = TrainingArguments(output_dir=out, per_device_train_batch_size=1, gradient_accumulation_steps=1,
                         learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0.05, weight_decay=0.01,
                         max_steps=int(steps),
                         logging_steps=1, save_strategy="no", seed=int(seed), gradient_checkpointing=True,
                         gradient_checkpointing_kwargs={"use_reentrant": False}, report_to="none", use_cpu=True,
                         disable_tqdm=True)
timer = ThroughputCallback()
trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=default_data_collator, callbacks=[timer])
trainer.train()
losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
print(json.dumps({"losses": losses, "steps": timer.steps, "seconds": timer.seconds, "trainer": type(trainer).__name__}))
"""

ZHTRAIN = r"""
import json, sys
from zhtrain.pretrain import parse_pretrain_args, pretrain
from zhtrain.report import ThroughputCallback
model_dir, tokenizer_dir, data_dir, cache, out, steps, seed, lora = sys.argv[1:9]
extra = sys.argv[9:]
lora = json.loads(lora)
argv = ["--model_name_or_path", model_dir, "--tokenizer_name_or_path", tokenizer_dir, "--dataset_dir", data_dir,
        "--data_cache_dir", cache, "--output_dir", out, "--overwrite_output_dir", "--block_size", "512",
        "--validation_split_percentage", "0.001", "--per_device_train_batch_size", "1",
        "--gradient_accumulation_steps", "1",
        "--learning_rate", "2e-4", "--lr_scheduler_type", "cosine", "--warmup_ratio", "0.05", "--weight_decay", "0.01",
        "--max_steps", steps, "--logging_steps", "1", "--save_strategy", "no", "--seed", seed,
        "--gradient_checkpointing",
        "--do_train", "--report_to", "none", "--disable_tqdm", "True", "--torch_dtype", "float16",
        "--trainable", lora["trainable"], "--modules_to_save", lora["modules_to_save"],
        "--lora_rank", str(lora["rank"]),
        "--lora_alpha", str(lora["alpha"]), "--lora_dropout", str(lora["dropout"]), *extra]
result = pretrain(*parse_pretrain_args(argv))
trainer = result.trainer
timer = next(c for c in trainer.callback_handler.callbacks if isinstance(c, ThroughputCallback))
losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
print(json.dumps({"losses": losses, "steps": timer.steps, "seconds": timer.seconds, "trainer": type(trainer).__name__}))
"""

IMPORTS_ONLY = r"""
import json, resource
import torch, transformers, peft, zhtrain.pretrain
print(json.dumps({"seconds": 0.0}))
"""


def make_model(dest: Path, vocab: int = 49953) -> Path:
    if (dest / "config.json").is_file():
        return dest
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(dest))
    return dest


def prepare() -> tuple[Path, Path, Path, Path]:
    tokenizer = chinese_llama_tokenizer(OUT / "tokenizer-49953")
    model = make_model(OUT / "model-p3")
    corpus = build_corpus(OUT / "corpus-p3" / "peoples_daily.txt", 3)
    cache = OUT / "cache-p3"
    if not any(cache.glob("*.tokens")):  # build the token cache once, outside the measured runs
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
        from zhtrain.data.text import load_text_blocks
        from zhtrain.tokenizer.loading import load_tokenizer

        load_text_blocks(
            str(corpus.parent), load_tokenizer(str(tokenizer)), BLOCK, str(cache), 0.001, show_progress=False
        )
    return tokenizer, model, corpus.parent, cache


def run_trial(kind: str, paths, steps: int) -> dict:
    tokenizer, model, data, cache = paths
    out = OUT / "scratch-train"
    shutil.rmtree(out, ignore_errors=True)
    code = {
        "baseline": BASELINE,
        "baseline-passive": BASELINE,
        "zhtrain": ZHTRAIN,
        "zhtrain-plain": ZHTRAIN,
        "zhtrain-redraw": ZHTRAIN,
    }[kind]
    extra = {"zhtrain-plain": ["--chunked_loss", "False"], "zhtrain-redraw": ["--keep_dropout_masks", "False"]}.get(
        kind, []
    )
    # zhtrain sets OMP_WAIT_POLICY=PASSIVE for itself; the baseline runs with the user's environment,
    # and baseline-passive with that one setting, to separate the thread policy from the rest.
    env = dict(ENV, OMP_WAIT_POLICY="PASSIVE") if kind == "baseline-passive" else ENV
    try:
        result = run_child(
            code,
            [
                str(model),
                str(tokenizer),
                str(data),
                str(cache),
                str(out),
                str(steps),
                str(SEED),
                json.dumps(LORA),
                *extra,
            ],
            env=env,
        )
    finally:
        shutil.rmtree(out, ignore_errors=True)
    result["tokens_per_s"] = result["steps"] * BLOCK / result["seconds"] if result["seconds"] else float("nan")
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--kinds",
        default="baseline,zhtrain,baseline-passive",
        help="baseline, zhtrain, baseline-passive (the baseline with OMP_WAIT_POLICY=PASSIVE, as zhtrain "
        "sets it); also zhtrain-plain (zhtrain with --chunked_loss False), zhtrain-redraw (--keep_dropout_masks False)",
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    kinds = args.kinds.split(",")
    paths = prepare()
    runs: dict[str, list[dict]] = {kind: [] for kind in kinds}
    imports: list[int] = []
    for r in range(args.repeats):
        imports.append(run_child(IMPORTS_ONLY, [])["peak_pss"])  # shared pages' PSS moves with what else runs
        for kind in kinds if r % 2 == 0 else kinds[::-1]:
            result = run_trial(kind, paths, args.steps)
            runs[kind].append(result)
            print(
                f"  P3 run {r + 1}/{args.repeats} {kind:<16} {result['steps']} steps {result['seconds']:6.1f}s  "
                f"{result['tokens_per_s']:7.0f} tokens/s  peak {gb(result['peak_pss'])} PSS / {gb(result['peak_rss'])} "
                f"RSS  [{result['trainer']}]",
                flush=True,
            )
    report = {
        "steps": args.steps,
        "repeats": args.repeats,
        "imports_only_pss": median(imports),
        "imports_only_runs": imports,
        "kinds": {},
    }
    for kind, rs in runs.items():
        report["kinds"][kind] = {
            "tokens_per_s": median(r["tokens_per_s"] for r in rs),
            "peak_pss": median(r["peak_pss"] for r in rs),
            "peak_rss": median(r["peak_rss"] for r in rs),
            "losses": rs[0]["losses"],
            "trainer": rs[0]["trainer"],
            "runs": rs,
        }
    print_report(report)
    if args.json:
        write_json(Path(args.json), report)
    return report


def max_loss_gap(a: list[float], b: list[float], n: int = 20) -> float:
    return max((abs(x - y) for x, y in zip(a[:n], b[:n])), default=float("nan"))


def print_report(report: dict) -> None:
    """One table, every path beside the baseline: P3 (tokens/s) and P4 (peak PSS, whole process and
    above the import-only process), with the largest loss gap of the first 20 steps."""
    kinds = report["kinds"]
    base = kinds.get("baseline")
    imports = report["imports_only_pss"]
    nan = float("nan")
    print(
        f"\nP3/P4 pre-training, LLaMA 4x256, vocab 49953, LoRA r8 + embed/lm_head trained, block {BLOCK}, "
        f"{report['steps']} steps, median of {report['repeats']}:"
    )
    print(
        f"  {'path':<16} {'tokens/s':>8} {'P3 x base':>9} | {'peak PSS':>8} {'P4 x base':>9} | {'above imports':>13} "
        f"{'x base':>6} | {'peak RSS':>8} | loss gap (first 20 steps)"
    )
    for kind, s in kinds.items():
        speed = s["tokens_per_s"] / base["tokens_per_s"] if base else nan
        memory = s["peak_pss"] / base["peak_pss"] if base else nan
        own = s["peak_pss"] - imports
        own_ratio = own / (base["peak_pss"] - imports) if base else nan
        gap = max_loss_gap(s["losses"], base["losses"]) if base else nan
        print(
            f"  {kind:<16} {s['tokens_per_s']:8.0f} {speed:8.2f}x | {gb(s['peak_pss']):>8} {memory:8.2f}x | "
            f"{gb(own):>13} {own_ratio:5.2f}x | {gb(s['peak_rss']):>8} | {gap:.2e}"
        )
    print(
        f"  (import-only process, torch/transformers/peft/zhtrain: {gb(imports)} PSS; 'above imports' = peak PSS minus "
        "that: the training's own memory)"
    )


if __name__ == "__main__":
    main()
