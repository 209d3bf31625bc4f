"""`zhtrain tokenizer train | merge | extend`: build the vocabulary the model is then trained with.

    train   a Chinese SentencePiece model from a corpus            (what chinese_sp.model was)
    merge   append its pieces to LLaMA's tokenizer                  (the seed's merge_tokenizers.py)
    extend  learn new tokens for a byte-level BPE tokenizer, and/or add listed tokens
            (SmolLM2 / Llama-3 / Qwen `tokenizer.json`), never changing an existing id

Every command writes a ready Hugging Face tokenizer folder (pass it as `--tokenizer_name_or_path`)
built aside and renamed into place; an existing folder is replaced only with `--overwrite`.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from zhtrain.errors import ZhtrainError, at_least, check_distinct
from zhtrain.tokenizer import bpe, corpus, folder
from zhtrain.tokenizer import sentencepiece_model as sp
from zhtrain.tokenizer.corpus import iter_lines
from zhtrain.tokenizer.loading import load_tokenizer
from zhtrain.training.args import parse_args

SUBCOMMANDS = ("train", "merge", "extend")


POEM = "白日依山尽，黄河入海流。"


@dataclass
class TrainArguments:
    corpus: list[str] = field(
        default_factory=list,
        metadata={"help": "Text files, or folders of *.txt, one sentence or paragraph per line.", "nargs": "+"},
    )
    output_dir: Optional[str] = field(
        default=None, metadata={"help": "Folder for chinese_sp.model and chinese_sp.vocab."}
    )
    vocab_size: int = field(
        default=20000, metadata={"help": "Pieces in the model (Chinese-LLaMA's chinese_sp.model has 20000)."}
    )
    model_type: str = field(
        default="unigram",
        metadata={"help": "sentencepiece algorithm (chinese_sp.model is unigram).", "choices": ["unigram", "bpe"]},
    )
    character_coverage: float = field(
        default=0.9995, metadata={"help": "Share of characters covered by pieces; the rarest become <unk>."}
    )
    input_sentence_size: int = field(
        default=2_000_000,
        metadata={
            "help": "Sampling cap: sentencepiece keeps a uniform random sample of this many lines (in memory); 0 = all."
        },
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace --output_dir if it exists."})

    def __post_init__(self):
        at_least(self.vocab_size, 2, "--vocab_size")
        at_least(self.input_sentence_size, 0, "--input_sentence_size")
        if not 0.98 <= self.character_coverage <= 1:
            raise ZhtrainError(
                f"--character_coverage {self.character_coverage}: sentencepiece takes 0.98 to 1 (0.9995 for Chinese, 1 "
                "for small alphabets)"
            )


@dataclass
class MergeArguments:
    llama_tokenizer_dir: Optional[str] = field(
        default=None, metadata={"help": "Base tokenizer: a folder with tokenizer.model, or the .model file."}
    )
    chinese_sp_model_file: str = field(
        default="./chinese_sp.model", metadata={"help": "The SentencePiece model whose pieces are appended."}
    )
    output_dir: str = field(
        default="merged_tokenizer_hf",
        metadata={"help": "Folder for the merged tokenizer.model and the Hugging Face files."},
    )
    add_pad_token: bool = field(
        default=False, metadata={"help": "Append Chinese-Alpaca's [PAD] (49953 -> 49954) and make it the pad token."}
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace --output_dir if it exists."})


@dataclass
class ExtendArguments:
    tokenizer_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Base tokenizer folder (a model folder works: only tokenizer files are used)."}
    )
    corpus: list[str] = field(
        default_factory=list,
        metadata={"help": "Learn new tokens from these text files / folders of *.txt.", "nargs": "+"},
    )
    num_new_tokens: int = field(
        default=8000, metadata={"help": "How many tokens to learn from --corpus (fewer if the corpus supports fewer)."}
    )
    min_frequency: int = field(default=2, metadata={"help": "A learned token must occur at least this often."})
    new_tokens: Optional[str] = field(
        default=None, metadata={"help": "Tokens to add as they are: comma-separated, or a file with one per line."}
    )
    held_out_every: int = field(
        default=50, metadata={"help": "Every N-th corpus line is held back to measure tokens per character (0 = none)."}
    )
    input_sentence_size: int = field(
        default=1_000_000,
        metadata={"help": "Sampling cap: learn from a uniform random sample of this many lines; 0 = all."},
    )
    output_dir: Optional[str] = field(default=None, metadata={"help": "Folder for the extended tokenizer."})
    overwrite: bool = field(default=False, metadata={"help": "Replace --output_dir if it exists."})

    def __post_init__(self):
        at_least(self.num_new_tokens, 1, "--num_new_tokens")
        at_least(self.min_frequency, 1, "--min_frequency")
        at_least(self.held_out_every, 0, "--held_out_every")
        at_least(self.input_sentence_size, 0, "--input_sentence_size")


def train(args: TrainArguments) -> Path:
    """corpus -> sentencepiece -> <output_dir>/chinese_sp.model (+ .vocab)."""

    files = corpus.corpus_files(args.corpus)
    check_distinct(files, "--corpus")
    inputs = [("--corpus", path) for path in [*args.corpus, *files]]
    folder.check_output_dir(args.output_dir, args.overwrite, inputs)
    corpus.require_text(files)
    counted = _Counter(corpus.iter_lines(files))
    names = " ".join(str(p) for p in files[:3]) + (" ..." if len(files) > 3 else "")
    say(f"training a {args.model_type} SentencePiece model of {args.vocab_size:,} pieces on {len(files)} file(s)")
    with folder.new_output_dir(args.output_dir, args.overwrite, inputs) as tmp:
        model_path = sp.train_model(
            counted,
            tmp / "chinese_sp",
            args.vocab_size,
            args.model_type,
            args.character_coverage,
            args.input_sentence_size,
            names,
        )
        proto = sp.read_model(model_path, "trained model")
        folder.write_record(
            tmp, {"command": "train", "corpus": [str(p) for p in files], "lines": counted.count, **_plain(args)}
        )
    final = Path(args.output_dir) / "chinese_sp.model"
    say(f"{len(proto.pieces):,} pieces from {counted.count:,} lines -> {final}")
    say(f"{POEM} -> {' '.join(sp.pieces_of(proto, POEM))}")
    say(
        f"next: zhtrain tokenizer merge --llama_tokenizer_dir <llama tokenizer> --chinese_sp_model_file {final} "
        "--output_dir <folder>"
    )
    return final


def merge(args: MergeArguments) -> Path:
    """The seed's merge_tokenizers.py: base pieces + the Chinese pieces it lacks -> tokenizer folder."""

    inputs = [
        ("--llama_tokenizer_dir", args.llama_tokenizer_dir),
        ("--chinese_sp_model_file", args.chinese_sp_model_file),
    ]
    folder.check_output_dir(args.output_dir, args.overwrite, inputs)
    base_file = sp.base_model_path(args.llama_tokenizer_dir)
    base = sp.read_model(base_file, "--llama_tokenizer_dir")
    chinese = sp.read_model(Path(args.chinese_sp_model_file), "--chinese_sp_model_file")
    merged = sp.merge_models(base, chinese, args.add_pad_token)
    with folder.new_output_dir(args.output_dir, args.overwrite, inputs) as tmp:
        size = sp.write_hf_folder(merged, tmp, args.add_pad_token)
        folder.write_record(
            tmp,
            {"command": "merge", "base": str(base_file), "base_size": len(base.pieces), "size": size, **_plain(args)},
        )
    added = size - len(base.pieces) - (1 if args.add_pad_token else 0)
    pad = f" + {sp.PAD_PIECE}" if args.add_pad_token else ""
    say(
        f"{len(base.pieces):,} base pieces + {added:,} new from {args.chinese_sp_model_file}{pad} = {size:,} -> "
        f"{args.output_dir}"
    )
    say(f"{POEM}  base: {' '.join(sp.pieces_of(base, POEM))}")
    say(f"{POEM}  merged: {' '.join(sp.pieces_of(merged, POEM))}")
    return Path(args.output_dir)


