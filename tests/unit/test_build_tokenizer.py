"""`zhtrain tokenizer train | merge | extend`: what each writes, listed tokens, and its errors."""

from __future__ import annotations

import json

import pytest
from helpers import sp

from zhtrain.build_tokenizer import main as tokenizer_main
from zhtrain.errors import ZhtrainError


def test_train_writes_a_sentencepiece_model_of_the_asked_size(chinese_sp_model):
    model = sp(chinese_sp_model)
    assert model.get_piece_size() == 300
    assert chinese_sp_model.with_suffix(".vocab").is_file()
    record = json.loads((chinese_sp_model.parent / "zhtrain_tokenizer.json").read_text())
    assert record["lines"] == 2000 and record["arguments"]["model_type"] == "unigram"
    assert "黄河" in {model.id_to_piece(i).lstrip("▁") for i in range(300)}


def test_extend_adds_listed_tokens(extended, tmp_path):
    from transformers import AutoTokenizer

    listed = tmp_path / "terms.txt"
    listed.write_text("量子计算机\n大语言模型\n", encoding="utf-8")
    out = tmp_path / "with_terms"
    tokenizer_main(
        ["extend", "--tokenizer_name_or_path", str(extended), "--new_tokens", str(listed), "--output_dir", str(out)]
    )
    before, after = AutoTokenizer.from_pretrained(str(extended)), AutoTokenizer.from_pretrained(str(out))
    assert len(after) == len(before) + 2
    assert after("大语言模型", add_special_tokens=False)["input_ids"] == [len(before) + 1]


def test_a_token_already_present_is_refused(bpe_dir, extended, tmp_path):
    with pytest.raises(ZhtrainError, match=r"--new_tokens: 'the' is already a token \(id \d+\)"):
        tokenizer_main(
            [
                "extend",
                "--tokenizer_name_or_path",
                str(bpe_dir),
                "--new_tokens",
                "量子,the",
                "--output_dir",
                str(tmp_path / "o"),
            ]
        )
    with pytest.raises(ZhtrainError, match="'黄河' is already a token"):  # learned from the corpus earlier
        tokenizer_main(
            [
                "extend",
                "--tokenizer_name_or_path",
                str(extended),
                "--new_tokens",
                "黄河",
                "--output_dir",
                str(tmp_path / "o"),
            ]
        )
    with pytest.raises(ZhtrainError, match="listed twice"):
        tokenizer_main(
            [
                "extend",
                "--tokenizer_name_or_path",
                str(bpe_dir),
                "--new_tokens",
                "量子,量子",
                "--output_dir",
                str(tmp_path / "o"),
            ]
        )
    assert not (tmp_path / "o").exists()


def test_unknown_subcommand(tmp_path):
    with pytest.raises(ZhtrainError, match="unknown subcommand 'grow'; choose one of: train, merge, extend"):
        tokenizer_main(["grow"])
