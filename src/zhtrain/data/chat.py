"""Conversation and instruction files -> checked conversations of role/content messages.

Formats (auto-detected per file from its first record; `--data_format` forces one):

  sharegpt  FastChat / ShareGPT: {"id", "conversations": [{"from": "human"|"gpt"|"system", "value": str}]}
            ("user"/"assistant" are accepted for "from" too)
  openai    {"messages": [{"role": "system"|"user"|"assistant", "content": str}]}
  alpaca    Stanford/Chinese-Alpaca: {"instruction": str, "input": str (optional), "output": str}
            (+ optional "system"); as in the reference, a non-empty input joins the instruction
            after a newline.

Files are JSON (a list of records) or JSONL (one record per line; `.jsonl`, or a `.json` file
holding JSONL). Every problem is a ZhtrainError naming the file, the line (and record) and the fix.
A final user message without an answer is left out (nothing to train) and counted, never hidden.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from zhtrain.errors import ZhtrainError

logger = logging.getLogger(__name__)

FORMATS = ("sharegpt", "openai", "alpaca")
FORMAT_ALIASES = {"fastchat": "sharegpt", "conversations": "sharegpt", "messages": "openai"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
OPENAI_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
DATA_SUFFIXES = (".json", ".jsonl")


@dataclass
class Conversation:
    id: str
    messages: list[dict]  # [{"role", "content"}]: optional system, then user/assistant alternating
    where: str  # "file: line N" for messages about this sample
    unanswered: int = 0  # final user messages left out because no reply follows


@dataclass
class LoadStats:
    files: list[str] = field(default_factory=list)
    formats: dict = field(default_factory=dict)  # file -> format
    unanswered: int = 0


def find_data_files(spec: Optional[str], flag: str) -> list[Path]:
    """A file, a comma-separated list of files, or a folder (its *.json / *.jsonl)."""
    if not spec:
        return []
    files: list[Path] = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        path = Path(part)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in DATA_SUFFIXES and p.is_file())
            if not found:
                raise ZhtrainError(
                    f"{flag} {path}: no *.json or *.jsonl files in this folder; add your data files there"
                )
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise ZhtrainError(f"{flag} {path}: no such file or folder; pass a JSON/JSONL file or a folder of them")
    return files


def load_conversations(
    files: list[Path], data_format: str = "auto", stats: Optional[LoadStats] = None
) -> list[Conversation]:
    """Read and check every record of every file; an empty result is an error."""
    data_format = normalize_format(data_format)
    stats = stats if stats is not None else LoadStats()
    conversations: list[Conversation] = []
    for path in files:
        before = len(conversations)
        file_format = None if data_format == "auto" else data_format
        for index, (place, record) in enumerate(read_records(path)):
            where = f"{path}: {place}"
            if not isinstance(record, dict):
                raise ZhtrainError(f"{where}: a record must be a JSON object, not {type(record).__name__}")
            if file_format is None:
                file_format = detect_format(record, where)
            conversation = to_conversation(record, file_format, where, default_id=f"{path.name}:{index + 1}")
            stats.unanswered += conversation.unanswered
            conversations.append(conversation)
        if len(conversations) == before:
            logger.warning("%s: no records; skipped", path)
        stats.files.append(str(path))
        stats.formats[str(path)] = file_format
    if not conversations:
        names = ", ".join(str(p) for p in files) or "(no files)"
        raise ZhtrainError(f"empty dataset: no records in {names}; add conversations or instructions to the file(s)")
    return conversations


def normalize_format(name: str) -> str:
    name = FORMAT_ALIASES.get(name, name)
    if name not in FORMATS + ("auto",):
        raise ZhtrainError(f"--data_format {name}: unknown; choose auto, {', '.join(FORMATS)}")
    return name


# ---------------------------------------------------------------------------------------------
# Reading JSON / JSONL with line numbers


def read_records(path: Path) -> Iterator[tuple[str, object]]:
    """("line N" or "line N (record K)", record) for each record of a JSONL file or a JSON list."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ZhtrainError(f"{path}: not UTF-8 (byte {err.start}); convert the file to UTF-8") from err
    start = _skip_space(text, 0)
    if start == len(text):
        return
    if path.suffix == ".jsonl" or text[start] == "{":
        yield from _read_jsonl(path, text)
    elif text[start] == "[":
        for index, (line, record) in enumerate(_read_json_list(path, text, start)):
            yield f"line {line} (record {index + 1})", record
    else:
        line = text.count("\n", 0, start) + 1
        raise ZhtrainError(f"{path}: line {line}: expected a JSON list '[' or one JSON object per line; fix the file")