def extend(args: ExtendArguments) -> Path:
    """Learn tokens from a corpus (byte-level BPE) and/or add listed ones; report tokens per character."""

    base_dir = Path(args.tokenizer_name_or_path or "")
    if base_dir.is_file():
        base_dir = base_dir.parent  # a tokenizer.json path: its folder, as load_tokenizer reads it
    listed = parse_new_tokens(args.new_tokens)
    if not args.corpus and not listed:
        raise ZhtrainError(
            "zhtrain tokenizer extend: nothing to add; pass --corpus to learn tokens and/or --new_tokens"
        )
    inputs = [("--tokenizer_name_or_path", base_dir), *[("--corpus", path) for path in args.corpus]]
    if args.new_tokens and Path(args.new_tokens).is_file():
        inputs.append(("--new_tokens", args.new_tokens))
    folder.check_output_dir(args.output_dir, args.overwrite, inputs)
    base = load_tokenizer(args.tokenizer_name_or_path)
    held_out = corpus.HeldOut(every=args.held_out_every)
    learned, spec = None, None
    if args.corpus:
        spec = bpe.read_bpe_json(base_dir)
        files = corpus.corpus_files(args.corpus)
        check_distinct(files, "--corpus")
        corpus.require_text(files)
        lines = corpus.reservoir_sample(held_out.split(corpus.iter_lines(files)), args.input_sentence_size)
        say(
            f"learning up to {args.num_new_tokens:,} tokens from {len(lines):,} lines ({len(held_out.lines):,} held "
            "out)"
        )
        learned = bpe.learn_tokens(spec, lines, args.num_new_tokens, args.min_frequency)
        if not learned.tokens:
            raise ZhtrainError(
                f"--corpus: no new token occurs at least {args.min_frequency} times that the base lacks; "
                "pass more text or a lower --min_frequency"
            )
    with folder.new_output_dir(args.output_dir, args.overwrite, inputs) as tmp:
        copy_tokenizer_files(base_dir, tmp)
        expected = len(base)
        if learned is not None:
            (tmp / "tokenizer.json").write_text(_json(bpe.extended_spec(spec, learned)), encoding="utf-8")
            expected += len(learned.tokens)
        tokenizer = folder.load_hf_tokenizer(tmp, expected, str(tmp))
        if learned is not None:
            bpe.check_extension(spec, tokenizer, learned)
        if listed:
            check_not_present(tokenizer, listed)
            tokenizer.add_tokens(listed)
            tokenizer.save_pretrained(str(tmp))
            tokenizer = folder.load_hf_tokenizer(tmp, expected + len(listed), str(tmp))
        before = corpus.tokens_per_character(base, held_out.lines)
        after = corpus.tokens_per_character(tokenizer, held_out.lines)
        record = {
            "command": "extend",
            "base": str(base_dir),
            "base_size": len(base),
            "size": len(tokenizer),
            "learned": len(learned.tokens) if learned else 0,
            "listed": len(listed),
            "held_out_lines": len(held_out.lines),
            "tokens_per_character": {"base": before, "extended": after},
            **_plain(args),
        }
        folder.write_record(tmp, record)
    say(
        f"{len(base):,} tokens + {record['learned']:,} learned + {len(listed):,} listed = {len(tokenizer):,} -> "
        f"{args.output_dir}"
    )
    if learned is not None:
        say(f"first learned: {bpe.readable(tokenizer, learned.tokens)}")
    if before and after:
        say(
            f"tokens per character on {len(held_out.lines):,} held-out lines: {before:.3f} -> {after:.3f} "
            f"({100 * (after / before - 1):+.1f}%)"
        )
    return Path(args.output_dir)


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)


