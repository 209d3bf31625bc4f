"""The seed's vocabulary modes (one table) and embedding resizing with initialised new rows."""

from __future__ import annotations

import logging
from typing import Optional

import torch

from zhtrain.distributed.sharded import full_shape, gathered, is_zero3_partitioned
from zhtrain.errors import ZhtrainError
from zhtrain.model.contextual_init import contextual_rows

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
TOKENIZER_NAMES = {
    32000: "the original LLaMA tokenizer",
    49953: "the Chinese LLaMA tokenizer",
    49954: "the Chinese Alpaca tokenizer",
}


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


# How new embedding rows start (`--new_token_init`); the flag's choices come from this table.
NEW_TOKEN_INITS: dict[str, str] = {
    "subword_mean": "each new row (input and output) = the mean of the rows of the pieces the base tokenizer "
    "splits the new token into (byte pieces included); the mean of all rows when it has none",
    "contextual": "from the base model's own computation (zhtrain.contextual_init): the input row is its hidden "
    "state after reading the token's pieces, the output row a similarity-weighted mix of the output rows of base "
    "tokens in the same script; subword_mean where that cannot run (tied embeddings, ZeRO-3, no pieces)",
    "mean": "every new row = the mean of all existing rows",
    "random": "the model's own random initialisation (what the seed's resize did)",
}


NEEDS_BASE_TOKENIZER = ("subword_mean", "contextual")  # split each new token with the model's own tokenizer


def resize_embeddings(model, new_size: int, init: str = "mean", tokenizer=None, base_tokenizer=None) -> int:
    """Grow input and output embeddings to `new_size`; returns how many rows were added.

    A token the model has never seen should start where the model already reads and writes its
    text, not as noise that inflates the first losses: `subword_mean` (needs the new `tokenizer`
    and the model's own `base_tokenizer`) starts "黄河" at the mean of the rows of the base pieces
    that spell it; `mean` starts every new token as an average token.
    """
    if init not in NEW_TOKEN_INITS:
        raise ZhtrainError(f"--new_token_init {init}: unknown; choose one of {', '.join(NEW_TOKEN_INITS)}")
    old_size = full_shape(model.get_input_embeddings().weight)[0]  # ZeRO-3: the local weight has 0 rows
    if new_size <= old_size:
        return 0
    pieces = None
    if init in NEEDS_BASE_TOKENIZER:
        if tokenizer is None or base_tokenizer is None:
            logger.warning(
                "--new_token_init %s needs the model's own tokenizer; none found, so new rows use mean", init
            )
            init = "mean"
        else:
            pieces = subword_pieces(tokenizer, base_tokenizer, old_size, new_size)
    contextual = None
    if init == "contextual":
        contextual = _contextual_or_none(model, tokenizer, base_tokenizer, pieces, old_size)
        init = "contextual" if contextual is not None else "subword_mean"
    model.resize_token_embeddings(new_size, mean_resizing=False)
    if init != "random":
        # gathered: under ZeRO-3 the rows are written on the whole matrices (rank 0's values are kept).
        with torch.no_grad(), gathered(_embedding_matrices(model)):
            for embedding in _embedding_matrices(model):
                init_new_rows(embedding, old_size, pieces)
    if contextual is not None:
        rows, inputs, outputs = contextual
        with torch.no_grad():
            table = model.get_input_embeddings().weight
            table[old_size + rows.to(table.device)] = inputs.to(table.device, table.dtype)
            if outputs is not None:
                table = model.get_output_embeddings().weight
                table[old_size + rows.to(table.device)] = outputs.to(table.device, table.dtype)
    found = f", {sum(1 for p in pieces if p):,} of {len(pieces):,} from base pieces" if pieces is not None else ""
    logger.info("resized embeddings %d -> %d (new rows: %s init%s)", old_size, new_size, init, found)
    return new_size - old_size


