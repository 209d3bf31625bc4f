"""Extending a byte-level BPE (SmolLM2's kind): learned merges appended after every existing id."""

from __future__ import annotations

import json

import pytest
from helpers import chinese_lines, write_corpus

from zhtrain.build_tokenizer import main as tokenizer_main
from zhtrain.errors import ZhtrainError


def test_extend_adds_learned_tokens_after_every_existing_id(bpe_dir, extended):
    from transformers import AutoTokenizer

    base, ext = AutoTokenizer.from_pretrained(str(bpe_dir)), AutoTokenizer.from_pretrained(str(extended))
    assert len(ext) == len(base) + 200
    base_vocab, ext_vocab = base.get_vocab(), ext.get_vocab()
    assert all(ext_vocab[token] == index for token, index in base_vocab.items())
    new_ids = sorted(set(ext_vocab.values()) - set(base_vocab.values()))
    assert new_ids == list(range(len(base), len(base) + 200))
    model = ext.backend_tokenizer.model
    for index in new_ids:  # every new token is produced by the merges
        token = ext.convert_ids_to_tokens(index)
        assert [p.id for p in model.tokenize(token)] == [index]
    english = "the number 42 is 294 and the river runs to the sea"
    assert ext(english)["input_ids"] == base(english)["input_ids"]  # text without new tokens: unchanged
    chinese = "黄河入海流，中国人民发展经济。"
    assert len(ext(chinese)["input_ids"]) < len(base(chinese)["input_ids"])
    assert ext.decode(ext(chinese, add_special_tokens=False)["input_ids"]) == chinese


def test_extend_reports_fewer_tokens_per_character_on_held_out_lines(extended):
    record = json.loads((extended / "zhtrain_tokenizer.json").read_text())
    measured = record["tokens_per_character"]
    assert record["held_out_lines"] == 30 and record["learned"] == 200
    assert measured["extended"] < 0.8 * measured["base"]


def test_extend_refuses_a_sentencepiece_base_for_learning(sp_tokenizer_dir, tmp_path):
    corpus = write_corpus(tmp_path / "zh.txt", chinese_lines(50))
    with pytest.raises(ZhtrainError, match="byte-level pre-tokenizer|SentencePiece tokenizer"):
        tokenizer_main(
            [
                "extend",
                "--tokenizer_name_or_path",
                str(sp_tokenizer_dir),
                "--corpus",
                str(corpus),
                "--output_dir",
                str(tmp_path / "o"),
            ]
        )
