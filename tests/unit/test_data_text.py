"""The text pipeline: documents -> [BOS] ids [EOS] -> cached arrays -> blocks -> split."""

from __future__ import annotations

import json

import numpy as np
import pytest

from zhtrain.data import text
from zhtrain.data.text import (
    build_token_cache,
    count_blocks,
    find_text_files,
    iter_line_batches,
    load_text_blocks,
    split_indices,
)
from zhtrain.errors import ZhtrainError
from zhtrain.tokenizer.loading import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(sp_tokenizer_dir):
    return load_tokenizer(str(sp_tokenizer_dir))


def expected_stream(tokenizer, lines):
    ids = []
    for line in lines:
        ids += (
            [tokenizer.bos_token_id] + tokenizer(line, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        )
    return ids


def test_each_line_is_a_document_with_bos_and_eos(tmp_path, tokenizer):
    data = tmp_path / "d"
    data.mkdir()
    (data / "a.txt").write_text("白日依山尽\n\n   \n黄河入海流\r\nhello world\n", encoding="utf-8")
    train, _, stats = load_text_blocks(str(data), tokenizer, 4, str(tmp_path / "c"), 0.0, show_progress=False)
    stream = expected_stream(tokenizer, ["白日依山尽", "黄河入海流", "hello world"])
    assert stats.lines == 3 and stats.tokens == len(stream)
    got = np.concatenate([train[i]["input_ids"].numpy() for i in range(len(train))])
    assert got.tolist() == stream[: len(train) * 4]
    assert train[0]["labels"].tolist() == train[0]["input_ids"].tolist()


def test_blocks_run_across_files_in_name_order(tmp_path, tokenizer):
    data = tmp_path / "d"
    data.mkdir()
    (data / "b.txt").write_text("黄河入海流\n", encoding="utf-8")
    (data / "a.txt").write_text("白日依山尽\n", encoding="utf-8")
    train, _, stats = load_text_blocks(str(data), tokenizer, 3, str(tmp_path / "c"), 0.0, show_progress=False)
    stream = expected_stream(tokenizer, ["白日依山尽", "黄河入海流"])
    assert len(train) == len(stream) // 3
    assert (
        np.concatenate([train[i]["input_ids"].numpy() for i in range(len(train))]).tolist() == stream[: len(train) * 3]
    )


def test_short_corpus_gives_one_short_block(tmp_path, tokenizer):
    data = tmp_path / "d"
    data.mkdir()
    (data / "a.txt").write_text("白日\n", encoding="utf-8")
    train, evaluation, stats = load_text_blocks(
        str(data), tokenizer, 512, str(tmp_path / "c"), 0.05, show_progress=False
    )
    assert len(train) == 1 and evaluation is None
    assert len(train[0]["input_ids"]) == stats.tokens < 512


def test_split_is_a_fraction_and_deterministic():
    train, evaluation = split_indices(1000, 0.001)
    assert len(evaluation) == 1 and len(train) == 999
    train2, evaluation2 = split_indices(1000, 0.001)
    assert evaluation.tolist() == evaluation2.tolist()
    train, evaluation = split_indices(100, 0.05)
    assert len(evaluation) == 5 and set(train).isdisjoint(evaluation) and len(set(train) | set(evaluation)) == 100
    assert split_indices(1, 0.5)[1].size == 0  # never every block
    assert count_blocks(1030, 512) == 2
    with pytest.raises(ZhtrainError, match="fraction"):
        split_indices(10, 5.0)


def test_files_are_streamed_in_batches(tmp_path):
    path = tmp_path / "big.txt"
    path.write_text("\n".join(["一二三四五六七八九十"] * 1000), encoding="utf-8")
    batches = list(iter_line_batches(path, batch_bytes=4096))
    assert len(batches) > 5 and sum(len(b) for b in batches) == 1000


def test_cache_is_reused_and_invalidated_per_file(tmp_path, tokenizer, sp_tokenizer_dir):
    data = tmp_path / "d"
    data.mkdir()
    (data / "a.txt").write_text("白日依山尽\n" * 50, encoding="utf-8")
    (data / "b.txt").write_text("黄河入海流\n" * 50, encoding="utf-8")
    cache = tmp_path / "cache"
    files = find_text_files(str(data))
    first, stats1 = build_token_cache(files, tokenizer, cache, show_progress=False)
    assert [f.from_cache for f in first] == [False, False] and stats1.tokenized_tokens == stats1.tokens
    again, stats2 = build_token_cache(files, tokenizer, cache, show_progress=False)
    assert [f.from_cache for f in again] == [True, True] and stats2.tokenized_tokens == 0
    (data / "b.txt").write_text("黄河入海流\n" * 60, encoding="utf-8")  # changed content -> only b rebuilt
    changed, _ = build_token_cache(files, tokenizer, cache, show_progress=False)
    assert [f.from_cache for f in changed] == [True, False]
    # Another tokenizer (one more token) -> everything rebuilt.
    other = load_tokenizer(str(sp_tokenizer_dir))
    other.add_tokens(["黄河入海流"])
    rebuilt, _ = build_token_cache(files, other, cache, show_progress=False)
    assert [f.from_cache for f in rebuilt] == [False, False]
    # A different block size reuses the token cache (blocks are cut at load time).
    _, _, stats = load_text_blocks(str(data), tokenizer, 7, str(cache), 0.0, show_progress=False)
    assert stats.tokenized_tokens == 0 and stats.train_blocks == stats.tokens // 7
    # --overwrite_cache rebuilds.
    forced, _ = build_token_cache(files, tokenizer, cache, overwrite=True, show_progress=False)
    assert [f.from_cache for f in forced] == [False, False]


@pytest.mark.parametrize("damage", ["[]", '{"format_version": 0}', "{", "FORMAT"])
def test_a_damaged_cache_record_is_tokenized_again(tmp_path, tokenizer, damage):
    data = tmp_path / "d"
    data.mkdir()
    (data / "a.txt").write_text("白日依山尽\n" * 50, encoding="utf-8")
    cache = tmp_path / "cache"
    files = find_text_files(str(data))
    first, _ = build_token_cache(files, tokenizer, cache, show_progress=False)
    (record,) = cache.glob("a-*.json")
    if damage == "FORMAT":  # the right version, a field of the wrong type
        meta = json.loads(record.read_text())
        damage = json.dumps(dict(meta, n_tokens=str(meta["n_tokens"])))
    record.write_text(damage.replace('"format_version": 0', f'"format_version": {text.FORMAT_VERSION}'))
    again, stats = build_token_cache(files, tokenizer, cache, show_progress=False)
    assert [f.from_cache for f in again] == [False] and stats.tokenized_tokens == stats.tokens
    assert np.array_equal(
        np.fromfile(again[0].tokens_path, dtype=again[0].dtype), np.fromfile(first[0].tokens_path, dtype=first[0].dtype)
    )


def test_a_crash_keeps_finished_files(tmp_path, tokenizer):
    data = tmp_path / "d"
    data.mkdir()
    (data / "a.txt").write_text("白日依山尽\n" * 20, encoding="utf-8")
    (data / "b.txt").write_bytes("黄河\n".encode("utf-8") + b"\xff\xfe bad\n")
    cache = tmp_path / "cache"
    with pytest.raises(ZhtrainError):
        build_token_cache(find_text_files(str(data)), tokenizer, cache, show_progress=False)
    assert not list(cache.glob("*.tmp-*")), "no half-written file may remain"
    (data / "b.txt").write_text("黄河\n", encoding="utf-8")
    entries, _ = build_token_cache(find_text_files(str(data)), tokenizer, cache, show_progress=False)
    assert [e.from_cache for e in entries] == [True, False]


def test_worker_processes_give_the_same_tokens(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(text, "BATCH_BYTES", 2048)  # so a small file has many batches for the pool
    data = tmp_path / "d"
    data.mkdir()
    from helpers import make_lines

    (data / "a.txt").write_text("\n".join(make_lines(600)), encoding="utf-8")
    one, _ = build_token_cache(find_text_files(str(data)), tokenizer, tmp_path / "c1", workers=1, show_progress=False)
    two, _ = build_token_cache(find_text_files(str(data)), tokenizer, tmp_path / "c2", workers=2, show_progress=False)
    a = np.fromfile(one[0].tokens_path, dtype=one[0].dtype)
    b = np.fromfile(two[0].tokens_path, dtype=two[0].dtype)
    assert a.size > 0 and np.array_equal(a, b)


@pytest.mark.parametrize(
    "setup, pattern",
    [
        (lambda d: None, "no such folder"),
        (lambda d: d.mkdir(), "no \\*.txt files"),
        (lambda d: (d.mkdir(), (d / "notes.md").write_text("x")), "no \\*.txt files"),
        (lambda d: (d.mkdir(), (d / "a.txt").write_text(""), (d / "b.txt").write_text("\n \n")), "no text in 2"),
        (
            lambda d: (d.mkdir(), (d / "gbk.txt").write_bytes("好的\n".encode("utf-8") + "中文".encode("gbk"))),
            "gbk.txt: not valid UTF-8 at byte 7 \\(line 2\\)",
        ),
        (lambda d: (d.mkdir(), (d / "bin.txt").write_bytes(b"abc\x00\x01\x02")), "bin.txt: NUL byte at byte 3.*binary"),
    ],
    ids=["missing", "empty-dir", "no-txt", "all-empty", "not-utf8", "binary"],
)
def test_bad_dataset_dirs(tmp_path, tokenizer, setup, pattern):
    data = tmp_path / "d"
    setup(data)
    with pytest.raises(ZhtrainError, match=pattern):
        load_text_blocks(str(data), tokenizer, 8, str(tmp_path / "c"), 0.0, show_progress=False)


def test_empty_file_is_skipped_with_a_warning(tmp_path, tokenizer, caplog):
    data = tmp_path / "d"
    data.mkdir()
    (data / "empty.txt").write_text("")
    (data / "a.txt").write_text("白日依山尽\n", encoding="utf-8")
    _, _, stats = load_text_blocks(str(data), tokenizer, 4, str(tmp_path / "c"), 0.0, show_progress=False)
    assert stats.files == 1 and stats.skipped_empty == [str(data / "empty.txt")]
    assert "empty.txt: empty file, skipped" in caplog.text


@pytest.mark.parametrize("batch_bytes", [1, 3, 64, 1 << 20])
def test_blocks_end_at_line_ends_whatever_the_read_size(tmp_path, batch_bytes):
    """Blocks cover the file exactly, each ends at a line end (but the last), with the right first-line
    numbers, also when a line is many reads long (its reads are joined once, not re-copied per read)."""
    from zhtrain.data.text import iter_blocks

    path = tmp_path / "a.txt"
    content = ("黄河入海流" * 300 + "\n" + "短\n\n" + "x" * 1000 + "\n" + "末行").encode("utf-8")
    path.write_bytes(content)
    blocks = list(iter_blocks(path, batch_bytes))
    assert b"".join(b.data for b in blocks) == content
    assert all(b.data.endswith(b"\n") for b in blocks[:-1])
    for block in blocks:
        assert block.line_no == content[: block.offset].count(b"\n") + 1
        assert content[block.offset : block.offset + len(block.data)] == block.data
