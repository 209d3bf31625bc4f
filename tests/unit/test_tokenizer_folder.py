"""Tokenizer output folders: an existing one is replaced only with --overwrite."""

from __future__ import annotations

import pytest

from zhtrain.build_tokenizer import main as tokenizer_main
from zhtrain.errors import ZhtrainError


def test_existing_output_dir_needs_overwrite(sp_tokenizer_dir, chinese_sp_model, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    argv = [
        "merge",
        "--llama_tokenizer_dir",
        str(sp_tokenizer_dir),
        "--chinese_sp_model_file",
        str(chinese_sp_model),
        "--output_dir",
        str(out),
    ]
    with pytest.raises(ZhtrainError, match="already exists; pass --overwrite"):
        tokenizer_main(argv)
    assert (out / "keep.txt").read_text() == "mine"
    tokenizer_main(argv + ["--overwrite"])
    assert (out / "tokenizer.model").is_file() and not (out / "keep.txt").exists()
