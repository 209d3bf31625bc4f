"""Conversations -> (input_ids, labels) with assistant-only loss; datasets and the padding collator.

Labels are built segment by segment from the template (`templates.Segment`): prompt tokens get
-100, each assistant reply and its end token keep their ids. Nothing is re-derived from a rendered
string, so there is no "tokenization mismatch" and no sample is masked silently.

A sample longer than `max_length` is cut at the end and reported (`truncated` = tokens cut). A
sample with nothing left to train after the cut (its first prompt alone fills `max_length`) is
dropped with the reason; if every sample is dropped that is an error.

`SupervisedDataset` holds samples encoded up front (in batches: one tokenizer call per batch);
`LazySupervisedDataset` keeps the conversations and tokenizes in `__getitem__` (FastChat's
`--lazy_preprocess`), so start-up costs nothing. `PadToLongest` pads each batch to its own longest
sample, not to `model_max_length`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import Dataset

from zhtrain.data.chat import Conversation
from zhtrain.data.templates import Template, encode_segments_batch
from zhtrain.errors import ZhtrainError
from zhtrain.files import write_aside

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
MAX_REPORTED = 20  # per-sample log lines for truncated/dropped samples before summarising


@dataclass
class EncodedSample:
    id: str
    input_ids: list[int]
    labels: list[int]
    turns: int
    truncated: int = 0  # tokens cut from the end
    dropped: Optional[str] = None  # reason, when nothing is left to train

    @property
    def trained_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def with_system(messages: list[dict], system: Optional[str]) -> list[dict]:
    """`--system_prompt` replaces the template default where the sample has no system message of its own."""
    if system is None or messages[0]["role"] == "system":
        return messages
    return [{"role": "system", "content": system}] + messages


def encode_conversations(
    conversations: list[Conversation], tokenizer, template: Template, max_length: int, system: Optional[str] = None
) -> list[EncodedSample]:
    segments = [template.segments(tokenizer, with_system(c.messages, system)) for c in conversations]
    samples = []
    for conversation, pieces in zip(conversations, encode_segments_batch(tokenizer, segments)):
        samples.append(assemble(conversation, pieces, max_length))
    return samples


def assemble(conversation: Conversation, pieces: list[tuple[list[int], bool]], max_length: int) -> EncodedSample:
    input_ids: list[int] = []
    labels: list[int] = []
    for ids, trained in pieces:
        input_ids += ids
        labels += ids if trained else [IGNORE_INDEX] * len(ids)
    turns = sum(1 for m in conversation.messages if m["role"] == "assistant")
    sample = EncodedSample(conversation.id, input_ids, labels, turns)
    if len(input_ids) > max_length:
        sample.truncated = len(input_ids) - max_length
        sample.input_ids, sample.labels = input_ids[:max_length], labels[:max_length]
        if sample.trained_tokens == 0:
            first_reply = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
            sample.dropped = (
                f"the prompt before the first reply is {first_reply} tokens, at least the max length {max_length}: "
                "nothing left to train"
            )
    return sample


@dataclass
class Summary:
    samples: int = 0
    turns: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    dropped: int = 0
    reasons: dict = field(default_factory=dict)

    def add(self, sample: EncodedSample) -> None:
        self.samples += 1
        self.turns += sample.turns
        self.tokens += len(sample.input_ids)
        self.trained_tokens += sample.trained_tokens
        self.truncated += bool(sample.truncated)
        if sample.dropped:
            self.dropped += 1

    def line(self, name: str) -> str:
        return (
            f"{name}: {self.samples} samples, {self.turns} assistant turns, {self.tokens} tokens, "
            f"{self.trained_tokens} trained tokens, {self.truncated} truncated, {self.dropped} dropped"
        )


def describe_files(files) -> str:
    names = [str(path) for path in files]
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def summarize(
    samples: list[EncodedSample], name: str, max_length: int, flag: str = "--model_max_length", files=()
) -> Summary:
    """Count, report each truncated/dropped sample (the first MAX_REPORTED), fail if nothing is left
    (naming `files`, where the samples came from)."""
    summary = Summary()
    reported = flagged = 0
    for sample in samples:
        summary.add(sample)
        flagged += bool(sample.truncated or sample.dropped)
        if (sample.truncated or sample.dropped) and reported < MAX_REPORTED:
            reported += 1
            if sample.dropped:
                logger.warning("%s sample %s dropped: %s", name, sample.id, sample.dropped)
            else:
                logger.warning(
                    "%s sample %s truncated: %d tokens cut to fit %s %d",
                    name,
                    sample.id,
                    sample.truncated,
                    flag,
                    max_length,
                )
    rest = flagged - reported
    if rest > 0:
        logger.warning(
            "%s: %d more truncated/dropped samples (--preprocess_only --preprocessed_output lists them all)", name, rest
        )
    if summary.samples and summary.dropped == summary.samples:
        raise ZhtrainError(
            f"{name}{' (' + describe_files(files) + ')' if files else ''}: all {summary.samples} samples were dropped: "
            f"their prompts alone do not fit {flag} {max_length}; raise {flag} or shorten the prompts"
        )
    return summary


def write_preprocessed(samples: list[EncodedSample], path: Path) -> Path:
    """One JSON line per sample: {"id", "input_ids", "labels", "dropped", "truncated"}; written atomically."""
    path = Path(path)
    with write_aside(path) as tmp, tmp.open("w", encoding="utf-8") as out:
        for s in samples:
            record = {
                "id": s.id,
                "input_ids": s.input_ids,
                "labels": s.labels,
                "dropped": s.dropped,
                "truncated": s.truncated,
            }
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# Datasets and collator


class SupervisedDataset(Dataset):
    """Samples encoded up front; dropped samples are left out (they were reported)."""

    def __init__(self, samples: list[EncodedSample]):
        self.samples = [s for s in samples if not s.dropped]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        return {"input_ids": sample.input_ids, "labels": sample.labels}


class LazySupervisedDataset(Dataset):
    """Tokenizes in `__getitem__`. A sample found to have nothing to train is reported once and
    replaced by the next trainable one (its absence cannot be known before tokenizing)."""

    def __init__(
        self,
        conversations: list[Conversation],
        tokenizer,
        template: Template,
        max_length: int,
        system: Optional[str] = None,
    ):
        self.conversations = conversations
        self.tokenizer, self.template, self.max_length, self.system = tokenizer, template, max_length, system
        self.dropped: set[int] = set()
        self.truncated: set[int] = set()

    def __len__(self) -> int:
        return len(self.conversations)

    def encode(self, index: int) -> EncodedSample:
        return encode_conversations(
            [self.conversations[index]], self.tokenizer, self.template, self.max_length, self.system
        )[0]

    def __getitem__(self, index: int) -> dict:
        for step in range(len(self.conversations)):
            current = (index + step) % len(self.conversations)
            sample = self.encode(current)
            if sample.truncated and not sample.dropped and current not in self.truncated:
                self.truncated.add(current)
                logger.warning(
                    "sample %s truncated: %d tokens cut to fit %d", sample.id, sample.truncated, self.max_length
                )
            if not sample.dropped:
                return {"input_ids": sample.input_ids, "labels": sample.labels}
            if current not in self.dropped:
                self.dropped.add(current)
                logger.warning("sample %s dropped: %s; the next sample takes its place", sample.id, sample.dropped)
        raise ZhtrainError(
            f"all {len(self.conversations)} samples were dropped: their prompts alone exceed {self.max_length} tokens"
        )


class PadToLongest:
    """Pad a batch to its longest sample: input_ids with `pad_token_id`, labels with -100.

    The attention mask comes from the lengths, not from `input_ids != pad`, so a pad id that also
    occurs in the text (pad = unk or eos) is harmless.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: Optional[int] = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict:
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(features)
        input_ids = torch.full((batch, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch, longest), dtype=torch.long)
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            input_ids[row, :n] = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.as_tensor(feature["labels"], dtype=torch.long)
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def choose_pad_token(tokenizer) -> str:
    """Pad with the tokenizer's pad token, else unk, else eos: never grow the vocabulary just to pad.

    Padded positions are masked in the attention and the loss, so which id fills them does not
    matter. (The Chinese-Alpaca script added a [PAD] token -> 49954 rows; FastChat used unk.)
    """
    if tokenizer.pad_token_id is not None:
        return f"pad token {tokenizer.pad_token!r} (the tokenizer's own)"
    for name in ("unk_token", "eos_token"):
        token = getattr(tokenizer, name)
        if token is not None:
            tokenizer.pad_token = token
            return f"pad token {token!r} (the tokenizer has no pad token; its {name[:3]} is used, masked everywhere)"
    raise ZhtrainError(
        f"tokenizer {tokenizer.name_or_path}: no pad, unk or eos token to pad batches with; add a pad token to the "
        "tokenizer"
    )
