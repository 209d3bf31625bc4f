"""Conversation data files: formats, JSON/JSONL, every bad input with its file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import sharegpt_records, write_alpaca, write_sharegpt

from zhtrain.data.chat import find_data_files, load_conversations
from zhtrain.errors import ZhtrainError


def load(path, fmt="auto"):
    return load_conversations([Path(path)], fmt)


def test_sharegpt_openai_alpaca_json_and_jsonl_give_the_same_messages(tmp_path):
    share = load(write_sharegpt(tmp_path / "share.json"))
    openai = [{"messages": [{"role": m["role"], "content": m["content"]} for m in c.messages]} for c in share]
    (tmp_path / "openai.jsonl").write_text(
        "\n".join(json.dumps(r, ensure_ascii=False) for r in openai) + "\n\n", encoding="utf-8"
    )
    assert [c.messages for c in load(tmp_path / "openai.jsonl")] == [c.messages for c in share]
    assert share[0].id == "conv_0_0" and share[1].messages[0]["role"] == "system"
    # FastChat data may say user/assistant in "from"; a .json file may hold JSONL.
    records = sharegpt_records()
    for record in records:
        for turn in record["conversations"]:
            turn["from"] = {"human": "user", "gpt": "assistant"}.get(turn["from"], turn["from"])
    (tmp_path / "lines.json").write_text(
        "\n".join(json.dumps(r, ensure_ascii=False) for r in records), encoding="utf-8"
    )
    assert [c.messages for c in load(tmp_path / "lines.json")] == [c.messages for c in share]


def test_alpaca_records_join_input_as_the_reference_does(tmp_path):
    conversations = load(write_alpaca(tmp_path / "a.json", n=2))
    assert conversations[0].messages == [
        {"role": "user", "content": "把数字 0 写成中文\n用一个字"},
        {"role": "assistant", "content": "一"},
    ]
    assert conversations[1].messages[0]["content"] == "把数字 1 写成中文"
    assert conversations[1].id == "a.json:2"


def test_folder_and_comma_lists_and_final_unanswered_question(tmp_path):
    write_alpaca(tmp_path / "d" / "x.json", n=3)
    write_sharegpt(tmp_path / "d" / "y.json")
    (tmp_path / "d" / "notes.txt").write_text("ignored")
    files = find_data_files(str(tmp_path / "d"), "--dataset_dir")
    assert [f.name for f in files] == ["x.json", "y.json"]
    assert len(find_data_files(f"{files[0]},{files[1]}", "--data_path")) == 2
    record = {
        "conversations": [
            {"from": "human", "value": "a"},
            {"from": "gpt", "value": "b"},
            {"from": "human", "value": "c"},
        ]
    }
    (tmp_path / "u.json").write_text(json.dumps([record]))
    (conversation,) = load(tmp_path / "u.json")
    assert conversation.unanswered == 1 and [m["content"] for m in conversation.messages] == ["a", "b"]


BAD_RECORD_CASES = {
    "roles not alternating": (
        [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}, {"from": "gpt", "value": "c"}],
        r"message 2: role 'user' where 'assistant' is expected; roles must alternate",
    ),
    "starts with the assistant": (
        [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}, {"from": "gpt", "value": "c"}],
        r"message 1: role 'assistant' where 'user' is expected",
    ),
    "empty value": (
        [{"from": "human", "value": "a"}, {"from": "gpt", "value": "  "}],
        r"message 2: 'value' is empty; remove the message or the record",
    ),
    "non-string value": (
        [{"from": "human", "value": ["a"]}, {"from": "gpt", "value": "b"}],
        r"message 1: 'value' is a list, not a string",
    ),
    "missing value": (
        [{"from": "human"}, {"from": "gpt", "value": "b"}],
        r"message 1: 'value' is missing",
    ),
    "unknown role": (
        [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}],
        r"message 2: unknown role 'bot' in 'from'; use one of human, user, gpt, assistant, system",
    ),
    "role that is a list": (
        [{"from": ["human"], "value": "a"}, {"from": "gpt", "value": "b"}],
        r"message 1: unknown role \['human'\] in 'from'; use one of human",
    ),
}


@pytest.mark.parametrize("case", list(BAD_RECORD_CASES))
def test_bad_records_name_file_line_record_and_message(tmp_path, case):
    turns, pattern = BAD_RECORD_CASES[case]
    path = tmp_path / "bad.json"
    good = {"id": "ok", "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]}
    path.write_text("[\n" + json.dumps(good) + ",\n" + json.dumps({"id": "bad", "conversations": turns}) + "\n]")
    with pytest.raises(ZhtrainError, match=f"^{path}: line 3 \\(record 2\\), " + pattern):
        load(path)


@pytest.mark.parametrize(
    "text, pattern",
    [
        (
            '[\n{"instruction": "a", "output": "b"},\n{"conversations": [}\n]',
            r"line 3: invalid JSON \(Expecting value\)",
        ),
        (
            '[\n{"instruction": "a", "output": "b"}\n{"b": 2}\n]',
            r"line 3: invalid JSON \(expected ',' or ']' after a record\)",
        ),
        ('[\n{"instruction": "a", "output": "b"},\n', r"line 3: invalid JSON \(Expecting value\)"),
        ('[{"instruction": "a", "output": "b"}] x', r"line 1: invalid JSON \(extra data after the list\)"),
        ("hello", r"line 1: expected a JSON list"),
        (
            '[\n{"instruction": "a", "output": "b"},\n' + "[" * 100_000 + "]" * 100_000 + "\n]",
            r"line 3: JSON nested too deeply",
        ),
    ],
    ids=["bad-value", "missing-comma", "unterminated", "extra-data", "not-json", "nested-too-deep"],
)
def test_malformed_json_names_the_line(tmp_path, text, pattern):
    path = tmp_path / "broken.json"
    path.write_text(text)
    with pytest.raises(ZhtrainError, match=f"^{path}: {pattern}"):
        load(path)


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(
        '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n\n{"messages": [\n'
    )
    with pytest.raises(ZhtrainError, match=f"^{path}: line 3: invalid JSON"):
        load(path)


def test_deeply_nested_jsonl_line_names_the_line(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_text(
        '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
        + "[" * 100_000
        + "]" * 100_000
        + "\n"
    )
    with pytest.raises(ZhtrainError, match=f"^{path}: line 2: JSON nested too deeply"):
        load(path)


def test_unknown_format_and_forced_format(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n')
    with pytest.raises(ZhtrainError, match=r"line 1: unknown record format \(keys: completion, prompt\)"):
        load(path)
    alpaca = write_alpaca(tmp_path / "a.json", n=1)
    with pytest.raises(ZhtrainError, match="'conversations' must be a list of messages .* pass --data_format"):
        load(alpaca, "sharegpt")
    with pytest.raises(ZhtrainError, match="--data_format csv: unknown"):
        load(alpaca, "csv")


def test_empty_dataset_and_missing_paths(tmp_path):
    (tmp_path / "empty.json").write_text("[]")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(ZhtrainError, match="empty dataset: no records in"):
        load_conversations([tmp_path / "empty.json", tmp_path / "blank.jsonl"])
    with pytest.raises(ZhtrainError, match="--data_path .*missing.json: no such file or folder"):
        find_data_files(str(tmp_path / "missing.json"), "--data_path")
    (tmp_path / "dir").mkdir()
    with pytest.raises(ZhtrainError, match=r"--dataset_dir .*dir: no \*.json or \*.jsonl files"):
        find_data_files(str(tmp_path / "dir"), "--dataset_dir")
