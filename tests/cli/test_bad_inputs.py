"""The bad-input catalogue: every command, run as a user runs it (`python -m zhtrain <cmd> ...`).

Each case asserts: exit code 2; stderr is exactly one line, `zhtrain: error: ...`, naming the
input and the fix; no traceback; nothing partial left where the output would go.

Start-up (torch + transformers imports) costs seconds of CPU per process, so the cases run in
processes forked from one warm interpreter (the `cli` fixture, tests/workers/cli_forkserver.py: the
same entry point, own cwd, stdout/stderr and exit status), and one case per command in a fresh
`python -m zhtrain`. All are started when the module's first test asks for them; each test then
checks its own. A case may also give the exact line.

Unwritable folders: root ignores permissions, so "cannot write here" is a path under a regular
FILE (`<tmp>/a_file/out`), which fails for every user. A full disk is a 1 MB tmpfs (skipped
where `mount` is not allowed).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest
from helpers import ALPACA_ONE, make_adapter, make_text_dir, make_tiny_llama, subprocess_env, write, zh

ENV = subprocess_env(OMP_NUM_THREADS="1", PYTHONWARNINGS="default")
PLAIN_LORA = dict(targets=["q_proj", "v_proj"], modules_to_save=(), randomize=False)  # PEFT's own init: B = 0


@dataclass
class Case:
    argv: list
    names: list  # what the error line must mention: the input (a path, a flag) ...
    fix: str  # ... and (part of) what to do about it
    untouched: list = field(default_factory=list)  # paths that must not exist afterwards
    exact: Optional[str] = None  # the whole line, where a test pins it


@pytest.fixture(scope="module")
def assets(tmp_path_factory, sp_tokenizer_dir, tiny_model_dir):
    root = tmp_path_factory.mktemp("bad_inputs")
    a = {
        "root": root,
        "model": tiny_model_dir,
        "tok": sp_tokenizer_dir,
        "text": make_text_dir(root / "text", files=1, lines=50),
    }
    a["model32k"] = make_tiny_llama(root / "llama32000", vocab_size=32000)
    a["adapter"] = make_adapter(tiny_model_dir, root / "adapter", **PLAIN_LORA)
    other = make_tiny_llama(root / "other_base", vocab_size=400, seed=1)
    cfg = json.loads((other / "config.json").read_text())
    cfg.update(hidden_size=48, intermediate_size=96)  # a different architecture size
    (root / "wide").mkdir()
    (root / "wide" / "config.json").write_text(json.dumps(cfg))
    a["wide_adapter"] = make_adapter(make_wide(root / "wide"), root / "wide_adapter", **PLAIN_LORA)
    a["file"] = root / "a_file"
    a["file"].write_text("I am a file, not a folder\n")
    return a


def make_wide(folder: Path) -> Path:
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(AutoConfig.from_pretrained(str(folder))).save_pretrained(str(folder))
    return folder


def pretrain(a, d: Path, *extra, data=None, model=None, tokenizer=None):
    return zh(
        "pretrain",
        "--model_name_or_path",
        model or a["model"],
        "--tokenizer_name_or_path",
        tokenizer or a["tok"],
        "--dataset_dir",
        data or a["text"],
        "--data_cache_dir",
        d / "cache",
        "--output_dir",
        d / "out",
        "--block_size",
        "32",
        "--max_steps",
        "1",
        "--do_train",
        "--report_to",
        "none",
        *extra,
    )


def sft(a, d: Path, *extra, data=None):
    return zh(
        "sft",
        "--model_name_or_path",
        a["model"],
        "--tokenizer_name_or_path",
        a["tok"],
        "--data_path",
        data,
        "--output_dir",
        d / "out",
        "--model_max_length",
        "64",
        "--max_steps",
        "1",
        "--report_to",
        "none",
        *extra,
    )


def merge(a, d: Path, *extra, lora=None, base=None):
    return zh(
        "merge",
        "--base_model",
        base or a["model"],
        "--lora_model",
        lora or a["adapter"],
        "--output_dir",
        d / "merged",
        *extra,
    )


CASES = {
    # The CLI itself and config files
    "unknown-command": lambda a, d: Case(zh("pretrian"), ["'pretrian'"], "choose one of: pretrain"),
    "unknown-flag": lambda a, d: Case(
        pretrain(a, d, "--lora_rnak", "8"), ["--lora_rnak"], "--help", [d / "out", d / "cache"]
    ),
    "bad-flag-value": lambda a, d: Case(
        pretrain(a, d, "--max_steps", "ten"), ["--max_steps", "'ten'"], "--help", [d / "out"]
    ),
    "config-missing": lambda a, d: Case(zh("pretrain", d / "run.yaml"), [str(d / "run.yaml")], "check the path"),
    "config-malformed-yaml": lambda a, d: Case(
        zh("pretrain", write(d / "run.yaml", "max_steps: [3\nlora_rank: 8\n")),
        [str(d / "run.yaml"), "line 2"],
        "fix the file",
    ),
    "config-binary": lambda a, d: Case(
        zh("pretrain", write(d / "run.json", b"\x89PNG\r\n\x1a\n\x00\x00")),
        [str(d / "run.json"), "byte 0"],
        "save the config file as UTF-8",
    ),
    "config-unknown-key": lambda a, d: Case(
        zh("pretrain", write(d / "run.yaml", "learning_rte: 1e-4\n")),
        [str(d / "run.yaml"), "'learning_rte'"],
        "did you mean learning_rate",
    ),
    # pretrain: paths, data files, vocabularies, flags, output folders
    "pretrain-model-missing": lambda a, d: Case(
        pretrain(a, d, model=d / "nope"),
        ["--model_name_or_path", str(d / "nope")],
        "pass a local model",
        [d / "out", d / "cache"],
    ),
    "pretrain-model-is-an-adapter": lambda a, d: Case(
        pretrain(a, d, model=a["adapter"]), [str(a["adapter"])], "config.json", [d / "out", d / "cache"]
    ),
    "pretrain-model-config-corrupt": lambda a, d: Case(
        pretrain(a, d, model=corrupt_model(a, d)), [str(d / "model")], "config.json", [d / "out", d / "cache"]
    ),
    "pretrain-dataset-dir-missing": lambda a, d: Case(
        pretrain(a, d, data=d / "nodata"),
        ["--dataset_dir", str(d / "nodata")],
        "pass a folder of *.txt files",
        [d / "out"],
        exact=f"zhtrain: error: --dataset_dir {d / 'nodata'}: no such folder; pass a folder of *.txt files",
    ),
    "pretrain-no-txt-files": lambda a, d: Case(
        pretrain(a, d, data=write(d / "data" / "notes.md", "text").parent),
        [str(d / "data")],
        "no *.txt files",
        [d / "out"],
    ),
    "pretrain-all-files-empty": lambda a, d: Case(
        pretrain(a, d, data=write(d / "data" / "a.txt", "\n\n  \n").parent),
        [str(d / "data")],
        "add UTF-8 text",
        [d / "out"],
    ),
    "pretrain-not-utf8": lambda a, d: Case(
        pretrain(
            a, d, data=write(d / "data" / "gbk.txt", "第一行\n".encode("utf-8") + "中文".encode("gbk") + b"\n").parent
        ),
        [str(d / "data" / "gbk.txt"), "byte 10", "line 2"],
        "iconv -f GB18030 -t UTF-8",
        [d / "out"],
    ),
    "pretrain-binary-txt": lambda a, d: Case(
        pretrain(a, d, data=write(d / "data" / "model.txt", b"PK\x03\x04\x00\x00binary").parent),
        [str(d / "data" / "model.txt"), "NUL byte"],
        "remove it from the input",
        [d / "out"],
    ),
    "pretrain-vocab-mismatch": lambda a, d: Case(
        pretrain(a, d, model=a["model32k"]),
        ["model vocabulary 32000", "tokenizer of 400 tokens"],
        "Use the matching tokenizer",
        [d / "out", d / "cache"],
    ),
    "pretrain-tokenizer-missing": lambda a, d: Case(
        pretrain(a, d, tokenizer=d / "tok"),
        [str(d / "tok")],
        "tokenizer.json or tokenizer.model",
        [d / "out", d / "cache"],
    ),
    "pretrain-tokenizer-config-not-an-object": lambda a, d: Case(
        pretrain(a, d, tokenizer=tokenizer_with_config(a, d, "[1]")),
        [str(d / "tok" / "tokenizer_config.json")],
        "restore the file",
        [d / "out", d / "cache"],
    ),
    "pretrain-tokenizer-model-damaged": lambda a, d: Case(
        pretrain(a, d, tokenizer=damaged_sp_tokenizer(a, d)),
        [str(d / "tok" / "tokenizer.model"), "not a SentencePiece model"],
        "restore the file",
        [d / "out", d / "cache"],
    ),
    "pretrain-block-size-too-large": lambda a, d: Case(
        pretrain(a, d, "--block_size", "4096"),
        ["--block_size 4096", "256 positions"],
        "use --block_size 256 or less",
        [d / "out", d / "cache"],
    ),
    "pretrain-split-is-a-percent": lambda a, d: Case(
        pretrain(a, d, "--validation_split_percentage", "5"),
        ["--validation_split_percentage 5"],
        "must be a fraction",
        [d / "out", d / "cache"],
    ),
    "pretrain-unknown-module": lambda a, d: Case(
        pretrain(a, d, "--trainable", "q_proj,qkv_proj"),
        ["--trainable", "'qkv_proj'"],
        "choose from",
        [d / "out" / "pt_lora_model"],
    ),
    "pretrain-conflicting-stage-flags": lambda a, d: Case(
        pretrain(a, d, "--train_new_rows_only"),
        ["--train_new_rows_only"],
        "--training_stage embeddings",
        [d / "out", d / "cache"],
    ),
    "pretrain-output-under-a-file": lambda a, d: Case(
        pretrain(a, d, "--output_dir", a["file"] / "out"),
        ["--output_dir", str(a["file"])],
        "choose another path",
        [d / "cache"],
    ),
    "pretrain-cache-under-a-file": lambda a, d: Case(
        pretrain(a, d, "--data_cache_dir", a["file"] / "cache"),
        ["--data_cache_dir", str(a["file"])],
        "choose another path",
        [d / "out"],
    ),
    "pretrain-deepspeed-config-missing": lambda a, d: Case(
        pretrain(a, d, "--deepspeed", d / "ds.json"),
        ["--deepspeed", str(d / "ds.json")],
        "shipped configs",
        [d / "out"],
    ),
    "pretrain-resume-missing": lambda a, d: Case(
        pretrain(a, d, "--resume_from_checkpoint", d / "checkpoint-9"),
        [str(d / "checkpoint-9")],
        "pass a checkpoint-N folder",
    ),
    "pretrain-peft-path-in-an-output-checkpoint": lambda a, d: Case(
        pretrain(a, d, "--peft_path", copy_folder(a["adapter"], d / "out" / "checkpoint-2" / "pt_lora_model")),
        ["--output_dir", "holds --peft_path"],
        "choose another path",
        [d / "cache"],
    ),
    "pretrain-peft-path-is-the-runs-own-adapter": lambda a, d: Case(
        pretrain(a, d, "--peft_path", copy_folder(a["adapter"], d / "out" / "pt_lora_model")),
        ["--output_dir", "the run's adapter", "is also --peft_path"],
        "choose another path",
        [d / "cache"],
    ),
    "pretrain-lora-dropout-not-a-probability": lambda a, d: Case(
        pretrain(a, d, "--lora_dropout", "1.5"), ["--lora_dropout 1.5"], "0 <= p < 1", [d / "out", d / "cache"]
    ),
    "pretrain-batch-size-zero": lambda a, d: Case(
        pretrain(a, d, "--per_device_train_batch_size", "0"),
        ["--per_device_train_batch_size 0"],
        "must be at least 1",
        [d / "out", d / "cache"],
    ),
    "pretrain-config-overrides-typo": lambda a, d: Case(
        pretrain(a, d, "--config_overrides", "rope_thta=2"),
        ["--config_overrides", "rope_thta"],
        "key=value",
        [d / "out", d / "cache"],
    ),
    "pretrain-model-weights-cut-short": lambda a, d: Case(
        pretrain(a, d, model=cut_model(a, d)),
        [str(d / "model" / "model.safetensors")],
        "copy the model again",
        [d / "out", d / "cache"],
    ),
    "pretrain-eval-without-validation-blocks": lambda a, d: Case(
        pretrain(a, d, "--do_eval", "--validation_split_percentage", "0"),
        ["--do_eval"],
        "above 0",
        [d / "out", d / "cache"],
    ),
    "pretrain-peft-path-not-an-adapter": lambda a, d: Case(
        pretrain(a, d, "--peft_path", a["text"]),
        ["--peft_path", str(a["text"])],
        "pass a LoRA adapter folder",
        [d / "out" / "pt_lora_model"],
    ),
    # sft
    "sft-train-mem-alias-empty-value": lambda a, d: Case(
        zh(
            "train_mem",
            "--model_name_or_path",
            a["model"],
            "--tokenizer_name_or_path",
            a["tok"],
            "--data_path",
            write(
                d / "bad.json",
                '[\n{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": ""}]}\n]',
            ),
            "--output_dir",
            d / "out",
            "--model_max_length",
            "64",
        ),
        [str(d / "bad.json")],
        "remove the message or the record",
        [d / "out"],
        exact=f"zhtrain: error: {d / 'bad.json'}: line 2 (record 1), message 2: 'value' is empty; "
        "remove the message or the record, "
        "or fill it in",
    ),
    "sft-data-missing": lambda a, d: Case(
        sft(a, d, data=d / "train.json"), ["--data_path", str(d / "train.json")], "pass a JSON/JSONL file", [d / "out"]
    ),
    "sft-data-malformed-json": lambda a, d: Case(
        sft(a, d, data=write(d / "train.json", '[{"conversations": [}]')),
        [str(d / "train.json"), "line 1"],
        "fix the file",
        [d / "out"],
    ),
    "sft-data-wrong-shape": lambda a, d: Case(
        sft(a, d, data=write(d / "train.json", json.dumps([{"conversations": [{"who": "human", "text": "hi"}]}]))),
        [str(d / "train.json"), "record 1"],
        "use one of human, user, gpt, assistant",
        [d / "out"],
    ),
    "sft-unknown-template": lambda a, d: Case(
        sft(
            a,
            d,
            "--template",
            "vicuna_v9",
            data=write(d / "train.json", json.dumps([{"instruction": "hi", "output": "ok"}])),
        ),
        ["--template vicuna_v9"],
        "choose one of vicuna_v1.1",
        [d / "out"],
    ),
    "sft-output-is-the-model": lambda a, d: Case(
        zh(
            "sft",
            "--model_name_or_path",
            copy_folder(a["model"], d / "model"),
            "--tokenizer_name_or_path",
            a["tok"],
            "--data_path",
            write(d / "train.json", ALPACA_ONE),
            "--output_dir",
            d / "model",
            "--model_max_length",
            "64",
            "--max_steps",
            "1",
            "--report_to",
            "none",
        ),
        ["--output_dir", str(d / "model"), "is also --model_name_or_path"],
        "choose another path",
        [d / "model" / "model.safetensors.index.json"],
    ),
    "sft-preprocessed-output-is-the-data": lambda a, d: Case(
        sft(
            a,
            d,
            "--preprocess_only",
            "--preprocessed_output",
            d / "train.json",
            data=write(d / "train.json", ALPACA_ONE),
        ),
        ["--preprocessed_output", str(d / "train.json"), "is also a data file"],
        "choose another path",
        [d / "out"],
    ),
    "sft-preprocessed-output-without-preprocess-only": lambda a, d: Case(
        sft(a, d, "--preprocessed_output", d / "enc.jsonl", data=write(d / "train.json", ALPACA_ONE)),
        ["--preprocessed_output"],
        "add it, or drop --preprocessed_output",
        [d / "out", d / "enc.jsonl"],
    ),
    "sft-data-listed-twice": lambda a, d: Case(
        sft(a, d, data=f"{write(d / 'train.json', ALPACA_ONE)},{d / 'train.json'}"),
        ["--data_path", "given twice"],
        "list each once",
        [d / "out"],
    ),
    "sft-lora-rank-zero": lambda a, d: Case(
        sft(a, d, "--lora_rank", "0", data=write(d / "train.json", ALPACA_ONE)),
        ["--lora_rank 0"],
        "must be at least 1",
        [d / "out"],
    ),
    "sft-max-train-samples-negative": lambda a, d: Case(
        sft(a, d, "--max_train_samples", "-1", data=write(d / "train.json", ALPACA_ONE)),
        ["--max_train_samples -1"],
        "must be at least 1",
        [d / "out"],
    ),
    "sft-peft-path-cut-short": lambda a, d: Case(
        sft(a, d, "--peft_path", truncated_adapter(a, d), data=write(d / "train.json", ALPACA_ONE)),
        [str(d / "cut" / "adapter_model.safetensors")],
        "copy it again",
        [d / "out" / "sft_lora_model"],
    ),
    # merge
    "merge-output-holds-an-input": lambda a, d: Case(
        zh(
            "merge",
            "--base_model",
            copy_folder(a["model"], d / "proj" / "base"),
            "--lora_model",
            a["adapter"],
            "--output_dir",
            d / "proj",
            "--overwrite",
        ),
        ["--output_dir", str(d / "proj"), "holds --base_model"],
        "choose another path",
        [d / "proj" / "zhtrain_merge.json"],
    ),
    "merge-adapter-given-twice": lambda a, d: Case(
        merge(a, d, lora=f"{a['adapter']},{a['adapter']}"),
        ["--lora_model", "given twice"],
        "list each once",
        [d / "merged"],
    ),
    "merge-base-missing": lambda a, d: Case(
        merge(a, d, base=d / "nobase"), ["--base_model", str(d / "nobase")], "pass a model folder", [d / "merged"]
    ),
    "merge-adapter-missing-config": lambda a, d: Case(
        merge(a, d, lora=write(d / "ad" / "adapter_model.safetensors", b"junk").parent),
        [str(d / "ad"), "no adapter_config.json"],
        "copy the one written with the adapter",
        [d / "merged"],
    ),
    "merge-adapter-for-another-base": lambda a, d: Case(
        merge(a, d, lora=a["wide_adapter"]),
        [str(a["wide_adapter"]), "[32, 48]", "[32, 32]"],
        "merge it into that one",
        [d / "merged"],
    ),
    "merge-conflicting-flags": lambda a, d: Case(
        merge(a, d, "--num_shards", "2"), ["--num_shards 2"], "--output_type pth", [d / "merged"]
    ),
    "merge-output-under-a-file": lambda a, d: Case(
        zh("merge", "--base_model", a["model"], "--lora_model", a["adapter"], "--output_dir", a["file"] / "merged"),
        ["--output_dir", str(a["file"])],
        "choose another path",
    ),
    "merge-malicious-adapter-bin": lambda a, d: Case(
        merge(a, d, lora=pickled_adapter(a, d)),
        [str(d / "evil" / "adapter_model.bin"), "would call posix.system"],
        "Use safetensors weights",
        [d / "merged", d / "PWNED"],
    ),
    # export, generate, tokenizer
    "export-unknown-format": lambda a, d: Case(zh("export", "onnx", a["model"]), ["onnx"], "choose: gguf"),
    "export-an-adapter": lambda a, d: Case(
        zh("export", "gguf", a["adapter"]), [str(a["adapter"])], "merge", [a["adapter"] / "ggml-model-f16.gguf"]
    ),
    "generate-data-file-not-utf8": lambda a, d: Case(
        zh(
            "generate",
            "--base_model",
            a["model"],
            "--data_file",
            write(d / "in.txt", "问题".encode("gbk")),
            "--predictions_file",
            d / "p.json",
        ),
        ["--data_file", str(d / "in.txt")],
        "UTF-8",
        [d / "p.json"],
    ),
    "generate-adapter-for-another-base": lambda a, d: Case(
        zh(
            "generate",
            "--base_model",
            a["model"],
            "--tokenizer_path",
            a["tok"],
            "--lora_model",
            a["wide_adapter"],
            "--data_file",
            write(d / "in.txt", "你好\n"),
            "--predictions_file",
            d / "p.json",
        ),
        [str(a["wide_adapter"]), "[32, 48]", "[32, 32]"],
        "the adapter was trained for another base model",
        [d / "p.json"],
    ),
    "generate-predictions-file-is-the-data-file": lambda a, d: Case(
        zh(
            "generate",
            "--base_model",
            a["model"],
            "--data_file",
            write(d / "in.txt", "你好\n"),
            "--predictions_file",
            d / "in.txt",
        ),
        ["--predictions_file", str(d / "in.txt"), "is also --data_file"],
        "choose another path",
    ),
    "generate-temperature-zero": lambda a, d: Case(
        zh("generate", "--base_model", a["model"], "--temperature", "0", "--predictions_file", d / "p.json"),
        ["--temperature 0.0"],
        "--no-do_sample",
        [d / "p.json"],
    ),
    "generate-prompt-longer-than-the-context": lambda a, d: Case(
        zh(
            "generate",
            "--base_model",
            a["model"],
            "--tokenizer_path",
            a["tok"],
            "--data_file",
            write(d / "in.txt", "短\n" + "长" * 600 + "\n"),
            "--predictions_file",
            d / "p.json",
            "--max_new_tokens",
            "2",
        ),
        [str(d / "in.txt"), "instruction 2", "256 positions"],
        "--alpha",
        [d / "p.json"],
    ),
    "tokenizer-extend-output-is-the-input": lambda a, d: Case(
        zh(
            "tokenizer",
            "extend",
            "--tokenizer_name_or_path",
            copy_folder(a["tok"], d / "tok"),
            "--new_tokens",
            "黄河入海",
            "--output_dir",
            d / "tok",
            "--overwrite",
        ),
        ["--output_dir", "is also --tokenizer_name_or_path"],
        "choose another path",
    ),
    "tokenizer-train-output-holds-the-corpus": lambda a, d: Case(
        zh("tokenizer", "train", "--corpus", copy_folder(a["text"], d / "corpus"), "--output_dir", d, "--overwrite"),
        ["--output_dir", "holds --corpus"],
        "choose another path",
    ),
    "tokenizer-train-output-under-a-file": lambda a, d: Case(
        zh("tokenizer", "train", "--corpus", a["text"], "--output_dir", a["file"] / "sp"),
        ["--output_dir", str(a["file"])],
        "choose another path",
    ),
    "tokenizer-train-coverage-too-low": lambda a, d: Case(
        zh("tokenizer", "train", "--corpus", a["text"], "--output_dir", d / "sp", "--character_coverage", "0.95"),
        ["--character_coverage 0.95"],
        "0.98 to 1",
        [d / "sp"],
    ),
    "tokenizer-extend-tokens-file-missing": lambda a, d: Case(
        zh(
            "tokenizer",
            "extend",
            "--tokenizer_name_or_path",
            a["tok"],
            "--new_tokens",
            d / "my_tokens.txt",
            "--output_dir",
            d / "ext",
        ),
        ["--new_tokens", str(d / "my_tokens.txt")],
        "no such file",
        [d / "ext"],
    ),
    "tokenizer-extend-zero-tokens": lambda a, d: Case(
        zh(
            "tokenizer",
            "extend",
            "--tokenizer_name_or_path",
            a["tok"],
            "--corpus",
            a["text"],
            "--num_new_tokens",
            "0",
            "--output_dir",
            d / "ext",
        ),
        ["--num_new_tokens 0"],
        "must be at least 1",
        [d / "ext"],
    ),
    "inspect-unknown-module": lambda a, d: Case(
        zh("inspect", "--model_name_or_path", a["model"], "--tokenizer_name_or_path", a["tok"], "--trainable", "q_prj"),
        ["--trainable", "'q_prj'"],
        "choose from",
    ),
    "inspect-not-a-causal-lm": lambda a, d: Case(
        zh(
            "inspect",
            "--model_name_or_path",
            write(d / "t5" / "config.json", '{"model_type": "t5"}').parent,
            "--tokenizer_name_or_path",
            a["tok"],
        ),
        [str(d / "t5"), "not a causal language model"],
        "pass a decoder-only",
    ),
    "tokenizer-corpus-missing": lambda a, d: Case(
        zh("tokenizer", "train", "--corpus", d / "corpus.txt", "--output_dir", d / "sp"),
        ["--corpus", str(d / "corpus.txt")],
        "pass UTF-8 text files",
        [d / "sp"],
    ),
    "tokenizer-merge-corrupt-model": lambda a, d: Case(
        zh(
            "tokenizer",
            "merge",
            "--llama_tokenizer_dir",
            a["tok"],
            "--chinese_sp_model_file",
            write(d / "zh.model", b"not a model"),
            "--output_dir",
            d / "merged_tok",
        ),
        ["--chinese_sp_model_file", str(d / "zh.model"), "not a SentencePiece model file"],
        "pass the .model that sentencepiece wrote",
        [d / "merged_tok"],
    ),
}


def copy_folder(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    return dest


def tokenizer_with_config(a, d: Path, config_text: str) -> Path:
    folder = copy_folder(a["tok"], d / "tok")
    (folder / "tokenizer_config.json").write_text(config_text)
    return folder


def damaged_sp_tokenizer(a, d: Path) -> Path:
    """A SentencePiece-only tokenizer folder whose tokenizer.model is not a model."""
    folder = copy_folder(a["tok"], d / "tok")
    (folder / "tokenizer.json").unlink(missing_ok=True)
    (folder / "tokenizer.model").write_bytes(b"not a model " * 10)
    return folder


def cut_model(a, d: Path) -> Path:
    """The model folder with its weights cut short (an interrupted copy)."""
    folder = copy_folder(a["model"], d / "model")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    return folder


def truncated_adapter(a, d: Path) -> Path:
    """The adapter folder with its weights cut short (an interrupted copy)."""
    folder = copy_folder(a["adapter"], d / "cut")
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    return folder


def corrupt_model(a, d: Path) -> Path:
    shutil.copytree(a["model"], d / "model")
    (d / "model" / "config.json").write_text('{"model_type": "llama", "vocab_size": 400,')
    return d / "model"


def pickled_adapter(a, d: Path) -> Path:
    """An adapter folder whose adapter_model.bin would run `touch PWNED` when unpickled."""
    import torch

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {d / 'PWNED'}",))

    shutil.copytree(a["adapter"], d / "evil")
    (d / "evil" / "adapter_model.safetensors").unlink()
    torch.save(
        {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": Payload()}, d / "evil" / "adapter_model.bin"
    )
    return d / "evil"


FRESH_PROCESS = {
    "unknown-command",
    "config-missing",
    "pretrain-dataset-dir-missing",
    "sft-data-missing",
    "merge-base-missing",
    "export-an-adapter",
    "generate-data-file-not-utf8",
    "tokenizer-corpus-missing",
}


@pytest.fixture(scope="module")
def results(assets, cli):
    """Run every case at once; returns name -> (case, folder, CompletedProcess)."""
    cases = {}
    for name, build in CASES.items():
        folder = assets["root"] / "cases" / name
        folder.mkdir(parents=True)
        cases[name] = (build(assets, folder), folder)
    jobs = {
        name: cli.submit(case.argv[3:], folder, ENV)
        for name, (case, folder) in cases.items()
        if name not in FRESH_PROCESS
    }

    def fresh(name):
        case, folder = cases[name]
        return name, subprocess.run(case.argv, capture_output=True, text=True, timeout=600, env=ENV, cwd=folder)

    with ThreadPoolExecutor(1) as pool:
        done = dict(pool.map(fresh, sorted(FRESH_PROCESS & set(cases))))
    done.update({name: cli.wait(job) for name, job in jobs.items()})
    return {name: (cases[name][0], cases[name][1], done[name]) for name in cases}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(results, name):
    case, folder, proc = results[name]
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1 and lines[0].startswith("zhtrain: error: "), "stderr is not one error line:\n" + proc.stderr
    for needed in case.names:
        assert needed in lines[0], f"the error does not name {needed!r}: {lines[0]}"
    assert case.fix in lines[0], f"the error does not say {case.fix!r}: {lines[0]}"
    if case.exact is not None:
        assert lines[0] == case.exact
    for path in case.untouched:
        assert not Path(path).exists(), f"{path} was written"
    leftovers = [p for p in folder.rglob("*") if ".tmp-" in p.name]
    assert not leftovers, f"temp files left behind: {leftovers}"


def test_catalogue_size():
    assert len(CASES) >= 25
    commands = {case.split("-")[0] for case in CASES}
    assert {"pretrain", "sft", "merge", "export", "generate", "tokenizer", "config"} <= commands


@pytest.fixture
def tiny_disk(tmp_path):
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(
            f"cannot mount a small tmpfs here ({proc.stderr.strip() or 'mount failed'}): full-disk case not run"
        )
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=False)


def test_full_output_disk(tiny_disk, tmp_path, assets, cli):
    out = tiny_disk / "out"
    argv = pretrain(
        assets, tmp_path, "--output_dir", out, "--max_steps", "4", "--save_steps", "2", "--disable_tqdm", "True"
    )
    proc = cli.run(argv[3:], cwd=tmp_path, env=ENV)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert (
        last.startswith(f"zhtrain: error: --output_dir {out}: the disk is full") and "free space and run again" in last
    ), last
    from zhtrain.training.checkpoints import list_checkpoints

    assert not any(ok for _, _, ok in list_checkpoints(out)), (
        "a checkpoint written on a full disk must not count as complete"
    )
