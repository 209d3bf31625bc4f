"""How well do new embedding rows start? subword_mean vs mean vs random, in bits per character.

On SmolLM2-135M-Instruct (real, via zhtrain.assets) and People's Daily 1998-01:

1. extend SmolLM2's tokenizer with --new_tokens Chinese tokens learned (zhtrain tokenizer extend)
   from the first --train_lines lines of the corpus;
2. evaluate on --eval_lines lines from the END of the corpus (never used to learn tokens or train,
   nor to choose contextual's settings: the very last 16 were, and are left out):
   - the un-extended model with its own tokenizer;
   - the extended model right after the resize, for each --new_token_init (step 0);
   - the same after --steps Stage-1 steps (`zhtrain pretrain --training_stage embeddings`, only
     embed_tokens/lm_head train) on the training lines;
3. print one table. Loss per token is not comparable across tokenizers; bits per character (the
   text's total negative log-likelihood in bits / its characters) is.

    python benchmarks/bench_new_token_init.py [--steps 10] [--new_tokens 3000] [--eval_lines 64]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
OUT = REPO / "benchmarks" / "out" / "new_token_init"
INITS = ("subword_mean", "contextual", "mean", "random")
# The corpus's last 16 eligible lines: where contextual's settings (layer, 20 neighbours, temperature) were
# chosen (benchmarks/explore_new_token_init.py). They are kept out of the held-out text.
TUNING_LINES = 16


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new_tokens", type=int, default=3000, help="tokens to learn (default: %(default)s)")
    parser.add_argument(
        "--train_lines", type=int, default=2000, help="corpus lines to learn tokens and train on (default: %(default)s)"
    )
    parser.add_argument(
        "--eval_lines",
        type=int,
        default=64,
        help="held-out lines from the end of the corpus, before its last 16 (default: %(default)s)",
    )
    parser.add_argument("--steps", type=int, default=10, help="Stage-1 steps per init (default: %(default)s)")
    parser.add_argument(
        "--learning_rate", type=float, default=1e-3, help="Stage-1 learning rate, constant (default: %(default)s)"
    )
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--json", type=Path, default=OUT / "results.json", help="where to write the figures")
    return parser.parse_args()


def main() -> None:
    import torch

    from zhtrain.build_tokenizer import main as tokenizer_main
    from zhtrain.demo import assets

    args = parse()
    torch.manual_seed(0)
    started = time.perf_counter()
    model_dir, corpus = assets.ensure_model(), assets.ensure_corpus()
    lines = [line.rstrip("\n") for line in corpus.open(encoding="utf-8") if line.strip()]
    train = lines[: args.train_lines]
    eligible = [line for line in lines[-2000:] if 40 <= len(line) <= 200]
    held_out = eligible[-(args.eval_lines + TUNING_LINES) : -TUNING_LINES]
    data_dir = OUT / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "train.txt").write_text("\n".join(train) + "\n", encoding="utf-8")

    extended_dir = OUT / "tokenizer"
    tokenizer_main(
        [
            "extend",
            "--tokenizer_name_or_path",
            str(model_dir),
            "--corpus",
            str(data_dir / "train.txt"),
            "--num_new_tokens",
            str(args.new_tokens),
            "--output_dir",
            str(extended_dir),
            "--overwrite",
        ]
    )
    base_tok, ext_tok = load_tokenizer(model_dir), load_tokenizer(extended_dir)
    chars = sum(map(len, held_out))
    print(
        f"held-out text: {len(held_out)} lines, {chars:,} characters; tokens per character "
        f"{count_tokens(base_tok, held_out) / chars:.3f} (SmolLM2) -> {count_tokens(ext_tok, held_out) / chars:.3f} "
        "(extended)",
        flush=True,
    )

    rows = {"un-extended": {"step0": bits_per_character(load_model(model_dir), base_tok, held_out)}}
    print(f"  un-extended: {rows['un-extended']['step0']:.3f} bits/char", flush=True)
    for init in INITS:
        rows[init] = {"step0": bits_per_character(resized_model(model_dir, base_tok, ext_tok, init), ext_tok, held_out)}
        trained = stage1(model_dir, extended_dir, data_dir, init, args)
        rows[init]["trained"] = bits_per_character(trained, ext_tok, held_out)
        print(
            f"  {init}: {rows[init]['step0']:.3f} at step 0 -> {rows[init]['trained']:.3f} after {args.steps} Stage-1 "
            "steps",
            flush=True,
        )

    print_table(rows, args.steps)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "bits_per_character": rows}, indent=2)
        + "\n"
    )
    print(f"total {time.perf_counter() - started:.0f}s; figures in {args.json}")


# ---------------------------------------------------------------------------------------------


def load_tokenizer(folder: Path):
    from zhtrain.tokenizer.loading import load_tokenizer as load

    return load(str(folder))


def load_model(folder: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def resized_model(model_dir: Path, base_tok, ext_tok, init: str):
    """The extended model at step 0: exactly what `zhtrain pretrain` builds before training."""
    import torch

    from zhtrain.model.vocab import fit_vocabulary

    torch.manual_seed(42)
    model = load_model(model_dir)
    fit_vocabulary(model, ext_tok, untie=True, new_token_init=init, base_tokenizer=base_tok)
    return model


def stage1(model_dir: Path, tokenizer_dir: Path, data_dir: Path, init: str, args):
    """`zhtrain pretrain --training_stage embeddings` for --steps steps; returns the trained model."""
    from zhtrain.pretrain import parse_pretrain_args, pretrain

    out = OUT / f"stage1-{init}"
    result = pretrain(
        *parse_pretrain_args(
            [
                "--model_name_or_path",
                str(model_dir),
                "--tokenizer_name_or_path",
                str(tokenizer_dir),
                "--custom_vocab",
                "--new_token_init",
                init,
                "--training_stage",
                "embeddings",
                "--dataset_dir",
                str(data_dir),
                "--data_cache_dir",
                str(OUT / "cache"),
                "--block_size",
                str(args.block_size),
                "--validation_split_percentage",
                "0",
                "--per_device_train_batch_size",
                "1",
                "--max_steps",
                str(args.steps),
                "--learning_rate",
                str(args.learning_rate),
                "--lr_scheduler_type",
                "constant",
                "--weight_decay",
                "0",
                "--seed",
                "42",
                "--do_train",
                "--save_strategy",
                "no",
                "--report_to",
                "none",
                "--disable_tqdm",
                "True",
                "--logging_steps",
                str(max(1, args.steps // 2)),
                "--output_dir",
                str(out),
                "--overwrite_output_dir",
            ]
        )
    )
    shutil.rmtree(out / "pt_lora_model", ignore_errors=True)  # ~250 MB of embeddings per run
    return result.trainer.model.eval()


def count_tokens(tokenizer, texts) -> int:
    return sum(len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"])


def bits_per_character(model, tokenizer, texts, batch: int = 8) -> float:
    """Total NLL of every token of every text (after a BOS, as zhtrain's data path starts documents), in bits,
    divided by the texts' characters."""
    import torch

    nll = 0.0
    for start in range(0, len(texts), batch):
        chunk = texts[start : start + batch]
        ids = [[tokenizer.bos_token_id] + row for row in tokenizer(chunk, add_special_tokens=False)["input_ids"]]
        width = max(map(len, ids))
        input_ids = torch.tensor([row + [0] * (width - len(row)) for row in ids])
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
        targets = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        nll += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
        ).item()
    return nll / math.log(2) / sum(map(len, texts))


def print_table(rows: dict, steps: int) -> None:
    base = rows["un-extended"]["step0"]
    print()
    print(
        f"| new rows start as | bits/char at step 0 | vs un-extended | after {steps} Stage-1 steps | vs un-extended |"
    )
    print("|---|---|---|---|---|")
    print(f"| (un-extended SmolLM2, own tokenizer) | {base:.3f} | 1.00x | - | - |")
    for init in INITS:
        row = rows[init]
        print(
            f"| {init} | {row['step0']:.3f} | {row['step0'] / base:.2f}x | {row['trained']:.3f} | "
            f"{row['trained'] / base:.2f}x |"
        )
    print()


if __name__ == "__main__":
    main()
