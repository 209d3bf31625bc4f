"""The seed's vocabulary modes (one table) and embedding resizing with initialised new rows."""

from __future__ import annotations

import logging
from typing import Optional

import torch

from zhtrain.errors import ZhtrainError

logger = logging.getLogger(__name__)

# (model vocabulary, tokenizer length) -> purpose. The only pairs the seed supports.
VOCAB_MODES: dict[tuple[int, int], str] = {
    (32000, 32000): "continue training original LLaMA, vocab unchanged",
    (32000, 49953): "train Chinese LLaMA from original LLaMA",
    (49953, 49953): "continue pre-training Chinese LLaMA / LLaMA-Plus",
    (49954, 49954): "continue pre-training Chinese Alpaca / Alpaca-Plus",
}
SEED_VOCAB_SIZES = {size for pair in VOCAB_MODES for size in pair}
# The seed family's tokenizers by size, so messages can say which tokenizer an adapter needs.
TOKENIZER_NAMES = {32000: "the original LLaMA tokenizer", 49953: "the Chinese LLaMA tokenizer", 49954: "the Chinese Alpaca tokenizer"}


def describe_tokenizer(size: int) -> str:
    name = TOKENIZER_NAMES.get(size)
    return f"a {size}-token tokenizer" + (f" ({name})" if name else "")


def modes_table() -> str:
    return "; ".join(f"model {m} + tokenizer {t} ({purpose})" for (m, t), purpose in VOCAB_MODES.items())


def check_vocab_pair(model_vocab: int, tokenizer_len: int, custom_vocab: bool = False) -> str:
    """Return the purpose of the (model, tokenizer) pair, or raise naming both sizes and the table."""
    if (model_vocab, tokenizer_len) in VOCAB_MODES:
        return VOCAB_MODES[(model_vocab, tokenizer_len)]
    in_seed_family = model_vocab in SEED_VOCAB_SIZES or tokenizer_len in SEED_VOCAB_SIZES
    if in_seed_family and not custom_vocab:
        raise ZhtrainError(
            f"model vocabulary {model_vocab} with tokenizer of {tokenizer_len} tokens is not one of the supported "
            f"modes: {modes_table()}. Use the matching tokenizer, or pass --custom_vocab for your own vocabulary"
        )
    if tokenizer_len < model_vocab:
        raise ZhtrainError(
            f"tokenizer has {tokenizer_len} tokens but the model has {model_vocab} embedding rows; zhtrain never "
            "shrinks a model's vocabulary: use the model's own tokenizer or an extension of it"
        )
    if tokenizer_len > model_vocab:
        return f"custom vocabulary: model resized from {model_vocab} to {tokenizer_len} tokens"
    return f"custom vocabulary of {model_vocab} tokens, unchanged"


def resize_embeddings(model, new_size: int, init: str = "mean") -> int:
    """Grow input and output embeddings to `new_size`; returns how many rows were added.

    New rows start at the mean of the existing rows (a token the model has never seen should
    look like an average token, not random noise that inflates the first losses).
    """
    old_size = model.get_input_embeddings().weight.shape[0]
    if new_size <= old_size:
        return 0
    model.resize_token_embeddings(new_size, mean_resizing=False)
    if init == "mean":
        with torch.no_grad():
            for embedding in _embedding_matrices(model):
                embedding[old_size:] = embedding[:old_size].float().mean(dim=0).to(embedding.dtype)
    elif init != "random":
        raise ZhtrainError(f"--new_token_init {init}: unknown; choose mean or random")
    logger.info("resized embeddings %d -> %d (new rows: %s init)", old_size, new_size, init)
    return new_size - old_size


def _embedding_matrices(model) -> list[torch.Tensor]:
    matrices = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not matrices[0]:
        matrices.append(output.weight)
    return matrices


def untie_embeddings(model) -> bool:
    """Give lm_head its own copy of the embedding matrix (both are trained separately)."""
    output = model.get_output_embeddings()
    inputs = model.get_input_embeddings()
    if output is None or output.weight is not inputs.weight:
        return False
    model.config.tie_word_embeddings = False
    text_config = getattr(model.config, "get_text_config", lambda: None)()
    if text_config is not None:
        text_config.tie_word_embeddings = False
    output.weight = torch.nn.Parameter(inputs.weight.detach().clone())
    return True


def model_vocab_size(config) -> int:
    """From the config, not the weights: under ZeRO-3 a partitioned weight reports 0 rows."""
    text_config = getattr(config, "get_text_config", lambda: config)()
    size: Optional[int] = getattr(text_config, "vocab_size", None)
    if not size:
        raise ZhtrainError("the model's config.json has no vocab_size; is --model_name_or_path a causal LM?")
    return int(size)