def copy_tokenizer_files(src: Path, dest: Path) -> None:
    """The base's tokenizer files only (a model folder's weights are not copied; slow vocab/merges files
    would be stale next to the extended tokenizer.json)."""
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dest / name)


def parse_new_tokens(value: Optional[str]) -> list[str]:
    """`--new_tokens a,b,c` or `--new_tokens file.txt` (one token per line)."""
    if not value:
        return []
    path = Path(value)
    if path.is_file():
        tokens = list(iter_lines([path]))
    elif "," not in value and (path.suffix in (".txt", ".tsv", ".list", ".csv") or "/" in value):
        raise ZhtrainError(
            f"--new_tokens {value}: no such file; pass a file with one token per line, or the tokens comma-separated"
        )
    else:
        tokens = [token.strip() for token in value.split(",") if token.strip()]
    seen: set[str] = set()
    for token in tokens:
        if token in seen:
            raise ZhtrainError(f"--new_tokens: {token!r} is listed twice; list each token once")
        seen.add(token)
    return tokens


def check_not_present(tokenizer, tokens: list[str]) -> None:
    """A listed token must be new: not in the vocabulary, and not already encoded as one token."""
    vocab = tokenizer.get_vocab()
    for token in tokens:
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        if token in vocab or len(ids) == 1:
            index = vocab.get(token, ids[0] if ids else None)
            raise ZhtrainError(f"--new_tokens: {token!r} is already a token (id {index}); remove it from the list")


class _Counter:
    """Counts the lines sentencepiece pulls from the stream."""

    def __init__(self, lines):
        self.lines, self.count = lines, 0

    def __iter__(self):
        for line in self.lines:
            self.count += 1
            yield line


def _plain(args) -> dict:
    return {"arguments": dict(vars(args))}


def _json(data: dict) -> str:
    import json

    return json.dumps(data, ensure_ascii=False, indent=2) + "\n"


def say(message: str) -> None:
    print(f"zhtrain tokenizer: {message}", flush=True)


ARGUMENTS = {"train": TrainArguments, "merge": MergeArguments, "extend": ExtendArguments}


RECIPES = {"train": train, "merge": merge, "extend": extend}


def usage() -> str:
    return (
        "usage: zhtrain tokenizer {train,merge,extend} [--flag value ...]\n\n"
        + (__doc__ or "").split("\n\n")[1]
        + "\n\n`zhtrain tokenizer <subcommand> --help` lists its flags."
    )


def main(argv=None) -> None:

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    name = argv.pop(0)
    if name not in RECIPES:
        raise ZhtrainError(f"zhtrain tokenizer: unknown subcommand {name!r}; choose one of: {', '.join(SUBCOMMANDS)}")
    (args,) = parse_args((ARGUMENTS[name],), argv, prog=f"zhtrain tokenizer {name}")
    RECIPES[name](args)
