"""SentencePiece: train a Chinese model on a corpus; merge it into LLaMA's (merge_tokenizers.py).

Models are read and written as `ModelProto` with sentencepiece's own bundled protobuf module, and
every file read is also loaded by the sentencepiece library itself, so a file that merely parses
as protobuf is not mistaken for a model.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Iterable, Optional

from zhtrain.errors import ZhtrainError
from zhtrain.tokenizer.folder import load_hf_tokenizer

logger = logging.getLogger(__name__)

PAD_PIECE = "[PAD]"  # Chinese-Alpaca's pad token: 49953 + [PAD] = 49954


def model_pb2():
    from sentencepiece import sentencepiece_model_pb2

    return sentencepiece_model_pb2


def read_model(path: Path, flag: str):
    """A `ModelProto` from a `.model` file, or a one-line error saying what the file is not."""
    import sentencepiece as spm
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise ZhtrainError(f"{flag} {path}: no such file; pass a SentencePiece .model file")
    try:
        data = path.read_bytes()
    except OSError as err:  # unreadable (permissions)
        raise ZhtrainError(f"{flag} {path}: cannot read it ({err.strerror}); check the file's permissions") from err
    not_a_model = f"{flag} {path}: not a SentencePiece model file"
    proto = model_pb2().ModelProto()
    try:
        proto.ParseFromString(data)
        spm.SentencePieceProcessor(model_proto=data)  # the library's own validation
    except (DecodeError, RuntimeError, OSError, ValueError) as err:
        raise ZhtrainError(
            f"{not_a_model} ({str(err).splitlines()[0] if str(err) else type(err).__name__}); pass the .model that "
            "sentencepiece wrote"
        ) from None
    if not proto.pieces:
        raise ZhtrainError(f"{not_a_model} (it has no pieces); pass the .model that sentencepiece wrote")
    return proto


def base_model_path(llama_tokenizer_dir: Optional[str]) -> Path:
    """`--llama_tokenizer_dir`: a folder holding tokenizer.model, or a .model file itself."""
    if not llama_tokenizer_dir:
        raise ZhtrainError(
            "--llama_tokenizer_dir is required: the base tokenizer folder (with tokenizer.model) or its .model file"
        )
    path = Path(llama_tokenizer_dir)
    if path.is_file():
        return path
    if not path.is_dir():
        raise ZhtrainError(f"--llama_tokenizer_dir {path}: no such folder or file")
    model = path / "tokenizer.model"
    if model.is_file():
        return model
    if (path / "tokenizer.json").is_file():
        raise ZhtrainError(
            f"--llama_tokenizer_dir {path}: has tokenizer.json but no tokenizer.model, so it is not a SentencePiece "
            "tokenizer (e.g. byte-level BPE); merge appends SentencePiece pieces: for this tokenizer use "
            f"`zhtrain tokenizer extend --tokenizer_name_or_path {path} --corpus ...`"
        )
    raise ZhtrainError(
        f"--llama_tokenizer_dir {path}: no tokenizer.model in it; pass the base tokenizer's folder or .model file"
    )


# ---------------------------------------------------------------------------------------------
# merge


def merge_models(base, chinese, add_pad_token: bool = False):
    """The base model with each piece of `chinese` that it lacks appended (Chinese order, score 0).

    As the reference `merge_tokenizers.py`: ids, pieces, scores, byte fallback, normaliser and
    trainer spec of the base stay exactly as they are; only pieces are appended. Control, unknown
    and byte pieces of the Chinese model are not text and are never appended.
    """
    piece_type = model_pb2().ModelProto.SentencePiece
    if base.trainer_spec.model_type != model_pb2().TrainerSpec.BPE:
        kind = model_pb2().TrainerSpec.ModelType.Name(base.trainer_spec.model_type)
        raise ZhtrainError(
            f"the base tokenizer is a SentencePiece {kind} model; merge appends pieces with score 0, which is right "
            "only for BPE models such as LLaMA's (in a unigram model score 0 would outrank every existing piece)"
        )
    merged = model_pb2().ModelProto()
    merged.CopyFrom(base)
    present = {piece.piece for piece in merged.pieces}
    for piece in chinese.pieces:
        if piece.piece in present or piece.type not in (piece_type.NORMAL, piece_type.USER_DEFINED):
            continue
        new = merged.pieces.add()
        new.piece, new.score = piece.piece, 0.0
        if piece.type == piece_type.USER_DEFINED:
            new.type = piece_type.USER_DEFINED
        present.add(piece.piece)
    if add_pad_token and PAD_PIECE not in present:
        pad = merged.pieces.add()
        pad.piece, pad.score, pad.type = PAD_PIECE, 0.0, piece_type.CONTROL  # never produced from text
    return merged


def special_pieces(proto) -> dict[str, str]:
    """bos/eos/unk piece names from the model's own trainer spec (LLaMA: <s> </s> <unk>)."""
    spec = proto.trainer_spec
    names = {}
    for role, index in (("bos_token", spec.bos_id), ("eos_token", spec.eos_id), ("unk_token", spec.unk_id)):
        if 0 <= index < len(proto.pieces):
            names[role] = proto.pieces[index].piece
    return names


