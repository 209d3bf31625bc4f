"""A folder of `*.txt` files -> cached token arrays -> fixed-length training blocks.

Each non-blank line is one document: `[BOS] tokens [EOS]` (the seed's script added no EOS, so
documents ran into each other; here the model learns where a document ends). Files are read as
a stream of line batches, so a file larger than memory is never loaded whole. Each file's tokens
are cached as one flat array (uint16 when the vocabulary allows) under `--data_cache_dir`, keyed
by the file's content hash, the tokenizer's fingerprint and the format version. Blocks are cut
from the concatenation of all files at training time, so a new `--block_size` reuses the cache.

Tokenizing takes the fastest path that gives exactly the HF tokenizer's ids (data/encoders.py), in
one process per core: the main process only reads raw blocks and writes token arrays.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import multiprocessing
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from zhtrain.data.encoders import (
    DocumentEncoder,
    Encoder,
    choose_encoder,
    cpu_count,
    hf_encoder,
)
from zhtrain.errors import ZhtrainError
from zhtrain.files import write_json_atomic

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
BATCH_BYTES = 1 << 20  # tokenize ~1 MB of text at a time: memory stays flat, batches stay efficient
SPLIT_SEED = 1234  # fixed so that --seed $RANDOM (as in run_pt.sh) never moves blocks between splits


@dataclass
class CachedFile:
    source: Path
    tokens_path: Path
    n_tokens: int
    n_lines: int
    dtype: str
    from_cache: bool


@dataclass
class TextDataStats:
    files: int = 0
    skipped_empty: list[str] = field(default_factory=list)
    lines: int = 0
    tokens: int = 0
    train_blocks: int = 0
    eval_blocks: int = 0
    block_size: int = 0
    tokenized_tokens: int = 0  # tokens produced in this run (not read from the cache)
    seconds: float = 0.0

    def summary(self) -> str:
        rate = self.tokenized_tokens / self.seconds if self.seconds > 0 and self.tokenized_tokens else 0.0
        cached = self.tokens - self.tokenized_tokens
        return (
            f"data: {self.files} files, {self.lines:,} lines, {self.tokens:,} tokens "
            f"({cached:,} from cache), {self.train_blocks:,} train + {self.eval_blocks:,} eval blocks of "
            f"{self.block_size}; tokenized {self.tokenized_tokens:,} tokens in {self.seconds:.1f}s "
            f"({rate:,.0f} tokens/s)"
        )


# ---------------------------------------------------------------------------------------------
# Finding and reading the files


def find_text_files(dataset_dir: Optional[str], debug_mode: bool = False) -> list[Path]:
    if not dataset_dir:
        raise ZhtrainError("--dataset_dir is required: a folder of plain-text *.txt files")
    folder = Path(dataset_dir)
    if not folder.is_dir():
        raise ZhtrainError(f"--dataset_dir {folder}: no such folder; pass a folder of *.txt files")
    files = sorted(p for p in folder.glob("*.txt") if p.is_file())
    if not files:
        raise ZhtrainError(f"--dataset_dir {folder}: no *.txt files in it; put plain-text UTF-8 files there")
    return files[:1] if debug_mode else files


@dataclass
class TextBlock:
    """About `batch_bytes` of a file, cut at a line end; decoded where it is tokenized (maybe a worker)."""

    path: Path
    data: bytes
    offset: int  # bytes of the file before `data`
    line_no: int  # line number of its first line

    def lines(self) -> list[str]:
        """Its non-blank lines, without line ends; a bad byte is reported (file, byte, line), not garbled."""
        text = _decode_block(self.path, self.data, self.offset, self.line_no)
        lines = text.split("\n")
        if "\r" in text:
            lines = [line.rstrip("\r") for line in lines]
        return [line for line in lines if line and not line.isspace()]


def iter_blocks(path: Path, batch_bytes: Optional[int] = None) -> Iterator[TextBlock]:
    """Read a file as blocks cut at line ends: never the whole file in memory."""
    batch_bytes = batch_bytes or BATCH_BYTES
    offset, line_no = 0, 1
    pending: list[bytes] = []  # the unfinished last line, in reads: joined once (a long line costs linear time)
    try:
        handle = open(path, "rb")
    except OSError as err:  # unreadable (permissions), vanished, a folder named *.txt
        raise ZhtrainError(
            f"{path}: cannot read it ({err.strerror}); check the file and its permissions, or leave it out"
        ) from err
    with handle:
        while True:
            data = handle.read(batch_bytes)
            if data:
                cut = data.rfind(b"\n") + 1
                if cut == 0:  # a line longer than one read: keep reading until it ends
                    pending.append(data)
                    continue
                block = b"".join([*pending, data[:cut]])
                pending = [data[cut:]]
            else:
                block, pending = b"".join(pending), []
            if block:
                yield TextBlock(path, block, offset, line_no)
                offset += len(block)
                line_no += block.count(b"\n")
            if not data:
                return


def iter_line_batches(path: Path, batch_bytes: Optional[int] = None) -> Iterator[list[str]]:
    """Yield batches of non-blank lines (one per block), decoding strictly."""
    for block in iter_blocks(path, batch_bytes):
        lines = block.lines()
        if lines:
            yield lines


def _decode_block(path: Path, block: bytes, offset: int, line_no: int) -> str:
    nul = block.find(b"\x00")
    try:
        text = block.decode("utf-8")
        bad = -1
    except UnicodeDecodeError as err:
        text, bad = "", err.start
    if nul >= 0 and (bad < 0 or block.count(b"\n", 0, nul) <= block.count(b"\n", 0, bad)):
        where = line_no + block.count(b"\n", 0, nul)
        raise ZhtrainError(
            f"{path}: NUL byte at byte {offset + nul} (line {where}): this looks like a binary file, not text; "
            "remove it from the input (--dataset_dir / --corpus / --sample)"
        )
    if bad >= 0:
        where = line_no + block.count(b"\n", 0, bad)
        raise ZhtrainError(
            f"{path}: not valid UTF-8 at byte {offset + bad} (line {where}); convert the file "
            "(e.g. iconv -f GB18030 -t UTF-8) or move it out of the input (--dataset_dir / --corpus / --sample)"
        )
    return text


def content_hash():
    """The hash of a data file's bytes: SHA-256 runs at ~1.3 GB/s here (CPU SHA extensions), twice
    BLAKE2b, and it is paid on every byte that is tokenized."""
    return hashlib.sha256()


def file_digest(path: Path) -> str:
    digest = content_hash()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Tokenizing


def tokenizer_fingerprint(tokenizer) -> str:
    """Changes whenever the tokenizer would produce different ids."""
    digest = hashlib.blake2b(digest_size=16)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode("utf-8"))
    else:
        model_file = getattr(tokenizer, "vocab_file", None)
        if model_file and Path(model_file).is_file():  # a SentencePiece model: pieces and scores decide the ids
            digest.update(Path(model_file).read_bytes())
            digest.update(json.dumps(sorted(tokenizer.get_added_vocab().items())).encode("utf-8"))
        else:
            digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode("utf-8"))
    digest.update(
        json.dumps([type(tokenizer).__name__, tokenizer.bos_token_id, tokenizer.eos_token_id, len(tokenizer)]).encode()
    )
    return digest.hexdigest()


def encode_block(encoder: DocumentEncoder, block: TextBlock) -> tuple[np.ndarray, int]:
    """Decode, split and tokenize one block: (flat tokens, number of documents)."""
    lines = block.lines()
    return (encoder(lines) if lines else np.empty(0, dtype=encoder.dtype)), len(lines)


_WORKER_ENCODER: Optional[DocumentEncoder] = None


def _worker_init(encoder: DocumentEncoder) -> None:
    global _WORKER_ENCODER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process = one core; no nested thread pools
    if hasattr(encoder.encode, "threads"):
        encoder.encode.threads = 1
    _WORKER_ENCODER = encoder


def _worker_encode(block: TextBlock) -> tuple[np.ndarray, int]:
    assert _WORKER_ENCODER is not None
    return encode_block(_WORKER_ENCODER, block)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def encode_file_to(
    path: Path, out_dir: Path, name_output: Callable[[str], Path], encoder: DocumentEncoder, workers: int, progress
) -> tuple[Path, int, int]:
    """Stream one file through the encoder into a token file: (its path, tokens, lines).

    The file is written under a temp name, then renamed to `name_output(content digest)`: the digest
    (the cache key's first part) is taken from the blocks as they are read, so a file that is surely
    not cached is read once. With workers, the main process only reads raw blocks and writes arrays:
    decoding, splitting, tokenizing and flattening all run in the workers. `imap` keeps the order,
    and its task pipe blocks when full, so memory stays a few blocks per worker whatever the file size.
    """
    digest = content_hash()
    # Not files.write_aside: the final name is the content's digest, known only once all is written.
    tmp_path = out_dir / f"{path.name}.tokens.tmp-{os.getpid()}"
    n_tokens = n_lines = 0
    pool = None

    def blocks_hashed() -> Iterator[TextBlock]:
        for block in iter_blocks(path):
            digest.update(block.data)
            yield block

    try:
        blocks = blocks_hashed()
        if workers > 1 and path.stat().st_size > 2 * BATCH_BYTES:
            pool = multiprocessing.get_context("fork").Pool(workers, initializer=_worker_init, initargs=(encoder,))
            results = pool.imap(_worker_encode, blocks, chunksize=1)
        else:
            results = (encode_block(encoder, block) for block in blocks)
        with open(tmp_path, "wb") as out:
            for array, lines in results:
                out.write(memoryview(array))  # no copy
                n_tokens += int(array.size)
                n_lines += lines
                progress.update_tokens(int(array.size))
        out_path = name_output(digest.hexdigest())
        os.replace(tmp_path, out_path)
    finally:
        if pool is not None:
            pool.terminate()
        if tmp_path.exists():
            tmp_path.unlink()
    return out_path, n_tokens, n_lines


class _Progress:
    """tqdm over files, with the running token count shown beside it."""

    def __init__(self, total_files: int, enabled: bool):
        # delay: shown once tokenizing takes over a second (a cached or tiny corpus, or an early bad
        # file, prints no bar before its one-line summary or error).
        self.bar = tqdm(total=total_files, desc="tokenizing", unit="file", disable=not enabled, delay=1.0)
        self.tokens = 0

    def update_tokens(self, n: int) -> None:
        self.tokens += n
        self.bar.set_postfix(tokens=f"{self.tokens:,}", refresh=False)

    def next_file(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def build_token_cache(
    files: Sequence[Path],
    tokenizer,
    cache_dir: Path,
    workers: Optional[int] = None,
    encoder: Optional[Encoder] = None,
    overwrite: bool = False,
    show_progress: bool = True,
    fast_tokenization: bool = True,
) -> tuple[list[CachedFile], TextDataStats]:
    """Tokenize each file once; a finished file's cache survives a crash in a later file.

    `encoder` (lines -> ids, no special tokens) defaults to the fastest path verified to give the HF
    tokenizer's ids (see data/encoders.py), or the HF tokenizer itself with `fast_tokenization=False`.
    `workers` > 1 tokenizes in that many processes; otherwise one process uses the tokenizer's threads.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = tokenizer_fingerprint(tokenizer)
    dtype = token_dtype(len(tokenizer))
    # One process per core by default: measured faster than one process using the tokenizer's own
    # threads (the per-token Python work of decoding and flattening is then parallel too).
    workers = max(1, min(workers or cpu_count(), cpu_count()))
    doc_encoder: Optional[DocumentEncoder] = None  # chosen at the first file that needs tokenizing
    stats = TextDataStats()
    cached: list[CachedFile] = []
    progress = _Progress(len(files), show_progress)
    start = time.perf_counter()
    try:
        for path in files:
            if path.stat().st_size == 0:
                logger.warning("%s: empty file, skipped", path)
                stats.skipped_empty.append(str(path))
                progress.next_file()
                continue

            def tokens_path_for(content_digest: str, stem: str = path.stem) -> Path:
                key = hashlib.blake2b(f"{content_digest}|{fingerprint}|{FORMAT_VERSION}".encode(), digest_size=10)
                return cache_dir / f"{stem}-{key.hexdigest()}.tokens"

            # Hashing the file first is needed only to look for its cache; with no cache file of this
            # name at all the digest is taken while tokenizing instead (one read, no serial pass).
            maybe_cached = not overwrite and any(cache_dir.glob(f"{glob.escape(path.stem)}-*.json"))
            tokens_path = tokens_path_for(file_digest(path)) if maybe_cached else None
            meta = _read_meta(tokens_path.with_suffix(".json")) if tokens_path is not None else None
            if (
                meta is not None
                and tokens_path.exists()
                and tokens_path.stat().st_size == meta["n_tokens"] * dtype.itemsize
            ):
                entry = CachedFile(path, tokens_path, meta["n_tokens"], meta["n_lines"], meta["dtype"], True)
                progress.update_tokens(entry.n_tokens)
            else:
                if doc_encoder is None:
                    encode = encoder or (
                        choose_encoder(tokenizer, _sample_lines(path), threads=cpu_count())
                        if fast_tokenization
                        else hf_encoder(tokenizer)
                    )
                    doc_encoder = DocumentEncoder(encode, tokenizer.bos_token_id, tokenizer.eos_token_id, dtype)
                tokens_path, n_tokens, n_lines = encode_file_to(
                    path, cache_dir, tokens_path_for, doc_encoder, workers, progress
                )
                entry = CachedFile(path, tokens_path, n_tokens, n_lines, dtype.name, False)
                write_json_atomic(
                    tokens_path.with_suffix(".json"),
                    {
                        "source": str(path),
                        "n_tokens": n_tokens,
                        "n_lines": n_lines,
                        "dtype": dtype.name,
                        "tokenizer": fingerprint,
                        "format_version": FORMAT_VERSION,
                    },
                )
                stats.tokenized_tokens += n_tokens
            progress.next_file()
            if entry.n_tokens == 0:
                logger.warning("%s: only blank lines, skipped", path)
                stats.skipped_empty.append(str(path))
                continue
            cached.append(entry)
            stats.lines += entry.n_lines
            stats.tokens += entry.n_tokens
    finally:
        progress.close()
    stats.files = len(cached)
    stats.seconds = time.perf_counter() - start
    if not cached:
        raise ZhtrainError(
            f"no text in {len(files)} *.txt file(s) under {files[0].parent if files else '--dataset_dir'}: "
            "all are empty or blank; add UTF-8 text, one document per line"
        )
    return cached, stats


def _sample_lines(path: Path) -> list[str]:
    return next(iter_line_batches(path, 1 << 16), [])


def _read_meta(path: Path) -> Optional[dict]:
    """A cache entry's record, or None (the file is then tokenized again) when missing, stale or damaged."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        return None
    if not all(isinstance(meta.get(key), int) for key in ("n_tokens", "n_lines")) or not isinstance(
        meta.get("dtype"), str
    ):
        return None
    return meta


# ---------------------------------------------------------------------------------------------
# Blocks


class TokenBlocks(torch.utils.data.Dataset):
    """Blocks `block_size` long cut from the concatenation of the cached files (opened lazily)."""

    def __init__(self, files: Sequence[CachedFile], block_size: int, indices: Sequence[int]):
        self.paths = [str(f.tokens_path) for f in files]
        self.dtypes = [f.dtype for f in files]
        self.starts = np.cumsum([0] + [f.n_tokens for f in files])
        self.block_size = block_size
        self.indices = np.asarray(indices, dtype=np.int64)
        self._arrays: Optional[list[np.ndarray]] = None

    def __len__(self) -> int:
        return len(self.indices)

    def _open(self) -> list[np.ndarray]:
        if self._arrays is None:
            self._arrays = [np.memmap(p, dtype=d, mode="r") for p, d in zip(self.paths, self.dtypes)]
        return self._arrays

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_arrays"] = None  # a memmap would be pickled as a full in-memory copy
        return state

    def tokens(self, start: int, end: int) -> np.ndarray:
        arrays = self._open()
        end = min(end, int(self.starts[-1]))
        pieces = []
        file_index = int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < end:
            local = start - int(self.starts[file_index])
            take = min(end - start, arrays[file_index].size - local)
            pieces.append(np.asarray(arrays[file_index][local : local + take], dtype=np.int64))
            start += take
            file_index += 1
        return np.concatenate(pieces)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        block = int(self.indices[i])
        ids = torch.from_numpy(self.tokens(block * self.block_size, (block + 1) * self.block_size))
        return {"input_ids": ids, "labels": ids.clone()}


def count_blocks(total_tokens: int, block_size: int) -> int:
    """Full blocks only; a corpus shorter than one block gives a single short block (as the seed)."""
    return max(1, total_tokens // block_size)


def check_split_fraction(fraction: float) -> None:
    if not 0 <= fraction < 1:
        raise ZhtrainError(
            f"--validation_split_percentage {fraction}: must be a fraction in [0, 1) as in the seed (0.001 = 0.1%)"
        )


def split_indices(n_blocks: int, fraction: float, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """`fraction` of the blocks (at least one when > 0, never all) go to validation."""
    check_split_fraction(fraction)
    n_eval = min(math.ceil(n_blocks * fraction), n_blocks - 1) if fraction > 0 else 0
    order = np.random.default_rng(seed).permutation(n_blocks)
    return np.sort(order[n_eval:]), np.sort(order[:n_eval])


def load_text_blocks(
    dataset_dir: str,
    tokenizer,
    block_size: int,
    cache_dir: str,
    validation_fraction: float,
    workers: Optional[int] = None,
    debug_mode: bool = False,
    overwrite_cache: bool = False,
    max_train_samples: Optional[int] = None,
    max_eval_samples: Optional[int] = None,
    encoder: Optional[Encoder] = None,
    show_progress: bool = True,
    fast_tokenization: bool = True,
) -> tuple[TokenBlocks, Optional[TokenBlocks], TextDataStats]:
    """The data recipe: find files -> tokenize (or reuse the cache) -> cut blocks -> split."""
    files = find_text_files(dataset_dir, debug_mode)
    cached, stats = build_token_cache(
        files, tokenizer, Path(cache_dir), workers, encoder, overwrite_cache, show_progress, fast_tokenization
    )
    n_blocks = count_blocks(stats.tokens, block_size)
    if stats.tokens < block_size:
        logger.warning(
            "only %d tokens, fewer than --block_size %d: training on one short block", stats.tokens, block_size
        )
    train_idx, eval_idx = split_indices(n_blocks, validation_fraction)
    if max_train_samples is not None:
        train_idx = train_idx[:max_train_samples]
    if max_eval_samples is not None:
        eval_idx = eval_idx[:max_eval_samples]
    stats.block_size = block_size
    stats.train_blocks, stats.eval_blocks = len(train_idx), len(eval_idx)
    train = TokenBlocks(cached, block_size, train_idx)
    evaluation = TokenBlocks(cached, block_size, eval_idx) if len(eval_idx) else None
    return train, evaluation, stats
