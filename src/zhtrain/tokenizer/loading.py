"""Load a tokenizer as zhtrain trains with it, and the files that travel with it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from zhtrain.errors import ZhtrainError

logger = logging.getLogger(__name__)


TOKENIZER_BACKENDS = ("auto", "sentencepiece", "tokenizers")


def load_tokenizer(path: Optional[str], use_fast: bool = True, trust_remote_code: bool = False, backend: str = "auto"):
    """Load a tokenizer from a folder (a `.model` file is taken from its folder) and check it is real.

    `backend` auto: LLaMA SentencePiece folders through sentencepiece itself, as the seed's slow
    LlamaTokenizer did (transformers 5's conversion gives other ids on the Chinese merge); anything
    else through AutoTokenizer. `sentencepiece` / `tokenizers` force one.
    """
    if backend not in TOKENIZER_BACKENDS:
        raise ZhtrainError(f"--tokenizer_backend {backend}: unknown; choose one of {', '.join(TOKENIZER_BACKENDS)}")
    from transformers import AutoTokenizer

    from zhtrain.tokenizer.sentencepiece_llama import (  # lazy: transformers' SentencePiece classes load only
        SentencePieceLlamaTokenizer,  # when such a folder is loaded
        is_llama_sentencepiece_folder,
    )

    if not path:
        raise ZhtrainError("no tokenizer: pass --tokenizer_name_or_path (or --model_name_or_path)")
    folder = Path(path)
    if folder.is_file():
        folder = folder.parent  # transformers 5.x builds an empty tokenizer from a bare vocab_file
    if not folder.is_dir():
        raise ZhtrainError(f"tokenizer {path}: no such folder; pass a folder with tokenizer.json or tokenizer.model")
    if backend == "sentencepiece" and not (folder / "tokenizer.model").is_file():
        raise ZhtrainError(
            f"tokenizer {folder}: --tokenizer_backend sentencepiece needs a tokenizer.model in the folder"
        )
    damaged = damaged_sentencepiece_model(folder) if not (folder / "tokenizer.json").is_file() else None
    if damaged:  # what transformers would build the tokenizer from; its own error points at converters (tiktoken)
        raise ZhtrainError(
            f"{folder / 'tokenizer.model'}: not a SentencePiece model ({damaged}); restore the file saved with the "
            "tokenizer"
        )
    try:
        if backend == "sentencepiece" or (backend == "auto" and is_llama_sentencepiece_folder(folder)):
            tokenizer = SentencePieceLlamaTokenizer.from_pretrained(str(folder))  # the seed's ids (see sp_tokenizer.py)
        else:
            tokenizer = AutoTokenizer.from_pretrained(
                str(folder), use_fast=use_fast, trust_remote_code=trust_remote_code
            )
    except (OSError, ValueError, TypeError, RuntimeError) as err:
        raise ZhtrainError(
            f"tokenizer {folder}: cannot load ({err}); it needs tokenizer.json or tokenizer.model"
        ) from err
    if len(tokenizer) < 10:
        raise ZhtrainError(
            f"tokenizer {folder}: loaded only {len(tokenizer)} tokens; the folder's files are incomplete"
        )
    return tokenizer


def load_base_tokenizer(model_args, tokenizer):
    """The model folder's own tokenizer when the training tokenizer is a different, larger one (else None).

    `--new_token_init subword_mean` splits each new token with it; without one, new rows use the mean.
    """
    model_dir, tokenizer_dir = model_args.model_name_or_path, model_args.tokenizer_name_or_path
    if not model_dir or Path(model_dir).resolve() == Path(tokenizer_dir or model_dir).resolve():
        return None
    if not any((Path(model_dir) / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        logger.warning(
            "the model folder %s has no tokenizer to split new tokens with; new embedding rows start at the mean",
            model_dir,
        )
        return None
    try:
        # the Rust backend splits a new piece with the base's own BPE merges (see vocab.subword_pieces)
        base = load_tokenizer(
            model_dir, model_args.use_fast_tokenizer, model_args.trust_remote_code, backend="tokenizers"
        )
    except ZhtrainError as err:
        logger.warning("no tokenizer in the model folder (%s); new embedding rows start at the mean", err)
        return None
    return base if len(base) < len(tokenizer) else None


def sentencepiece_file(tokenizer_path: Optional[str]) -> Optional[Path]:
    """The tokenizer's `tokenizer.model`, if any: copied next to adapters for SentencePiece tools."""
    if not tokenizer_path:
        return None
    folder = Path(tokenizer_path)
    if folder.is_file():
        return folder if folder.suffix == ".model" else None
    candidate = folder / "tokenizer.model"
    return candidate if candidate.is_file() else None


def damaged_sentencepiece_model(folder: Path) -> Optional[str]:
    """sentencepiece's complaint about the folder's tokenizer.model, or None (absent or readable)."""
    model_file = folder / "tokenizer.model"
    if not model_file.is_file():
        return None
    import sentencepiece

    try:
        sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    except (OSError, RuntimeError) as err:
        return str(err).splitlines()[0] if str(err) else type(err).__name__
    return None
