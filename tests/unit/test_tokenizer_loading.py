"""load_tokenizer: the backend chosen for a folder, and the bad choices."""

from __future__ import annotations

import pytest

from zhtrain.errors import ZhtrainError
from zhtrain.tokenizer.loading import load_tokenizer
from zhtrain.tokenizer.sentencepiece_llama import SentencePieceLlamaTokenizer


def test_backend_choice_and_bad_values(sp_tokenizer_dir, tmp_path):
    fast = load_tokenizer(str(sp_tokenizer_dir), backend="tokenizers")
    assert not isinstance(fast, SentencePieceLlamaTokenizer) and hasattr(fast, "backend_tokenizer")
    with pytest.raises(ZhtrainError, match="unknown; choose one of auto, sentencepiece, tokenizers"):
        load_tokenizer(str(sp_tokenizer_dir), backend="slow")
    fast.save_pretrained(str(tmp_path / "fast_only"))  # tokenizer.json, no tokenizer.model
    with pytest.raises(ZhtrainError, match="needs a tokenizer.model"):
        load_tokenizer(str(tmp_path / "fast_only"), backend="sentencepiece")
    assert not isinstance(load_tokenizer(str(tmp_path / "fast_only")), SentencePieceLlamaTokenizer)
