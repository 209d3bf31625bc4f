"""Lines -> token ids, by the fastest path that gives exactly the HF tokenizer's ids.

The HF tokenizer object (`tokenizer(lines)`) is the reference: the cache key is its fingerprint and
every later stage (SFT, evaluation, inference) uses it. Two faster paths produce the same ids
without its Python-side overhead:

- `SentencePieceEncoder`: the raw `sentencepiece` library on the folder's `tokenizer.model`
  (LLaMA-style tokenizers): several times faster than the `tokenizers` conversion of the model.
  Lines that contain an added/special token's text (`<s>`, `[PAD]`, ...) go through the HF
  backend, which treats them as tokens.
- `TokenizersEncoder`: the HF tokenizer's own Rust backend, batch-encoded without offsets.

Either is used only after it matched `tokenizer(line, add_special_tokens=False)` token for token
on a built-in set of awkward strings plus a sample of the data (`choose_encoder`). When it does not
match, the next path is tried and the log says why. LLaMA SentencePiece folders load as the seed's
slow tokenizer (`zhtrain.sp_tokenizer`), so raw sentencepiece matches them by construction; with
`--tokenizer_backend tokenizers` on the Chinese-LLaMA merge (17,953 appended pieces, all score 0) the
`tokenizers` conversion breaks ties differently from sentencepiece and the `tokenizers` path is used.
"""

from __future__ import annotations

import itertools
import logging
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

logger = logging.getLogger(__name__)

Encoder = Callable[[list[str]], list[list[int]]]
MAX_SCANNED_ADDED_TOKENS = 256

# Strings on which a fast path must agree with the HF tokenizer before it is used.
AWKWARD_LINES = (
    "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。",
    "１９９８年１月，全角数字ＡＢＣ与半角 2024 混排",
    "  two leading spaces",
    "a  b   c    spaces inside",
    "trailing space ",
    "\ttab\tinside",
    "emoji 😀🎉👍🏽 and rare CJK 𠀀𪚥 (byte fallback)",
    "ｶﾀｶﾅ かな 한국어 русский ελληνικά",
    "\u3000全角空格\u3000",
    "e\u0301 combining accent, ñ, ß, ﬁ ligature",
    "zero\u200bwidth space",
    "line with \r carriage return",
    "…—“”‘’《》【】〔〕",
    "▁ already a metaspace",
    "<s> </s> <unk> written as text",
    "x",
)
SAMPLE_LINES = 256


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def hf_encoder(tokenizer) -> Encoder:
    """Batch-encode without special tokens (BOS/EOS are added explicitly per document)."""

    def encode(lines: list[str]) -> list[list[int]]:
        return tokenizer(lines, add_special_tokens=False)["input_ids"]

    return encode


class TokenizersEncoder:
    """The HF tokenizer's Rust backend, batch-encoded without offsets (picklable)."""

    name = "tokenizers"

    def __init__(self, backend):
        self.backend = backend

    def __call__(self, lines: list[str]) -> list[list[int]]:
        batch = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        return [encoding.ids for encoding in batch(lines, add_special_tokens=False)]


class SentencePieceEncoder:
    """Raw sentencepiece on `tokenizer.model`; lines holding added-token text go through `fallback`."""

    name = "sentencepiece"

    def __init__(self, model_file: Path, added_tokens: Sequence[str], fallback: Optional[Encoder], threads: int = 1):
        self.model_file = str(model_file)
        self.added_tokens = tuple(t for t in added_tokens if t)
        self.fallback = fallback
        self.threads = threads
        self.document_ends: tuple[list[int], list[int]] = ([], [])  # BOS/EOS added per line by sentencepiece
        self._processor = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_processor"] = None  # loaded again in the worker
        return state

    def _sp(self):
        if self._processor is None:
            import sentencepiece

            self._processor = sentencepiece.SentencePieceProcessor(model_file=self.model_file)
        return self._processor

    def with_document_ends(self, bos_id: Optional[int], eos_id: Optional[int]) -> Optional["SentencePieceEncoder"]:
        """A copy that adds BOS/EOS to each line inside sentencepiece's C++ (saves a numpy pass over
        every token), or None when the model's own BOS/EOS ids are not the tokenizer's."""
        sp = self._sp()
        if (bos_id is not None and bos_id != sp.bos_id()) or (eos_id is not None and eos_id != sp.eos_id()):
            return None
        copy = SentencePieceEncoder(Path(self.model_file), self.added_tokens, self.fallback, self.threads)
        copy._processor = sp  # forked workers inherit it loaded
        copy.document_ends = ([bos_id] if bos_id is not None else [], [eos_id] if eos_id is not None else [])
        return copy

    def __call__(self, lines: list[str]) -> list[list[int]]:
        bos, eos = self.document_ends
        ids = self._sp().encode(lines, num_threads=self.threads, add_bos=bool(bos), add_eos=bool(eos))
        if self.added_tokens:
            joined = "\n".join(lines)  # one C-speed scan; per line only when something is there
            if any(token in joined for token in self.added_tokens):
                special = [i for i, line in enumerate(lines) if any(token in line for token in self.added_tokens)]
                if self.fallback is None:
                    raise ValueError("added-token text in the data and no fallback encoder")
                for i, token_ids in zip(special, self.fallback([lines[i] for i in special])):
                    ids[i] = bos + list(token_ids) + eos
        return ids


