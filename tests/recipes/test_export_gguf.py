"""`zhtrain export gguf` with llama.cpp's real converter, then llama.cpp itself (xllamacpp) on the GGUF: merged models
with extended SentencePiece vocabularies, llama.cpp's tokens equal to SentencePiece's.

The converter comes from the pinned llama-cpp-python source package, fetched once into the zhtrain cache (the
`gguf_converter` fixture starts that download as soon as the tests are collected).
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from helpers import (
    SHARED_TOKENIZERS,
    copy_tokenizer,
    extend_sentencepiece,
    llama_like_sentencepiece,
    load_model,
    make_adapter,
    make_tiny_llama,
    needs_shared_tokenizers,
)

from zhtrain import export
from zhtrain.export import export_gguf, parse_gguf_args


def export_with(*argv) -> Path:
    return export_gguf(parse_gguf_args([str(a) for a in argv]))


CHINESE_LINES = [
    "白日依山尽，黄河入海流。",
    "人民日报社论：迎接新的一年。",
    "中国人民银行决定下调存款利率。",
    "欲穷千里目，更上一层楼",
]


def merged_with_extended_vocab(root: Path, base_sp: Path, extra_pieces) -> Path:
    from transformers import AutoTokenizer

    from zhtrain.merge import merge, parse_merge_args

    base_vocab = len(AutoTokenizer.from_pretrained(str(base_sp.parent)))
    base = make_tiny_llama(root / "base", vocab_size=base_vocab)
    copy_tokenizer(base_sp.parent, base)
    extended = extend_sentencepiece(base_sp, extra_pieces, root / "extended_tokenizer")
    adapter = make_adapter(load_model(base), root / "pt_lora_model", extended)
    out = root / "merged"
    merge(parse_merge_args(["--base_model", str(base), "--lora_model", str(adapter), "--output_dir", str(out)]))
    return out


def check_gguf(model_dir: Path, tmp_path: Path, base_size: int) -> dict:
    """Export, then llama.cpp's tokens == SentencePiece's (tokenizer.model) on Chinese lines, using appended pieces."""
    import sentencepiece as spm

    start = time.perf_counter()
    gguf = export_with(model_dir, "--outfile", tmp_path / "model.gguf", "--outtype", "f32")  # --check runs by default
    processor = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    theirs = export.gguf_tokenize(gguf, CHINESE_LINES)
    for line in CHINESE_LINES:
        assert theirs[line] == processor.encode(line), line
    assert any(i >= base_size for ids in theirs.values() for i in ids)  # the appended pieces are in use
    print(f"gguf export + llama.cpp check of {model_dir}: {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return theirs


def test_gguf_of_a_model_with_an_extended_sentencepiece_vocab(tmp_path, gguf_converter):
    """Appended pieces as a real Chinese SentencePiece model has them (characters, then words): llama.cpp, SentencePiece
    and the Hugging Face tokenizer all agree."""
    from transformers import AutoTokenizer

    base_sp = llama_like_sentencepiece(tmp_path / "base_tokenizer")
    words = [
        "白日",
        "依山",
        "黄河",
        "入海",
        "人民",
        "日报",
        "社论",
        "人民日报",
        "中国",
        "银行",
        "存款",
        "利率",
        "千里",
        "一层",
    ]
    extra = sorted({c for w in words for c in w}) + words
    model = merged_with_extended_vocab(tmp_path, base_sp, extra)
    theirs = check_gguf(model, tmp_path, base_size=400)
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    for line in CHINESE_LINES:
        assert theirs[line] == tokenizer(line, add_special_tokens=False).input_ids, line


@needs_shared_tokenizers
def test_gguf_of_a_model_with_the_real_49953_chinese_llama_vocab(tmp_path, gguf_converter):
    from sentencepiece import sentencepiece_model_pb2 as pb

    chinese = pb.ModelProto()
    chinese.ParseFromString((SHARED_TOKENIZERS / "chinese_sp-20000.model").read_bytes())
    base_sp = tmp_path / "llama" / "tokenizer.model"
    base_sp.parent.mkdir()
    shutil.copyfile(SHARED_TOKENIZERS / "llama-32000.model", base_sp)
    model = merged_with_extended_vocab(tmp_path, base_sp, [p.piece for p in chinese.pieces if p.type == 1])
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(str(model))) == 49953
    check_gguf(model, tmp_path, base_size=32000)
