"""Corpora for tokenizer training: files or folders of text, streamed, checked, sampled, held out.

A corpus is one or more `--corpus` paths: a file, or a folder whose `*.txt` files are all used.
Lines are read as a stream (strict UTF-8, blank lines skipped; the same reader as `zhtrain
pretrain`'s data), so a corpus larger than memory is never loaded whole.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

from zhtrain.data.text import iter_line_batches
from zhtrain.errors import ZhtrainError


def corpus_files(paths: Sequence[str]) -> list[Path]:
    """The files named, and every `*.txt` inside each folder named (sorted)."""
    if not paths:
        raise ZhtrainError(
            "--corpus is required: text files, or folders of *.txt files, one sentence or paragraph per line"
        )
    files: list[Path] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            found = sorted(p for p in path.glob("*.txt") if p.is_file())
            if not found:
                raise ZhtrainError(f"--corpus {path}: a folder with no *.txt files; put UTF-8 text files there")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise ZhtrainError(f"--corpus {path}: no such file or folder; pass UTF-8 text files or folders of *.txt")
    return files


def iter_lines(files: Iterable[Path]) -> Iterator[str]:
    """Every non-blank line of every file, streamed; a bad byte is an error naming file and offset."""
    for path in files:
        for batch in iter_line_batches(path):
            yield from batch


def require_text(files: Sequence[Path]) -> None:
    """An empty corpus is an error before any slow step (reads only up to the first non-blank line)."""
    for path in files:
        for _ in iter_line_batches(path, batch_bytes=1 << 16):
            return
    names = ", ".join(str(p) for p in files[:3]) + (" ..." if len(files) > 3 else "")
    raise ZhtrainError(
        f"--corpus {names}: no text (empty or blank lines only); pass files with one sentence or paragraph per line"
    )


@dataclass
class HeldOut:
    """Every `every`-th line is held back from training (at most `limit` are kept) to measure on."""

    every: int = 50
    limit: int = 2000
    lines: list[str] = field(default_factory=list)
    seen: int = 0  # lines that went to training

    def split(self, lines: Iterable[str]) -> Iterator[str]:
        """Yield the training lines; keep the held-out ones."""
        for index, line in enumerate(lines):
            if self.every and index % self.every == self.every - 1:
                if len(self.lines) < self.limit:
                    self.lines.append(line)
                continue
            self.seen += 1
            yield line


def reservoir_sample(lines: Iterable[str], size: int, seed: int = 0) -> list[str]:
    """A uniform random sample of `size` lines from a stream of unknown length (all of them if fewer).

    The same rule sentencepiece applies with `--input_sentence_size`; `size` <= 0 keeps everything.
    """
    if size <= 0:
        return list(lines)
    rng = random.Random(seed)
    sample: list[str] = []
    for index, line in enumerate(lines):
        if index < size:
            sample.append(line)
        else:
            slot = rng.randint(0, index)
            if slot < size:
                sample[slot] = line
    return sample


def tokens_per_character(tokenizer, lines: Sequence[str]) -> Optional[float]:
    """Tokens per character of `lines` (no special tokens): lower means more text per token."""
    characters = sum(len(line) for line in lines)
    if not characters:
        return None
    tokens = sum(len(ids) for ids in tokenizer(list(lines), add_special_tokens=False)["input_ids"])
    return tokens / characters


def read_sample(path: Optional[str], max_lines: int = 2000) -> list[str]:
    """The first `max_lines` non-blank lines of a sample file (for measurements)."""
    if not path:
        return []
    sample = Path(path)
    if not sample.is_file():
        raise ZhtrainError(f"--sample {sample}: no such file; pass a UTF-8 text file")
    lines: list[str] = []
    for line in iter_lines([sample]):
        lines.append(line)
        if len(lines) >= max_lines:
            break
    if not lines:
        raise ZhtrainError(f"--sample {sample}: no text (empty or blank lines only)")
    return lines
