"""`zhtrain tokenizer train | merge | extend`: tiny models trained in-process, the real 49953 merge when
`../shared/data/tokenizers` exists, and each bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures import chinese_lines, make_bpe_tokenizer, write_corpus

from zhtrain.build_tokenizer import main as tokenizer_main
from zhtrain.errors import ZhtrainError

REAL = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "tokenizers"
LLAMA, CHINESE = REAL / "llama-32000.model", REAL / "chinese_sp-20000.model"
needs_real = pytest.mark.skipif(
    not (LLAMA.is_file() and CHINESE.is_file()),
    reason=f"real tokenizers not found in {REAL} (llama-32000.model, chinese_sp-20000.model)",
)
POEM = "白日依山尽，黄河入海流。"


def sp(path):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(path))


@pytest.fixture(scope="module")
def chinese_sp_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("zh_sp")
    corpus = write_corpus(folder / "corpus" / "zh.txt", chinese_lines(2000))
    tokenizer_main(
        ["train", "--corpus", str(corpus.parent), "--vocab_size", "300", "--output_dir", str(folder / "out")]
    )
    return folder / "out" / "chinese_sp.model"


# ---------------------------------------------------------------------------------------------
# train + merge on tiny models


def test_train_writes_a_sentencepiece_model_of_the_asked_size(chinese_sp_model):
    model = sp(chinese_sp_model)
    assert model.get_piece_size() == 300
    assert chinese_sp_model.with_suffix(".vocab").is_file()
    record = json.loads((chinese_sp_model.parent / "zhtrain_tokenizer.json").read_text())
    assert record["lines"] == 2000 and record["arguments"]["model_type"] == "unigram"
    assert "黄河" in {model.id_to_piece(i).lstrip("▁") for i in range(300)}


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


# ---------------------------------------------------------------------------------------------
# The real files: 49953 / 49954


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
@pytest.mark.slow
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
@pytest.mark.slow
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


# ---------------------------------------------------------------------------------------------
# extend a byte-level BPE


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> Path:
    return make_bpe_tokenizer(tmp_path_factory.mktemp("bpe") / "base")


@pytest.fixture(scope="module")
def extended(bpe_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ext")
    corpus = write_corpus(folder / "zh.txt", chinese_lines(1500))
    out = folder / "out"
    tokenizer_main(
        [
            "extend",
            "--tokenizer_name_or_path",
            str(bpe_dir),
            "--corpus",
            str(corpus),
            "--num_new_tokens",
            "200",
            "--output_dir",
            str(out),
        ]
    )
    return out


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


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming the input, nothing written


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zhtrain", "tokenizer", *args], capture_output=True, text=True)


@pytest.mark.slow  # a fresh interpreter importing transformers
def test_cli_reports_a_bad_model_file_in_one_line(tmp_path, sp_tokenizer_dir):
    bogus = tmp_path / "chinese_sp.model"
    bogus.write_bytes(b"this is not a sentencepiece model\n" * 20)
    result = run_cli(
        "merge",
        "--llama_tokenizer_dir",
        str(sp_tokenizer_dir),
        "--chinese_sp_model_file",
        str(bogus),
        "--output_dir",
        str(tmp_path / "o"),
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert (
        lines[-1].startswith("zhtrain: error: --chinese_sp_model_file")
        and "not a SentencePiece model file" in lines[-1]
    )
    assert not (tmp_path / "o").exists()


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


def test_vocab_size_beyond_the_corpus_is_explained(tmp_path):
    corpus = write_corpus(tmp_path / "small.txt", chinese_lines(200))
    with pytest.raises(
        ZhtrainError, match=r"--vocab_size 50000: the corpus .* supports at most \d+ pieces; lower --vocab_size"
    ):
        tokenizer_main(["train", "--corpus", str(corpus), "--vocab_size", "50000", "--output_dir", str(tmp_path / "o")])
    with pytest.raises(ZhtrainError, match=r"--vocab_size 20: the corpus .* has \d+ distinct characters to cover"):
        tokenizer_main(["train", "--corpus", str(corpus), "--vocab_size", "20", "--output_dir", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.tmp-*"))


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


def test_unknown_subcommand(tmp_path):
    with pytest.raises(ZhtrainError, match="unknown subcommand 'grow'; choose one of: train, merge, extend"):
        tokenizer_main(["grow"])


# ---------------------------------------------------------------------------------------------
# zhtrain inspect


def test_inspect_reports_mode_new_rows_sample_and_a_cost_that_peft_agrees_with(
    sp_tokenizer_dir, chinese_sp_model, tiny_model_dir, tmp_path, capsys
):
    import shutil

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from zhtrain.inspect import main as inspect_main

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    for item in sp_tokenizer_dir.iterdir():
        shutil.copy(item, model_dir / item.name)
    merged = tmp_path / "merged"
    tokenizer_main(
        [
            "merge",
            "--llama_tokenizer_dir",
            str(sp_tokenizer_dir),
            "--chinese_sp_model_file",
            str(chinese_sp_model),
            "--output_dir",
            str(merged),
        ]
    )
    sample = write_corpus(tmp_path / "sample.txt", chinese_lines(100, seed=9))
    capsys.readouterr()
    inspect_main(
        ["--model_name_or_path", str(model_dir), "--tokenizer_name_or_path", str(merged), "--sample", str(sample)]
    )
    out = capsys.readouterr().out
    from transformers import AutoTokenizer

    size = len(AutoTokenizer.from_pretrained(str(merged)))
    assert f"custom vocabulary: model resized from 400 to {size} tokens" in out
    assert "the first 400 ids are the model tokenizer's: this tokenizer extends it" in out
    assert (
        f"new rows  {size - 400:,}; --new_token_init subword_mean starts {size - 400:,} from their base pieces" in out
    )
    assert "100 lines of" in out and "tokens per character (the model's own tokenizer:" in out
    # The Stage-2 figure is what PEFT counts on the real (resized) model.
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    model.resize_token_embeddings(size)
    peft = get_peft_model(
        model,
        LoraConfig(
            r=8,
            target_modules=["q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "down_proj", "up_proj"],
            modules_to_save=["embed_tokens", "lm_head"],
        ),
    )
    trainable = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    assert f"{trainable:,} trainable of" in out


def test_inspect_says_why_no_mode_applies(sp_tokenizer_dir, tmp_path, capsys):
    from fixtures import make_tiny_llama

    from zhtrain.inspect import main as inspect_main

    model_dir = make_tiny_llama(tmp_path / "big", vocab_size=500)
    inspect_main(["--model_name_or_path", str(model_dir), "--tokenizer_name_or_path", str(sp_tokenizer_dir)])
    assert "mode  none: tokenizer has 400 tokens but the model has 500 embedding rows" in capsys.readouterr().out


def test_demo_extension_step_reports_tokens_per_character(bpe_dir, tmp_path):
    from zhtrain import demo

    data = tmp_path / "data"
    write_corpus(data / "news.txt", chinese_lines(600))
    opts = demo.DemoOptions(
        output_dir=tmp_path / "run", max_steps=1, train_lines=600, learning_rate=1e-3, eval_blocks=1, new_tokens=50
    )
    folder, measured = demo.extend_tokenizer(bpe_dir, data, opts)
    assert folder == tmp_path / "run" / "tokenizer" and (folder / "tokenizer.json").is_file()
    assert measured["lines"] == 12 and measured["extended"] < measured["base"]
    assert "--new_token_init" in demo.pretrain_flags(bpe_dir, data, opts, folder)
    assert demo.pretrain_flags(bpe_dir, data, opts, folder)[3] == str(folder)
