"""SentencePiece models merged as Chinese-LLaMA's: pieces appended in order, [PAD], the real 49953/49954 merges when
`../shared/data/tokenizers` exists, and the bases and corpora that cannot work."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import SHARED_TOKENIZERS, chinese_lines, needs_shared_tokenizers, sp, write_corpus

from zhtrain.build_tokenizer import main as tokenizer_main
from zhtrain.errors import ZhtrainError

LLAMA, CHINESE = SHARED_TOKENIZERS / "llama-32000.model", SHARED_TOKENIZERS / "chinese_sp-20000.model"
needs_real = needs_shared_tokenizers


POEM = "白日依山尽，黄河入海流。"


def test_merge_appends_missing_pieces_in_order_and_keeps_every_base_id(sp_tokenizer_dir, chinese_sp_model, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "merged"
    tokenizer_main(
        [
            "merge",
            "--llama_tokenizer_dir",
            str(sp_tokenizer_dir),
            "--chinese_sp_model_file",
            str(chinese_sp_model),
            "--output_dir",
            str(out),
        ]
    )
    base, chinese, merged = sp(sp_tokenizer_dir / "tokenizer.model"), sp(chinese_sp_model), sp(out / "tokenizer.model")
    base_pieces = [base.id_to_piece(i) for i in range(base.get_piece_size())]
    expected_new = [
        chinese.id_to_piece(i)
        for i in range(chinese.get_piece_size())
        if chinese.id_to_piece(i) not in base_pieces and not chinese.is_control(i) and not chinese.is_unknown(i)
    ]
    assert expected_new and merged.get_piece_size() == len(base_pieces) + len(expected_new)
    assert [merged.id_to_piece(i) for i in range(merged.get_piece_size())] == base_pieces + expected_new
    for i in range(len(base_pieces)):
        assert merged.get_score(i) == base.get_score(i) and merged.decode([i]) == base.decode([i])
    assert all(merged.get_score(i) == 0 for i in range(len(base_pieces), merged.get_piece_size()))
    hf = AutoTokenizer.from_pretrained(str(out))
    assert len(hf) == merged.get_piece_size()
    assert hf("黄河")["input_ids"][0] == hf.bos_token_id == 1  # LLaMA adds <s>
    assert hf.decode(hf(POEM, add_special_tokens=False)["input_ids"]) == POEM


def test_add_pad_token_appends_pad_as_a_control_piece(sp_tokenizer_dir, chinese_sp_model, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "alpaca"
    tokenizer_main(
        [
            "merge",
            "--llama_tokenizer_dir",
            str(sp_tokenizer_dir / "tokenizer.model"),
            "--chinese_sp_model_file",
            str(chinese_sp_model),
            "--output_dir",
            str(out),
            "--add_pad_token",
        ]
    )
    merged = sp(out / "tokenizer.model")
    pad = merged.get_piece_size() - 1
    assert merged.id_to_piece(pad) == "[PAD]" and merged.is_control(pad)
    assert merged.encode("[PAD]") != [pad]  # never produced from text by sentencepiece
    hf = AutoTokenizer.from_pretrained(str(out))
    assert len(hf) == merged.get_piece_size() and hf.pad_token == "[PAD]" and hf.pad_token_id == pad


@pytest.fixture(scope="module")
def real_merged(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("real") / "chinese_llama"
    tokenizer_main(
        [
            "merge",
            "--llama_tokenizer_dir",
            str(LLAMA),
            "--chinese_sp_model_file",
            str(CHINESE),
            "--output_dir",
            str(out),
        ]
    )
    return out


@needs_real
def test_real_merge_is_the_chinese_llama_tokenizer(real_merged):
    from transformers import AutoTokenizer

    from zhtrain.tokenizer.sentencepiece_model import read_model

    base, merged = sp(LLAMA), sp(real_merged / "tokenizer.model")
    assert merged.get_piece_size() == 49953
    assert merged.encode(POEM, out_type=str) == "▁白 日 依 山 尽 ， 黄河 入 海 流 。".split()
    for i in range(32000):
        assert merged.id_to_piece(i) == base.id_to_piece(i) and merged.decode([i]) == base.decode([i])
    base_proto, merged_proto = read_model(LLAMA, "base"), read_model(real_merged / "tokenizer.model", "merged")
    assert (
        merged_proto.normalizer_spec == base_proto.normalizer_spec
        and merged_proto.trainer_spec == base_proto.trainer_spec
    )
    assert merged_proto.trainer_spec.byte_fallback
    hf = AutoTokenizer.from_pretrained(str(real_merged))
    assert len(hf) == 49953
    assert hf.convert_ids_to_tokens(hf(POEM)["input_ids"]) == ["<s>"] + "▁白 日 依 山 尽 ， 黄河 入 海 流 。".split()
    english = "Hello world, this is a test of the English text."
    assert hf(english, add_special_tokens=False)["input_ids"] == merged.encode(english) == base.encode(english)
    # Known limit (see README): with 17,953 pieces all at score 0, sentencepiece breaks ties by position,
    # which no BPE merge ranking can copy: transformers' fast tokenizer segments some lines differently
    # (same text, about as many tokens). Both always spell the same text.
    line = "中国人民决心继承邓小平同志的遗志，继续把建设有中国特色社会主义事业全面推向二十一世纪。"
    assert hf.decode(hf(line, add_special_tokens=False)["input_ids"]) == merged.decode(merged.encode(line)) == line


@needs_real
def test_real_merge_with_pad_token_has_49954(tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "chinese_alpaca"
    tokenizer_main(
        [
            "merge",
            "--llama_tokenizer_dir",
            str(LLAMA),
            "--chinese_sp_model_file",
            str(CHINESE),
            "--output_dir",
            str(out),
            "--add_pad_token",
        ]
    )
    hf = AutoTokenizer.from_pretrained(str(out))
    assert len(hf) == 49954 and sp(out / "tokenizer.model").get_piece_size() == 49954
    assert hf.pad_token == "[PAD]" and hf.pad_token_id == 49953


def test_merge_refuses_a_non_sentencepiece_base(bpe_dir, chinese_sp_model, tmp_path):
    with pytest.raises(ZhtrainError, match="not a SentencePiece tokenizer.*zhtrain tokenizer extend"):
        tokenizer_main(
            [
                "merge",
                "--llama_tokenizer_dir",
                str(bpe_dir),
                "--chinese_sp_model_file",
                str(chinese_sp_model),
                "--output_dir",
                str(tmp_path / "o"),
            ]
        )
    with pytest.raises(ZhtrainError, match="not a SentencePiece model file"):  # a tokenizer.json passed as the .model
        tokenizer_main(
            [
                "merge",
                "--llama_tokenizer_dir",
                str(bpe_dir / "tokenizer.json"),
                "--chinese_sp_model_file",
                str(chinese_sp_model),
                "--output_dir",
                str(tmp_path / "o"),
            ]
        )


def test_merge_refuses_a_unigram_base(chinese_sp_model, tmp_path):
    with pytest.raises(ZhtrainError, match="UNIGRAM model; merge appends pieces with score 0"):
        tokenizer_main(
            [
                "merge",
                "--llama_tokenizer_dir",
                str(chinese_sp_model),
                "--chinese_sp_model_file",
                str(chinese_sp_model),
                "--output_dir",
                str(tmp_path / "o"),
            ]
        )


def test_vocab_size_beyond_the_corpus_is_explained(tmp_path):
    corpus = write_corpus(tmp_path / "small.txt", chinese_lines(200))
    with pytest.raises(
        ZhtrainError, match=r"--vocab_size 50000: the corpus .* supports at most \d+ pieces; lower --vocab_size"
    ):
        tokenizer_main(["train", "--corpus", str(corpus), "--vocab_size", "50000", "--output_dir", str(tmp_path / "o")])
    with pytest.raises(ZhtrainError, match=r"--vocab_size 20: the corpus .* has \d+ distinct characters to cover"):
        tokenizer_main(["train", "--corpus", str(corpus), "--vocab_size", "20", "--output_dir", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.tmp-*"))