def _read_jsonl(path: Path, text: str) -> Iterator[tuple[str, object]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"line {number}", json.loads(line)
        except ValueError as err:
            raise ZhtrainError(f"{path}: line {number}: invalid JSON ({_reason(err)}); fix that line") from err
        except RecursionError as err:
            raise ZhtrainError(f"{path}: line {number}: JSON nested too deeply to be a record; fix that line") from err


def _read_json_list(path: Path, text: str, start: int) -> Iterator[tuple[int, object]]:
    """Decode a top-level list element by element, so records and errors carry line numbers."""
    decoder = json.JSONDecoder()
    lines = _LineCounter(text)
    position = _skip_space(text, start + 1)
    if position < len(text) and text[position] == "]":
        position += 1
    else:
        while True:
            try:
                value, end = decoder.raw_decode(text, position)
            except json.JSONDecodeError as err:
                raise ZhtrainError(f"{path}: line {lines.at(err.pos)}: invalid JSON ({err.msg}); fix the file") from err
            except RecursionError as err:
                raise ZhtrainError(
                    f"{path}: line {lines.at(position)}: JSON nested too deeply to be a record; fix the file"
                ) from err
            yield lines.at(position), value
            position = _skip_space(text, end)
            if position < len(text) and text[position] == ",":
                position = _skip_space(text, position + 1)
            elif position < len(text) and text[position] == "]":
                position += 1
                break
            else:
                what = (
                    "the list is not closed (missing ']')"
                    if position >= len(text)
                    else "expected ',' or ']' after a record"
                )
                raise ZhtrainError(f"{path}: line {lines.at(position)}: invalid JSON ({what}); fix the file")
    rest = _skip_space(text, position)
    if rest < len(text):
        raise ZhtrainError(f"{path}: line {lines.at(rest)}: invalid JSON (extra data after the list); fix the file")


class _LineCounter:
    """Line number of a character offset, counted incrementally (offsets mostly increase)."""

    def __init__(self, text: str):
        self.text, self.offset, self.line = text, 0, 1

    def at(self, offset: int) -> int:
        if offset < self.offset:
            self.offset, self.line = 0, 1
        self.line += self.text.count("\n", self.offset, offset)
        self.offset = offset
        return self.line


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


def _reason(err: ValueError) -> str:
    return getattr(err, "msg", str(err))


# ---------------------------------------------------------------------------------------------
# Records -> conversations


def detect_format(record: dict, where: str) -> str:
    if "conversations" in record:
        return "sharegpt"
    if "messages" in record:
        return "openai"
    if "instruction" in record and "output" in record:
        return "alpaca"
    keys = ", ".join(sorted(record)) or "none"
    raise ZhtrainError(
        f"{where}: unknown record format (keys: {keys}); expected 'conversations' (FastChat/ShareGPT), "
        "'messages' (OpenAI) or 'instruction'+'output' (Alpaca), or pass --data_format"
    )


def to_conversation(record: dict, data_format: str, where: str, default_id: str) -> Conversation:
    record_id = str(record.get("id", default_id))
    if data_format == "alpaca":
        messages = _alpaca_messages(record, where)
    else:
        key, role_key, text_key, roles = (
            ("conversations", "from", "value", SHAREGPT_ROLES)
            if data_format == "sharegpt"
            else ("messages", "role", "content", OPENAI_ROLES)
        )
        turns = record.get(key)
        if not isinstance(turns, list):
            raise ZhtrainError(
                f"{where}: '{key}' must be a list of messages (this file is read as {data_format}); fix the record or "
                "pass --data_format"
            )
        messages = [_message(turn, k, role_key, text_key, roles, where) for k, turn in enumerate(turns)]
    unanswered = 0
    while messages and messages[-1]["role"] == "user":
        messages.pop()
        unanswered += 1
    check_roles(messages, where)
    return Conversation(record_id, messages, where, unanswered)


def _message(turn, k: int, role_key: str, text_key: str, roles: dict, where: str) -> dict:
    place = f"{where}, message {k + 1}"
    if not isinstance(turn, dict):
        raise ZhtrainError(f"{place}: a message must be an object with '{role_key}' and '{text_key}'")
    role = turn.get(role_key)
    if not isinstance(role, str) or role not in roles:  # a list/dict role is not hashable: checked first
        raise ZhtrainError(f"{place}: unknown role {role!r} in '{role_key}'; use one of {', '.join(roles)}")
    return {"role": roles[role], "content": _text(turn.get(text_key), place, text_key)}


def _alpaca_messages(record: dict, where: str) -> list[dict]:
    instruction = _text(record.get("instruction"), where, "instruction")
    extra = record.get("input") or ""
    if not isinstance(extra, str):
        raise ZhtrainError(f"{where}: 'input' must be a string, not {type(extra).__name__}; fix the record")
    if extra.strip():
        instruction = f"{instruction}\n{extra}"  # the reference's joining (no separate Input section)
    messages = [
        {"role": "user", "content": instruction},
        {"role": "assistant", "content": _text(record.get("output"), where, "output")},
    ]
    if record.get("system"):
        messages.insert(0, {"role": "system", "content": _text(record["system"], where, "system")})
    return messages


def _text(value, place: str, key: str) -> str:
    if not isinstance(value, str):
        kind = "missing" if value is None else f"a {type(value).__name__}, not a string"
        raise ZhtrainError(f"{place}: '{key}' is {kind}; every message needs non-empty text")
    if not value.strip():
        raise ZhtrainError(f"{place}: '{key}' is empty; remove the message or the record, or fill it in")
    return value


def check_roles(messages: list[dict], where: str) -> None:
    """Optional system first, then user/assistant alternating from user, ending with assistant."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not body:
        raise ZhtrainError(f"{where}: no user/assistant exchange to train on; remove the record or add one")
    for k, message in enumerate(body):
        expected = "user" if k % 2 == 0 else "assistant"
        if message["role"] != expected:
            number = k + 1 + (len(messages) - len(body))
            raise ZhtrainError(
                f"{where}, message {number}: role {message['role']!r} where {expected!r} is expected; roles must "
                "alternate user/assistant (human/gpt), after at most one leading system message"
            )
