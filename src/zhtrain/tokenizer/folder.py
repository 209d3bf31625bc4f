"""Output folders of the tokenizer commands: refused if they exist, built aside, renamed into place."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from zhtrain.errors import ZhtrainError, check_not_an_input, check_writable
from zhtrain.files import write_aside

RECORD_FILE = "zhtrain_tokenizer.json"  # what was built from what, and the measured figures


def check_output_dir(output_dir: Optional[str], overwrite: bool, inputs=()) -> Path:
    """Everything about --output_dir that can fail, before any slow step: required, not a file, not
    existing unless --overwrite, not one of the `inputs` ((flag, path) pairs) nor holding one (the
    new folder replaces the old one whole), writable. Returns it as an absolute path."""
    if not output_dir:
        raise ZhtrainError("--output_dir is required: the folder to write the tokenizer into")
    dest = Path(output_dir)
    if dest.is_file():
        raise ZhtrainError(f"--output_dir {dest}: is a file; choose a folder path")
    check_not_an_input(output_dir, "--output_dir", inputs)
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise ZhtrainError(
            f"--output_dir {dest}: already exists; pass --overwrite to replace it, or choose another folder"
        )
    check_writable(dest, "--output_dir")
    return dest.resolve()


@contextmanager
def new_output_dir(output_dir: Optional[str], overwrite: bool, inputs=()) -> Iterator[Path]:
    """Yield a temporary folder beside `output_dir`; it replaces `output_dir` only when complete.

    An existing non-empty `output_dir` is refused unless `overwrite`; even then the old folder
    stays untouched until the new one is finished.
    """
    dest = check_output_dir(output_dir, overwrite, inputs)
    with write_aside(dest, folder=True) as tmp:
        yield tmp


def write_record(folder: Path, record: dict) -> None:
    (folder / RECORD_FILE).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_record(folder: Path) -> dict:
    try:
        return json.loads((Path(folder) / RECORD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def load_hf_tokenizer(folder: Path, expected_len: int, what: str):
    """Load a tokenizer folder we just wrote and check its length (transformers can silently build a tiny one)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if len(tokenizer) != expected_len:
        raise RuntimeError(f"{what}: the Hugging Face tokenizer has {len(tokenizer)} tokens, expected {expected_len}")
    return tokenizer
