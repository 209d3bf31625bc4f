"""Tiny in-process fixtures: a LLaMA-layout SentencePiece tokenizer, tiny LLaMA models, text folders."""

from __future__ import annotations

import random
import re
import shlex
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


def write_corpus(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def chinese_lines(n: int, seed: int = 5) -> list[str]:
    """Chinese text with recurring words, so that multi-character pieces are worth learning."""
    import random

    rng = random.Random(seed)
    words = ["黄河", "中国", "人民", "发展", "经济", "白日", "大海", "山川", "国家", "时代"]
    return [
        "".join(rng.choice(words) if rng.random() < 0.6 else rng.choice(CHARS) for _ in range(rng.randint(8, 30)))
        + "。"
        for _ in range(n)
    ]


def make_bpe_tokenizer(folder: Path, vocab_size: int = 320) -> Path:
    """A tiny SmolLM2-style tokenizer: byte-level BPE trained on English only."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    english = [f"the number {i} is {i * 7 % 1000} and the river runs to the sea" for i in range(500)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        show_progress=False,
    )
    tok.train_from_iterator(english, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>"
    )
    fast.save_pretrained(str(folder))
    return folder


def seed_script_args(script: Path, substitutions: dict) -> list[str]:
    """The argument list of the torchrun line in a seed-style shell script, variables filled in."""
    text = script.read_text()
    variables = dict(re.findall(r"^(\w+)=(\S+)$", text, flags=re.M))
    variables.update(substitutions)
    command = text[text.index("torchrun") :].replace("\\\n", " ")
    command = re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m.group(1), "1"), command)
    argv = shlex.split(command)
    return argv[argv.index("zhtrain.pretrain") + 1 :]
