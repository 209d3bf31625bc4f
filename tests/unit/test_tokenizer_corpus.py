"""Training text for tokenizers: a corpus without text is refused."""

from __future__ import annotations

import pytest
from helpers import write_corpus

from zhtrain.build_tokenizer import main as tokenizer_main
from zhtrain.errors import ZhtrainError


def test_empty_corpus_is_refused(tmp_path, bpe_dir):
    empty = write_corpus(tmp_path / "empty.txt", ["", "   ", ""])
    with pytest.raises(ZhtrainError, match="no text"):
        tokenizer_main(["train", "--corpus", str(empty), "--output_dir", str(tmp_path / "o")])
    with pytest.raises(ZhtrainError, match="no text"):
        tokenizer_main(
            [
                "extend",
                "--tokenizer_name_or_path",
                str(bpe_dir),
                "--corpus",
                str(empty),
                "--output_dir",
                str(tmp_path / "o"),
            ]
        )
    assert not (tmp_path / "o").exists()
