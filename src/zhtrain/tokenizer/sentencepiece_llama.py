"""The LLaMA tokenizer as the seed ran it: `sentencepiece` itself, not its `tokenizers` conversion.

The seed's scripts load `LlamaTokenizer` (run_clm_pt_with_peft.py, merge, inference) or
`AutoTokenizer(use_fast=False)` (FastChat's train.py): in the transformers of their day both are
the slow tokenizer, so every id the Chinese-LLaMA/Alpaca models were trained on came from
sentencepiece. transformers 5.x has no slow LLaMA tokenizer any more: `AutoTokenizer` converts
`tokenizer.model` to a `tokenizers` BPE, which breaks ties between equal-score merges by rank where
sentencepiece takes the leftmost pair. On LLaMA's own 32000 pieces that changes nothing; on the
Chinese merge (17,953 appended pieces, all score 0) it changes the ids of about a third of People's
Daily lines. So zhtrain loads LLaMA-style SentencePiece folders with this class (see
`model.load_tokenizer`): the seed's ids in every stage, and data preparation may use raw
sentencepiece, the fastest exact path.

Behaviour copied from the slow `LlamaTokenizer` (legacy mode, the seed's): BOS added, no EOS;
text between added tokens is encoded by sentencepiece on its own (with its dummy prefix);
decoding joins pieces with `sentencepiece.decode`, so byte-fallback pieces become characters.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

from zhtrain.errors import ZhtrainError
from zhtrain.files import write_json_atomic

SPIECE_UNDERLINE = "▁"


# tokenizer_config.json classes whose tokenizer.model is LLaMA's SentencePiece layout.
LLAMA_TOKENIZER_CLASSES = frozenset({"LlamaTokenizer", "LlamaTokenizerFast"})


GENERIC_TOKENIZER_CLASSES = frozenset({None, "TokenizersBackend", "PreTrainedTokenizerFast"})


class SentencePieceLlamaTokenizer(SentencePieceBackend):
    """transformers' `SentencePieceBackend` with the slow `LlamaTokenizer`'s special tokens and decoding."""

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file=None,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token=None,
        add_bos_token=True,
        add_eos_token=False,
        legacy=True,
        **kwargs,
    ):
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        kwargs.pop("special_tokens_pattern", None)
        super().__init__(
            vocab_file=vocab_file,
            unk_token=unk_token,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            add_bos_token=add_bos_token,
            add_eos_token=add_eos_token,
            legacy=legacy,
            special_tokens_pattern="none",
            **kwargs,
        )

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        output = bos + list(token_ids_0) + eos
        if token_ids_1 is not None:
            output += bos + list(token_ids_1) + eos
        return output

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            special = set(self.all_special_ids)
            return [1 if i in special else 0 for i in token_ids_0]
        bos, eos = [1] if self.add_bos_token else [], [1] if self.add_eos_token else []
        mask = bos + [0] * len(token_ids_0) + eos
        if token_ids_1 is not None:
            mask += bos + [0] * len(token_ids_1) + eos
        return mask

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """As the slow LlamaTokenizer: sentencepiece decodes each run of ordinary pieces."""
        tokens = list(tokens)
        if tokens and tokens[0].startswith(SPIECE_UNDERLINE):
            tokens[0] = tokens[0][1:]  # the dummy prefix sentencepiece added when encoding
        special = set(self.all_special_tokens)
        out, run, prev_is_special = "", [], False
        for i, token in enumerate(tokens):
            if token in special:
                if not prev_is_special and i != 0 and self.legacy:
                    out += " "
                out += self.sp_model.decode(run) + token
                run, prev_is_special = [], True
            else:
                if prev_is_special and i == 1 and not token.startswith(SPIECE_UNDERLINE):
                    out += " "
                run.append(token)
                prev_is_special = False
        return out + self.sp_model.decode(run)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As any LLaMA tokenizer folder: `tokenizer_class` LlamaTokenizer, so other tools load it as usual."""
        saved = super().save_pretrained(save_directory, *args, **kwargs)
        config_file = Path(save_directory) / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8"))
        config["tokenizer_class"] = "LlamaTokenizer"
        config.pop("backend", None)
        write_json_atomic(config_file, config)
        return saved


def is_llama_sentencepiece_folder(folder: Path) -> bool:
    """A folder whose tokenizer is LLaMA's SentencePiece layout (what the seed loaded with LlamaTokenizer)."""
    model_file = folder / "tokenizer.model"
    if not model_file.is_file():
        return False
    config_file = folder / "tokenizer_config.json"
    tokenizer_class: Optional[str] = None
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False  # let AutoTokenizer report the broken file
        if not isinstance(config, dict):
            raise ZhtrainError(
                f"{config_file}: not a JSON object of tokenizer settings; restore the file saved with the tokenizer"
            )
        tokenizer_class = config.get("tokenizer_class")
    if tokenizer_class in LLAMA_TOKENIZER_CLASSES:
        return True
    # No class, or transformers 5's generic one (what it saves for a bare tokenizer.model): decide by the model.
    return tokenizer_class in GENERIC_TOKENIZER_CLASSES and has_llama_layout(model_file)


def has_llama_layout(model_file: Path) -> bool:
    """<unk> 0, <s> 1, </s> 2: the LLaMA / Chinese-LLaMA SentencePiece layout."""
    import sentencepiece as spm

    try:
        model = spm.SentencePieceProcessor(model_file=str(model_file))
    except (OSError, RuntimeError):
        return False
    return (model.unk_id(), model.bos_id(), model.eos_id()) == (0, 1, 2)
