"""Exploration for issue 3: new-row inits beyond subword_mean, in bits per character at step 0.

The record of how `--new_token_init contextual` (src/zhtrain/contextual_init.py) was found, kept so it
can be rerun; not part of `make bench` (benchmarks/bench_new_token_init.py measures the zhtrain option).
Uses the extended tokenizer of benchmarks/bench_new_token_init.py (run it first) and SmolLM2-135M from
zhtrain's asset cache. Every init starts from `subword_mean` (what `zhtrain pretrain` builds) and
replaces the new rows of one or both matrices:

  residual-input   input rows = the base model's residual stream (layer --layer) at the last piece
                   of the token's base spelling, read after [BOS] + pieces
  cjk-mix-output   output rows = a softmax(cos / --tau)-weighted mix of the output rows of the --top
                   old tokens that contain Chinese characters, nearest by the same residual stream
  both             the two together (zhtrain's option takes a quarter of the depth, 7 here, and the
                   base tokens that share a non-ASCII character with the new ones)

The settings were chosen on the corpus's last 16 eligible lines (`--eval_set last`); `--eval_set before`
scores the lines before those, which were not looked at.
No evaluation text is used to build any row.

    python benchmarks/explore_new_token_init.py [--layer 8] [--top 20] [--tau 0.05] [--eval_set last|before]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_new_token_init import OUT, bits_per_character, load_model, load_tokenizer, resized_model  # noqa: E402

CJK = re.compile(r"[\u4e00-\u9fff]")


def main() -> None:
    from zhtrain.demo import assets
    from zhtrain.model.contextual_init import last_hidden_states
    from zhtrain.model.vocab import subword_pieces

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layer", type=int, default=8)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--tau", type=float, default=0.05)
    parser.add_argument("--eval_lines", type=int, default=16)
    parser.add_argument(
        "--eval_set",
        choices=("last", "before"),
        default="last",
        help="last: the lines the settings were chosen on; before: the lines before them",
    )
    args = parser.parse_args()
    torch.set_num_threads(2)

    model_dir, corpus = assets.ensure_model(), assets.ensure_corpus()
    if not (OUT / "tokenizer").is_dir():
        raise SystemExit(
            f"{OUT / 'tokenizer'}: run benchmarks/bench_new_token_init.py first (it builds the extended tokenizer)"
        )
    lines = [line.rstrip("\n") for line in corpus.open(encoding="utf-8") if line.strip()]
    eligible = [line for line in lines[-2000:] if 40 <= len(line) <= 200]
    # "last": bench_new_token_init's held-out lines, on which --layer/--top/--tau were chosen;
    # "before": the eligible lines just before those, never looked at while choosing.
    end = len(eligible) - (args.eval_lines if args.eval_set == "before" else 0)
    held_out = eligible[end - args.eval_lines : end]
    base_tok, ext_tok = load_tokenizer(model_dir), load_tokenizer(OUT / "tokenizer")
    base = load_model(model_dir)
    old = len(base_tok)

    results = {"un-extended": bits_per_character(base, base_tok, held_out)}
    model = resized_model(model_dir, base_tok, ext_tok, "subword_mean")
    results["subword_mean"] = bits_per_character(model, ext_tok, held_out)

    pieces = subword_pieces(ext_tok, base_tok, old, len(ext_tok))
    spelled = [k for k, ids in enumerate(pieces) if ids]
    new_rows = torch.tensor(spelled) + old
    chinese_old = torch.tensor([i for i in range(old) if CJK.search(base_tok.decode([i]))])
    with torch.no_grad():  # the same reading of the model as zhtrain's --new_token_init contextual
        new_repr = last_hidden_states(base, base_tok.bos_token_id, [pieces[k] for k in spelled], args.layer)
        old_repr = last_hidden_states(base, base_tok.bos_token_id, [[int(i)] for i in chinese_old], args.layer)
    similarity = torch.nn.functional.normalize(new_repr, dim=1) @ torch.nn.functional.normalize(old_repr, dim=1).T
    nearest = similarity.topk(min(args.top, len(chinese_old)), dim=1)
    weights = torch.softmax(nearest.values / args.tau, dim=1)

    inputs, outputs = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    mixed_output = (weights.unsqueeze(2) * outputs.detach()[chinese_old][nearest.indices]).sum(1)
    start_in, start_out = inputs.detach().clone(), outputs.detach().clone()
    for name, set_input, set_output in (
        ("residual-input", True, False),
        ("cjk-mix-output", False, True),
        ("both", True, True),
    ):
        with torch.no_grad():
            inputs.copy_(start_in)
            outputs.copy_(start_out)
            if set_input:
                inputs[new_rows] = new_repr.to(inputs.dtype)
            if set_output:
                outputs[new_rows] = mixed_output.to(outputs.dtype)
        results[name] = bits_per_character(model, ext_tok, held_out)

    print(
        f"\n{len(held_out)} held-out lines; {len(chinese_old)} old tokens contain Chinese characters; layer "
        f"{args.layer}, top {args.top}, tau {args.tau}"
    )
    print("| new rows start as | bits/char at step 0 | vs un-extended |")
    print("|---|---|---|")
    for name, value in results.items():
        print(f"| {name} | {value:.3f} | {value / results['un-extended']:.2f}x |")


if __name__ == "__main__":
    main()
