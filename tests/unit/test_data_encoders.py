"""The fast tokenization paths give the HF tokenizer's ids: sentencepiece, tokenizers, workers."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import SHARED_CORPUS, SHARED_TOKENIZERS, make_lines

from zhtrain.data import text
from zhtrain.data.encoders import DocumentEncoder, SentencePieceEncoder, TokenizersEncoder, choose_encoder
from zhtrain.data.text import build_token_cache, find_text_files
from zhtrain.tokenizer.loading import load_tokenizer

VARIED_TEXT = (
    "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。\n"
    "\n"
    "   \n"
    "  two leading spaces and  two  inside\n"
    "trailing spaces   \n"
    "\ttabs\tand\u3000全角空格\n"
    "emoji 😀🎉👍🏽 rare CJK 𠀀𪚥 龘 (byte fallback)\n"
    "１９９８年１月１日，ＡＢＣ全角与半角 2024 混排\n"
    "mixed 中文 English 123 — “引号” 《书名》\n"
    "<s> and </s> written as text, <unk> too\n"
    "windows line end\r\n"
    "\n"
    "last line without a newline"
)


@pytest.fixture(scope="module")
def tokenizer(sp_tokenizer_dir):
    return load_tokenizer(str(sp_tokenizer_dir))


def hf_stream(tokenizer, path: Path) -> list[int]:
    """What the HF tokenizer gives, document by document: [BOS] ids [EOS] per non-blank line."""
    ids: list[int] = []
    for line in path.read_text(encoding="utf-8").split("\n"):
        line = line.rstrip("\r")
        if line.strip():
            ids += [
                tokenizer.bos_token_id,
                *tokenizer(line, add_special_tokens=False)["input_ids"],
                tokenizer.eos_token_id,
            ]
    return ids


def cached_stream(entries) -> list[int]:
    return np.concatenate([np.fromfile(e.tokens_path, dtype=e.dtype) for e in entries]).tolist()


def encoder_name(caplog) -> str:
    chosen = [r.getMessage() for r in caplog.records if r.getMessage().startswith("tokenizing with")]
    assert chosen, "the chosen tokenization path is logged"
    return chosen[-1]


def test_sentencepiece_path_gives_the_hf_ids_on_varied_text(tmp_path, tokenizer, caplog):
    data = tmp_path / "d"
    data.mkdir()
    (data / "a.txt").write_text(VARIED_TEXT, encoding="utf-8")
    with caplog.at_level(logging.INFO, logger="zhtrain"):
        entries, stats = build_token_cache(find_text_files(str(data)), tokenizer, tmp_path / "c", show_progress=False)
    assert "sentencepiece" in encoder_name(caplog)
    want = hf_stream(tokenizer, data / "a.txt")
    assert cached_stream(entries) == want and stats.lines == 10


def test_added_tokens_in_text_follow_the_hf_tokenizer(tmp_path, sp_tokenizer_dir):
    extended = load_tokenizer(str(sp_tokenizer_dir))
    extended.add_tokens(["黄河入海流", "[PAD]"])
    lines = ["白日依山尽，黄河入海流。", "[PAD] 在中间 [PAD]", "plain line"]
    encoder = choose_encoder(extended, lines)
    assert isinstance(encoder, SentencePieceEncoder)
    assert encoder(lines) == extended(lines, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("eos_matches", [True, False])
def test_document_ends_added_by_sentencepiece_equal_the_numpy_path(sp_tokenizer_dir, eos_matches):
    """BOS/EOS come from sentencepiece's own add_bos/add_eos when its ids are the tokenizer's (lines
    with added-token text included), else from the numpy pass; the documents are the same either way."""
    extended = load_tokenizer(str(sp_tokenizer_dir))
    extended.add_tokens(["黄河入海流"])
    lines = ["白日依山尽，黄河入海流。", "plain line", "x"]
    encoder = choose_encoder(extended, lines)
    bos, eos = extended.bos_token_id, extended.eos_token_id if eos_matches else extended.unk_token_id
    document = DocumentEncoder(encoder, bos, eos, np.dtype(np.uint32))
    assert (document.encode is not encoder) == eos_matches
    want = [t for ids in extended(lines, add_special_tokens=False)["input_ids"] for t in [bos, *ids, eos]]
    assert document(lines).tolist() == want


def test_a_mismatching_fast_path_is_not_used(tmp_path, sp_tokenizer_dir, caplog):
    """A tokenizer.model that does not give the HF tokenizer's ids (here: another model beside the fixture's
    tokenizer.json, loaded with --tokenizer_backend tokenizers) is detected and skipped."""
    import sentencepiece as spm

    folder = tmp_path / "tok"
    shutil.copytree(sp_tokenizer_dir, folder)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(make_lines(500, seed=5)),
        model_prefix=str(tmp_path / "other"),
        vocab_size=450,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        minloglevel=2,
    )
    shutil.copyfile(tmp_path / "other.model", folder / "tokenizer.model")
    mismatched = load_tokenizer(str(folder), backend="tokenizers")
    data = tmp_path / "d"
    data.mkdir()
    (data / "a.txt").write_text(VARIED_TEXT, encoding="utf-8")
    with caplog.at_level(logging.INFO, logger="zhtrain"):
        entries, _ = build_token_cache(find_text_files(str(data)), mismatched, tmp_path / "c", show_progress=False)
    assert "not tokenizing with sentencepiece: differs on" in caplog.text
    assert "tokenizing with tokenizers" in encoder_name(caplog)
    assert cached_stream(entries) == hf_stream(mismatched, data / "a.txt")


def test_fast_and_hf_paths_write_identical_caches_with_workers(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(text, "BATCH_BYTES", 4096)  # many blocks, so the worker pool is used
    data = tmp_path / "d"
    data.mkdir()
    (data / "a.txt").write_text("\n".join(make_lines(1500)) + "\n\n" + VARIED_TEXT, encoding="utf-8")
    files = find_text_files(str(data))
    fast, _ = build_token_cache(files, tokenizer, tmp_path / "c1", workers=2, show_progress=False)
    plain, _ = build_token_cache(
        files, tokenizer, tmp_path / "c2", workers=1, show_progress=False, fast_tokenization=False
    )
    assert cached_stream(fast) == cached_stream(plain) == hf_stream(tokenizer, data / "a.txt")
    # The content digest taken from the blocks while tokenizing is the one the cache lookup computes.
    again, stats = build_token_cache(files, tokenizer, tmp_path / "c1", workers=2, show_progress=False)
    assert [entry.from_cache for entry in again] == [True] and stats.tokenized_tokens == 0


def test_a_bad_byte_found_by_a_worker_names_file_byte_and_line(tmp_path, tokenizer, monkeypatch):
    from zhtrain.errors import ZhtrainError

    monkeypatch.setattr(text, "BATCH_BYTES", 1024)
    data = tmp_path / "d"
    data.mkdir()
    good = "白日依山尽，黄河入海流。\n" * 400
    (data / "a.txt").write_bytes(good.encode() + b"\xff bad\n")
    with pytest.raises(ZhtrainError, match=rf"a.txt: not valid UTF-8 at byte {len(good.encode())} \(line 401\)"):
        build_token_cache(find_text_files(str(data)), tokenizer, tmp_path / "c", workers=2, show_progress=False)
    assert not list((tmp_path / "c").glob("*.tmp-*"))


@pytest.mark.skipif(
    not (SHARED_TOKENIZERS / "llama-32000.model").is_file() or not SHARED_CORPUS.is_file(),
    reason="real LLaMA tokenizer / People's Daily not present (../shared/data)",
)
def test_real_llama_tokenizer_fast_path_on_real_chinese(tmp_path, caplog):
    from transformers import AutoTokenizer

    folder = tmp_path / "llama"
    folder.mkdir()
    shutil.copyfile(SHARED_TOKENIZERS / "llama-32000.model", folder / "tokenizer.model")
    llama = AutoTokenizer.from_pretrained(str(folder))
    lines = [line for line in SHARED_CORPUS.read_text(encoding="utf-8").split("\n") if line.strip()][:2000]
    with caplog.at_level(logging.INFO, logger="zhtrain"):
        encoder = choose_encoder(llama, lines)
    assert isinstance(encoder, SentencePieceEncoder)
    assert encoder(lines) == llama(lines, add_special_tokens=False)["input_ids"]


def test_tokenizers_path_equals_hf_call(sp_tokenizer_dir):
    tokenizer = load_tokenizer(str(sp_tokenizer_dir), backend="tokenizers")
    lines = make_lines(50) + ["  spaced  out ", "😀 𠀀"]
    assert (
        TokenizersEncoder(tokenizer.backend_tokenizer)(lines) == tokenizer(lines, add_special_tokens=False)["input_ids"]
    )


def test_data_preparation_takes_raw_sentencepiece(sp_tokenizer_dir):
    tokenizer = load_tokenizer(str(sp_tokenizer_dir))
    assert isinstance(choose_encoder(tokenizer, ["some sample line", "another one"]), SentencePieceEncoder)