def _contextual_or_none(model, tokenizer, base_tokenizer, pieces: list[list[int]], old_size: int):
    """The contextual rows, or None (with the reason logged) where they cannot be written apart."""

    if len(_embedding_matrices(model)) < 2:  # tied (or no lm_head): one matrix for both rows
        logger.warning(
            "--new_token_init contextual needs separate embed_tokens and lm_head (train both); using subword_mean"
        )
        return None
    if is_zero3_partitioned(model.parameters()):
        logger.warning(
            "--new_token_init contextual cannot run the model under ZeRO-3 before training; using subword_mean"
        )
        return None
    return contextual_rows(model, tokenizer, base_tokenizer, pieces, old_size)


def init_new_rows(embedding: torch.Tensor, old_size: int, pieces: Optional[list[list[int]]] = None) -> None:
    """Rows from `old_size` on: the mean of the listed old rows each, or of all old rows."""
    old = embedding[:old_size].float()
    new = old.mean(dim=0).expand(embedding.shape[0] - old_size, -1).clone()
    spelled = [k for k, ids in enumerate(pieces or []) if ids]
    if spelled:
        flat = torch.tensor([i for k in spelled for i in pieces[k]], device=old.device)
        offsets = torch.tensor([0] + [len(pieces[k]) for k in spelled[:-1]], device=old.device).cumsum(0)
        new[torch.tensor(spelled, device=old.device)] = torch.nn.functional.embedding_bag(
            flat, old, offsets, mode="mean"
        )
    embedding[old_size:] = new.to(embedding.dtype)


def subword_pieces(tokenizer, base_tokenizer, old_size: int, new_size: int) -> list[list[int]]:
    """For each new id: the base ids that spell it (empty for special tokens and unknowns).

    A vocabulary token is split by the base's own BPE model on the token's string in the shared
    alphabet (`▁黄河` for SentencePiece, byte-level symbols for GPT-2-style BPE), so no normaliser
    or prefix space can shift it; an added token is encoded from its text.
    """
    added = tokenizer.added_tokens_decoder
    split = _base_splitter(base_tokenizer)
    unknown = base_tokenizer.unk_token_id
    out = []
    for index in range(old_size, new_size):
        token = added.get(index)
        if token is not None:
            ids = [] if token.special else base_tokenizer.encode(token.content, add_special_tokens=False)
        else:
            piece = tokenizer.convert_ids_to_tokens(index)
            ids = split(piece) if piece is not None else []
        out.append([i for i in ids if i != unknown and 0 <= i < old_size])
    return out


def _base_splitter(base_tokenizer):
    backend = getattr(base_tokenizer, "backend_tokenizer", None)
    if backend is not None:
        model = backend.model
        return lambda piece: [part.id for part in model.tokenize(piece)]
    return lambda piece: base_tokenizer.encode(
        base_tokenizer.convert_tokens_to_string([piece]), add_special_tokens=False
    )


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
    with gathered([inputs.weight], modifier_rank=None):  # ZeRO-3: copy the whole matrix, not a shard
        output.weight = torch.nn.Parameter(inputs.weight.detach().clone())
    return True


def model_vocab_size(config) -> int:
    """From the config, not the weights: under ZeRO-3 a partitioned weight reports 0 rows."""
    text_config = getattr(config, "get_text_config", lambda: config)()
    size: Optional[int] = getattr(text_config, "vocab_size", None)
    if not size:
        raise ZhtrainError("the model's config.json has no vocab_size; is --model_name_or_path a causal LM?")
    return int(size)


def fit_vocabulary(model, tokenizer, untie: bool, new_token_init: str = "mean", base_tokenizer=None) -> int:
    """Untie embed_tokens/lm_head when both are trained, then grow the embeddings to the tokenizer
    (never shrink); returns the rows added. Which (model, tokenizer) pairs are allowed is checked
    before the model loads (`check_vocab_pair` for pretrain, `sft.check_vocabulary`).

    `base_tokenizer` (the model's own) lets `subword_mean` start new rows from the pieces that spell them.
    """
    # Untied first, so that an init may give a new token different input and output rows.
    if untie and untie_embeddings(model):
        logger.info("embed_tokens and lm_head were tied; untied so both can be trained (tie_word_embeddings=false)")
    return resize_embeddings(
        model, len(tokenizer), init=new_token_init, tokenizer=tokenizer, base_tokenizer=base_tokenizer
    )
