"""Extend a byte-level BPE tokenizer (SmolLM2 / Llama-3 / Qwen style `tokenizer.json`) from a corpus.

How new tokens are learned without changing any existing id:

1. a fresh BPE is trained (Hugging Face `tokenizers`) on the corpus with the base's own
   normaliser and pre-tokenizer over the 256-byte alphabet, so its tokens live in the same byte
   space as the base's;
2. its merges are walked in the order learned (most frequent first). A merge whose result the
   base already has is skipped. Otherwise the result must be reachable: segmenting its bytes with
   the merges kept so far must give exactly two tokens, which become the new merge (they may differ
   from the learned pair, since the base's merges apply first). The result gets the next free id;
3. the new merges are appended after all the base's merges (lowest priority), so text without the
   new tokens is segmented exactly as before, and every base id keeps its token.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from zhtrain.errors import ZhtrainError

logger = logging.getLogger(__name__)


@dataclass
class LearnedTokens:
    tokens: list[str]  # in the model's byte-level alphabet, in id order
    merges: list[tuple[str, str]]
    first_id: int


def read_bpe_json(folder: Path, flag: str = "--tokenizer_name_or_path") -> dict:
    """The base tokenizer.json, checked to be a byte-level BPE that this extension understands."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        if (Path(folder) / "tokenizer.model").is_file():
            raise ZhtrainError(
                f"{flag} {folder}: a SentencePiece tokenizer (tokenizer.model, no tokenizer.json); learn Chinese "
                "pieces with `zhtrain tokenizer train` and append them with `zhtrain tokenizer merge`"
            )
        raise ZhtrainError(f"{flag} {folder}: no tokenizer.json there; pass a Hugging Face tokenizer folder")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ZhtrainError(f"{path}: not a readable tokenizer.json ({err})") from None
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ZhtrainError(f"{path}: a {model.get('type')} model; extend learns merges for BPE tokenizers only")
    if not is_byte_level(spec.get("pre_tokenizer")):
        raise ZhtrainError(
            f"{path}: a BPE without a byte-level pre-tokenizer (e.g. a converted SentencePiece model); for those use "
            "`zhtrain tokenizer train` and `zhtrain tokenizer merge`"
        )
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise ZhtrainError(f"{path}: BPE with subword prefixes/suffixes is not supported by extend")
    return spec


def is_byte_level(pre_tokenizer) -> bool:
    if not pre_tokenizer:
        return False
    if pre_tokenizer.get("type") == "ByteLevel":
        return True
    return any(is_byte_level(p) for p in pre_tokenizer.get("pretokenizers", []))


def merge_pairs(spec: dict) -> list[tuple[str, str]]:
    """Merges as pairs, whichever of the two JSON spellings the file uses ("a b" or ["a", "b"])."""
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in spec["model"]["merges"]]


def next_free_id(spec: dict) -> int:
    """After every id in use: the model's vocab and the added tokens (which may lie beyond it)."""
    ids = list(spec["model"]["vocab"].values()) + [t["id"] for t in spec.get("added_tokens", [])]
    return max(ids) + 1


def learn_tokens(spec: dict, lines: Sequence[str], num_new_tokens: int, min_frequency: int) -> LearnedTokens:
    """Up to `num_new_tokens` new tokens (and their merges) learned from `lines`; see the module doc."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    base = Tokenizer.from_str(json.dumps(spec))
    vocab = dict(spec["model"]["vocab"])
    ranks = {pair: rank for rank, pair in enumerate(merge_pairs(spec))}
    learned = LearnedTokens([], [], next_free_id(spec))
    target = len(pre_tokenizers.ByteLevel.alphabet()) + math.ceil(num_new_tokens * 1.2) + 64
    for _attempt in range(4):  # the learned vocabulary overlaps the base's: learn more until enough are new
        learner = Tokenizer(models.BPE())
        learner.normalizer = base.normalizer
        learner.pre_tokenizer = base.pre_tokenizer
        trainer = trainers.BpeTrainer(
            vocab_size=target,
            min_frequency=min_frequency,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        learner.train_from_iterator(lines, trainer=trainer, length=len(lines))
        candidates = merge_pairs(json.loads(learner.to_str()))
        exhausted = len(candidates) < target - len(pre_tokenizers.ByteLevel.alphabet())
        learned = LearnedTokens([], [], next_free_id(spec))
        kept, new = dict(ranks), set()
        for left, right in candidates:
            token = left + right
            if token in vocab or token in new:
                continue
            pieces = segment(token, kept)
            if len(pieces) != 2:
                continue  # not reachable with one merge on top of the base's
            kept[(pieces[0], pieces[1])] = len(kept)
            learned.merges.append((pieces[0], pieces[1]))
            learned.tokens.append(token)
            new.add(token)
            if len(learned.tokens) == num_new_tokens:
                return learned
        if exhausted:
            break
        target *= 2
    return learned


def segment(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """BPE on one pre-token's symbols: repeatedly apply the lowest-ranked merge present."""
    symbols = list(word)
    while len(symbols) > 1:
        best = min(range(len(symbols) - 1), key=lambda i: ranks.get((symbols[i], symbols[i + 1]), math.inf))
        if (symbols[best], symbols[best + 1]) not in ranks:
            break
        symbols[best : best + 2] = [symbols[best] + symbols[best + 1]]
    return symbols


def extended_spec(spec: dict, learned: LearnedTokens) -> dict:
    """The base tokenizer.json with the new tokens given the next ids and their merges appended."""
    out = copy.deepcopy(spec)
    vocab = out["model"]["vocab"]
    for offset, token in enumerate(learned.tokens):
        vocab[token] = learned.first_id + offset
    as_strings = bool(out["model"]["merges"]) and isinstance(out["model"]["merges"][0], str)
    out["model"]["merges"].extend(f"{a} {b}" if as_strings else [a, b] for a, b in learned.merges)
    return out


def check_extension(base_spec: dict, tokenizer, learned: LearnedTokens) -> None:
    """Every base token keeps its id, and every new token encodes to itself (is reachable)."""
    backend = tokenizer.backend_tokenizer
    for token, index in base_spec["model"]["vocab"].items():
        if backend.token_to_id(token) != index:
            raise RuntimeError(f"extension moved base token {token!r} from id {index}")
    model = backend.model
    for offset, token in enumerate(learned.tokens):
        pieces = model.tokenize(token)
        if len(pieces) != 1 or pieces[0].id != learned.first_id + offset:
            raise RuntimeError(f"new token {token!r} is not produced by the merges")


def readable(tokenizer, tokens: Sequence[str], limit: int = 12) -> str:
    """The first new tokens that are whole characters as text, for the log (partial UTF-8 ones print as �)."""
    texts = (tokenizer.decode([i]) for i in tokenizer.convert_tokens_to_ids(list(tokens[: limit * 4])))
    return " ".join([text for text in texts if "\ufffd" not in text][:limit])
