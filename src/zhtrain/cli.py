"""`zhtrain <command> [flags]`: parsing of the command name only; each command owns its flags."""

from __future__ import annotations

import importlib
import sys

from zhtrain.errors import run_command

# command -> (module, one-line help). Modules are imported lazily so `zhtrain --help` is instant.
COMMANDS: dict[str, tuple[str, str]] = {
    "pretrain": ("zhtrain.pretrain", "continued pre-training with LoRA (+ trained embeddings): run_clm_pt_with_peft.py"),
    "run_clm_pt_with_peft": ("zhtrain.pretrain", "alias of pretrain (the seed's script name)"),
    "sft": ("zhtrain.sft", "supervised fine-tuning, LoRA or full (FSDP): run_clm_sft_with_peft.py / FastChat train.py"),
    "train_mem": ("zhtrain.sft", "alias of sft (FastChat's train_mem.py; attention via --attn_implementation)"),
    "merge": ("zhtrain.merge", "fold LoRA adapters into the base, shard by shard, verified: merge_llama_with_chinese_lora.py"),
    "export": ("zhtrain.export", "export a merged model: `zhtrain export gguf` (llama.cpp's converter)"),
    "generate": ("zhtrain.generate", "generate from a model (+ adapters), file or interactive: inference_hf.py"),
    "tokenizer": ("zhtrain.tokenizer", "train a Chinese SentencePiece model, merge it into LLaMA's, or extend a BPE tokenizer"),
    "inspect": ("zhtrain.inspect_cmd", "which vocabulary mode applies, tokens per character, what a LoRA run would train"),
    "launch": ("zhtrain.launch", "torchrun with fail-fast rendezvous checks and a one-line failure summary: zhtrain launch [torchrun flags] <command> ..."),
    "demo": ("zhtrain.demo", "the main job on a real model and real Chinese text, end to end"),
}


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: zhtrain <command> [config.yaml] [--flag value ...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "`zhtrain <command> --help` lists a command's flags."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    if argv[0] in ("-V", "--version"):
        from zhtrain import __version__

        print(__version__)
        return
    name = argv.pop(0)
    if name not in COMMANDS:
        print(f"zhtrain: error: unknown command {name!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(2)
    module = importlib.import_module(COMMANDS[name][0])
    run_command(module.main, argv)