def sentencepiece_model_of(tokenizer) -> Optional[Path]:
    """The `tokenizer.model` in the folder the tokenizer was loaded from, if any."""
    vocab_file = getattr(tokenizer, "vocab_file", None)  # zhtrain's SentencePieceLlamaTokenizer
    if vocab_file and Path(vocab_file).is_file():
        return Path(vocab_file)
    folder = Path(getattr(tokenizer, "name_or_path", "") or "")
    if folder.is_file():
        folder = folder.parent
    candidate = folder / "tokenizer.model"
    return candidate if candidate.is_file() else None


def candidate_encoders(tokenizer, threads: int) -> list:
    """Fast paths for this tokenizer, fastest first."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    fast = [TokenizersEncoder(backend)] if backend is not None else []
    model_file = sentencepiece_model_of(tokenizer)
    added = list(tokenizer.get_added_vocab()) if model_file is not None else []
    # Each added token's text is searched for in every batch: with thousands of them (a vocabulary
    # grown by add_tokens) that scan costs more than sentencepiece saves, so keep the HF backend.
    if model_file is not None and len(added) <= MAX_SCANNED_ADDED_TOKENS:
        fallback = fast[0] if fast else hf_encoder(tokenizer)
        fast.insert(0, SentencePieceEncoder(model_file, added, fallback, threads))
    return fast


def first_mismatch(encoder: Encoder, reference: Encoder, lines: list[str]) -> Optional[str]:
    try:
        got = encoder(lines)
    except Exception as err:  # a fast path that cannot run is simply not used
        return f"failed ({type(err).__name__}: {err})"
    want = reference(lines)
    if len(got) != len(want):
        return f"returned {len(got)} results for {len(want)} lines"
    bad = [i for i, (a, b) in enumerate(zip(got, want)) if list(a) != list(b)]
    if bad:
        return f"differs on {len(bad)} of {len(lines)} sample lines, first {lines[bad[0]][:40]!r}"
    return None


def choose_encoder(tokenizer, sample: Sequence[str], threads: int = 1) -> Encoder:
    """The fastest encoder whose ids equal `tokenizer(line, add_special_tokens=False)` on the sample."""
    reference = hf_encoder(tokenizer)
    lines = list(AWKWARD_LINES) + [line for line in sample[:SAMPLE_LINES] if line]
    for encoder in candidate_encoders(tokenizer, threads):
        problem = first_mismatch(encoder, reference, lines)
        if problem is None:
            logger.info(
                "tokenizing with %s (same ids as the HF tokenizer on %d sample lines)", encoder.name, len(lines)
            )
            return encoder
        logger.warning("not tokenizing with %s: %s; trying the next path", encoder.name, problem)
    logger.info("tokenizing with the HF tokenizer")
    return reference


class DocumentEncoder:
    """lines -> one flat array `[BOS] a.. [EOS] [BOS] b.. [EOS]`; picklable for worker processes."""

    def __init__(self, encode: Encoder, bos_id: Optional[int], eos_id: Optional[int], dtype: np.dtype):
        self.encode = encode
        self.bos = [bos_id] if bos_id is not None else []
        self.eos = [eos_id] if eos_id is not None else []
        self.dtype = dtype
        with_ends = getattr(encode, "with_document_ends", None)
        wrapped = with_ends(bos_id, eos_id) if with_ends is not None and (self.bos or self.eos) else None
        if wrapped is not None:  # the encoder adds BOS/EOS itself
            self.encode, self.bos, self.eos = wrapped, [], []

    def __call__(self, lines: list[str]) -> np.ndarray:
        docs = self.encode(lines)
        lengths = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
        flat = np.fromiter(itertools.chain.from_iterable(docs), dtype=self.dtype, count=int(lengths.sum()))  # C loop
        extra = len(self.bos) + len(self.eos)
        if not extra:
            return flat
        # Document k's tokens move right by extra * k (+1 for its BOS); BOS/EOS fill the gaps.
        out = np.empty(flat.size + extra * len(docs), dtype=self.dtype)
        doc_of_token = np.repeat(np.arange(len(docs)), lengths)
        out[np.arange(flat.size) + extra * doc_of_token + len(self.bos)] = flat
        ends = np.cumsum(lengths + extra)
        if self.bos:
            out[ends - lengths - extra] = self.bos[0]
        if self.eos:
            out[ends - 1] = self.eos[0]
        return out
