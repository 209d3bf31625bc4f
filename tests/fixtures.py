"""Tiny in-process fixtures: a LLaMA-layout SentencePiece tokenizer, tiny LLaMA models, text folders."""

from __future__ import annotations

import random
from pathlib import Path

CHARS = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可也你能而子那得白日依山尽黄河入海流"


def make_lines(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        zh = "".join(rng.choice(CHARS) for _ in range(rng.randint(5, 40)))
        lines.append(f"{zh}，the number {i} is {rng.randint(0, 999)}。")
    return lines


def make_sp_tokenizer(folder: Path, vocab_size: int = 400) -> Path:
    """Train a small SentencePiece BPE model with LLaMA's layout (<unk>=0 <s>=1 </s>=2, byte fallback)."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(make_lines(3000, seed=1)),
        model_prefix=str(folder / "tokenizer"),
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))  # adds tokenizer.json / tokenizer_config.json beside tokenizer.model
    assert len(AutoTokenizer.from_pretrained(str(folder))) == vocab_size
    return folder


def make_tiny_llama(folder: Path, vocab_size: int, tie: bool = False, seed: int = 0, max_positions: int = 256) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(folder))
    return folder


def make_text_dir(folder: Path, files: int = 2, lines: int = 200) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(files):
        (folder / f"part{k}.txt").write_text("\n".join(make_lines(lines, seed=10 + k)) + "\n", encoding="utf-8")
    return folder
