"""Peak memory and time of `zhtrain merge` against model size and the number of base shards.

For each model size, a random LLaMA-layout model is saved in 1, 2 and 4 safetensors shards, a LoRA
adapter (r 8 on all seven projections + embed_tokens/lm_head in full, the seed's run_pt.sh settings)
is made with PEFT, and each merge runs in a fresh subprocess whose peak resident memory
(VmHWM in /proc/self/status) is read at the end. zhtrain writes output shards as large as the base's
(as the seed's low-memory script keeps the base's layout), plus one run with small output shards
(--small_shard). The same is measured for the seed's non-low-memory
recipe (load the whole model, `PeftModel.from_pretrained`, `merge_and_unload`, `save_pretrained`),
and for a process that only imports the libraries (the baseline every row includes).

    python benchmarks/bench_merge.py                    # models of ~0.3 and ~0.6 GB (fp32)
    python benchmarks/bench_merge.py --layers 4 8 16 --json out.json

Merges run with --no-verify: verification loads the whole model twice by design, which is what
this benchmark must not measure. Numbers are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO / "src"))
MB = 2**20

CHILD_PREAMBLE = """
import json, re, sys, time
import torch, transformers, peft, safetensors, zhtrain.merge  # the baseline: these imported, nothing done
def peak():  # VmHWM: this process's own high-water mark (ru_maxrss would include the parent's at fork)
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
"""
BASELINE = (
    CHILD_PREAMBLE
    + """
print(json.dumps({"seconds": 0.0, "peak": peak()}))
"""
)
ZHTRAIN = (
    CHILD_PREAMBLE
    + """
from zhtrain.merge import merge, parse_merge_args
start = time.perf_counter()
merge(parse_merge_args(["--base_model", sys.argv[1], "--lora_model", sys.argv[2], "--output_dir", sys.argv[3],
                        "--no-verify", "--max_shard_size", sys.argv[4]]))
print(json.dumps({"seconds": time.perf_counter() - start, "peak": peak()}))
"""
)
PEFT_MERGE = (
    CHILD_PREAMBLE
    + """
from peft import PeftModel
from transformers import AutoModelForCausalLM
start = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
model = PeftModel.from_pretrained(model, sys.argv[2]).merge_and_unload()
model.save_pretrained(sys.argv[3])
print(json.dumps({"seconds": time.perf_counter() - start, "peak": peak()}))
"""
)


def make_model(folder: Path, layers: int, hidden: int, vocab: int, shards: list[int]) -> dict[int, Path]:
    """One random model saved with each shard count; returns {shards: folder}."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.75),
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    total = sum(p.numel() * 4 for p in model.parameters())
    out = {}
    for count in shards:
        path = folder / f"base_{count}shard"
        # a shard limit a little above total/count gives exactly `count` shards for these layer-sized tensors
        model.save_pretrained(str(path), max_shard_size=int(total / count * 1.05))
        got = len(list(path.glob("*.safetensors")))
        out[got] = path
    return out