def write_hf_folder(proto, folder: Path, add_pad_token: bool) -> int:
    """tokenizer.model + tokenizer.json + tokenizer_config.json, loadable with AutoTokenizer (LLaMA settings).

    transformers converts tokenizer.model to a fast tokenizer; saving writes tokenizer.json, so later
    loads are instant. `save_pretrained` does not write tokenizer.model: it is written first and kept.
    """

    (folder / "tokenizer.model").write_bytes(proto.SerializeToString())
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        **special_pieces(proto),
    }
    if add_pad_token:
        config["pad_token"] = PAD_PIECE
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    tokenizer = load_hf_tokenizer(folder, len(proto.pieces), str(folder))
    tokenizer.save_pretrained(str(folder))
    load_hf_tokenizer(folder, len(proto.pieces), str(folder))  # what users will load
    return len(proto.pieces)


def pieces_of(proto, text: str) -> list[str]:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString()).encode(text, out_type=str)


# ---------------------------------------------------------------------------------------------
# train


_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")
_TOO_LOW = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")


def train_model(
    lines: Iterable[str],
    out_prefix: Path,
    vocab_size: int,
    model_type: str,
    character_coverage: float,
    input_sentence_size: int,
    corpus_name: str,
) -> Path:
    """Train with sentencepiece from a stream of lines; its errors become one sentence each."""
    import sentencepiece as spm

    options = dict(
        sentence_iterator=iter(lines),
        model_prefix=str(out_prefix),
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        # sentencepiece keeps a uniform random sample of this many lines (reservoir sampling) in memory
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        max_sentence_length=1 << 14,  # bytes; longer lines are skipped by sentencepiece (a paragraph fits)
        num_threads=os.cpu_count() or 1,
        minloglevel=1,
    )
    try:
        spm.SentencePieceTrainer.train(**options)
    except RuntimeError as err:
        raise translate_training_error(err, vocab_size, corpus_name, character_coverage) from None
    return out_prefix.with_suffix(".model")


def translate_training_error(err: RuntimeError, vocab_size: int, corpus: str, coverage: float) -> ZhtrainError:
    text = str(err)
    if match := _TOO_HIGH.search(text):
        return ZhtrainError(
            f"--vocab_size {vocab_size}: the corpus {corpus} supports at most {match.group(2)} pieces; lower "
            f"--vocab_size to {match.group(2)} or less, or train on more text"
        )
    if match := _TOO_LOW.search(text):
        return ZhtrainError(
            f"--vocab_size {vocab_size}: the corpus {corpus} has {match.group(2)} distinct characters to cover "
            f"(--character_coverage {coverage}); raise --vocab_size above {match.group(2)} or lower "
            "--character_coverage"
        )
    if "sentences_.empty()" in text:
        return ZhtrainError(f"--corpus {corpus}: no usable sentences (every line empty or longer than 16384 bytes)")
    return ZhtrainError(f"sentencepiece failed on --corpus {corpus}: {text.splitlines()[-1] if text else err!r}")