def make_adapter(base: Path, folder: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    targets = ["q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]
    peft_model = get_peft_model(
        model, LoraConfig(target_modules=targets, r=8, lora_alpha=32, modules_to_save=["embed_tokens", "lm_head"])
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    peft_model.save_pretrained(str(folder), save_embedding_layers=False)
    return folder


def shard_size_bytes(text: str) -> int:
    from transformers.utils.hub import convert_file_size_to_int

    return convert_file_size_to_int(text)


def run_child(code: str, *args) -> dict:
    result = subprocess.run([sys.executable, "-c", code, *map(str, args)], env=ENV, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"child failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def dir_size(path: Path, pattern: str = "*.safetensors") -> int:
    return sum(p.stat().st_size for p in path.glob(pattern))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--layers", type=int, nargs="+", default=[4, 10], help="Model sizes, as numbers of layers (hidden 1024)."
    )
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument(
        "--small_shard", default="100MB", help="The extra run's --max_shard_size (default: %(default)s)."
    )
    parser.add_argument("--workdir", default=None, help="Where models go (default: a temporary folder, removed).")
    parser.add_argument("--json", default=None, help="Also write the rows here.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as scratch:
        root = Path(scratch)
        baseline = run_child(BASELINE)["peak"]
        print(
            f"baseline (python + torch + transformers + peft + zhtrain.merge imported): peak RSS {baseline / MB:.0f} "
            "MiB",
            flush=True,
        )
        rows = []
        for layers in args.layers:
            models = make_model(root / f"L{layers}", layers, args.hidden, args.vocab, args.shards)
            adapter = make_adapter(models[min(models)], root / f"L{layers}" / "lora")
            adapter_mb = dir_size(adapter) / MB
            for shards, base in sorted(models.items()):
                # output shards as large as the base's (the seed's low-mem script keeps the base's layout)
                limit = max(p.stat().st_size for p in base.glob("*.safetensors"))
                measured = run_child(ZHTRAIN, base, adapter, root / f"L{layers}" / f"merged_{shards}", limit)
                rows.append(row("zhtrain merge", layers, base, shards, adapter_mb, measured, baseline, limit))
                print_row(rows[-1])
            base = models[min(models)]
            measured = run_child(ZHTRAIN, base, adapter, root / f"L{layers}" / "merged_small", args.small_shard)
            rows.append(
                row(
                    "zhtrain merge",
                    layers,
                    base,
                    min(models),
                    adapter_mb,
                    measured,
                    baseline,
                    shard_size_bytes(args.small_shard),
                )
            )
            print_row(rows[-1])
            out = root / f"L{layers}" / "merged_peft"
            measured = run_child(PEFT_MERGE, models[min(models)], adapter, out)
            rows.append(
                row(
                    "seed recipe: PEFT merge_and_unload",
                    layers,
                    models[min(models)],
                    min(models),
                    adapter_mb,
                    measured,
                    baseline,
                )
            )
            print_row(rows[-1])
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


def row(method, layers, base: Path, shards, adapter_mb, measured, baseline, out_shard=None) -> dict:
    shard_sizes = [p.stat().st_size for p in base.glob("*.safetensors")]
    return {
        "method": method,
        "layers": layers,
        "model_mb": sum(shard_sizes) / MB,
        "shards": shards,
        "max_shard_size_mb": out_shard / MB if out_shard else None,
        "largest_shard_mb": max(shard_sizes) / MB,
        "adapter_mb": adapter_mb,
        "peak_rss_mb": measured["peak"] / MB,
        "above_baseline_mb": (measured["peak"] - baseline) / MB,
        "seconds": measured["seconds"],
    }


def print_row(r: dict) -> None:
    print(
        f"  {r['method']}: {r['model_mb']:.0f} MiB model in {r['shards']} shard(s), output shards <= "
        f"{r['max_shard_size_mb'] or 0:.0f} MiB: peak RSS {r['peak_rss_mb']:.0f} MiB "
        f"({r['above_baseline_mb']:.0f} above baseline), {r['seconds']:.1f}s",
        flush=True,
    )


def print_table(rows: list[dict]) -> None:
    header = (
        "method",
        "model MiB",
        "base shards",
        "largest base shard MiB",
        "--max_shard_size MiB",
        "adapter MiB",
        "peak RSS MiB",
        "above baseline MiB",
        "above baseline / model",
        "time s",
    )
    print("\n| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        out_shard = f"{r['max_shard_size_mb']:.0f}" if r["max_shard_size_mb"] else "-"
        print(
            f"| {r['method']} | {r['model_mb']:.0f} | {r['shards']} | {r['largest_shard_mb']:.0f} | {out_shard} | "
            f"{r['adapter_mb']:.0f} | {r['peak_rss_mb']:.0f} | {r['above_baseline_mb']:.0f} | "
            f"{r['above_baseline_mb'] / r['model_mb']:.2f} | {r['seconds']:.1f} |"
        )


if __name__ == "__main__":
    main()
