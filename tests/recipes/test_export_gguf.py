"""`zhtrain export gguf`: argument handling and errors (fast, fake converter), the converter fetch, and an
end-to-end run of llama.cpp's real converter + xllamacpp on merged models with extended SentencePiece
vocabularies (the converter's source is fetched from PyPI once and cached)."""

from __future__ import annotations

import hashlib
import io
import shutil
import sys
import tarfile
import time
from pathlib import Path

import pytest
from merge_fixtures import copy_tokenizer, load_model, make_adapter

from zhtrain import export
from zhtrain.errors import ZhtrainError
from zhtrain.export import export_gguf, parse_gguf_args

FAKE_OK = """import sys, pathlib
args = sys.argv[1:]
out = pathlib.Path(args[args.index("--outfile") + 1])
out.write_bytes(b"GGUF" + " ".join(args).encode())
print("INFO:hf-to-gguf:Model successfully exported")
"""
FAKE_FAIL = """import sys
print("INFO:hf-to-gguf:Loading model")
print("ValueError: boom in the converter")
sys.exit(1)
"""


@pytest.fixture(scope="module")
def merged(tmp_path_factory, tiny_model_dir, sp_tokenizer_dir):
    from zhtrain.merge import merge, parse_merge_args

    root = tmp_path_factory.mktemp("export")
    adapter = make_adapter(load_model(tiny_model_dir), root / "lora", sp_tokenizer_dir)
    merge(
        parse_merge_args(
            [
                "--base_model",
                str(tiny_model_dir),
                "--lora_model",
                str(adapter),
                "--output_dir",
                str(root / "merged"),
                "--no-verify",
            ]
        )
    )
    return {"root": root, "model": root / "merged", "adapter": adapter}


def fake(tmp_path: Path, source: str) -> Path:
    path = tmp_path / "convert_hf_to_gguf.py"
    path.write_text(source)
    return path


def export_with(*argv) -> Path:
    return export_gguf(parse_gguf_args([str(a) for a in argv]))


def test_export_runs_the_converter_into_a_temp_file(merged, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    export_with(
        merged["model"], "--outfile", out, "--outtype", "f32", "--converter", fake(tmp_path, FAKE_OK), "--no-check"
    )
    args = out.read_bytes()[4:].decode().split()
    assert args[0] == str(merged["model"]) and args[args.index("--outtype") + 1] == "f32"
    assert Path(args[args.index("--outfile") + 1]).name.startswith(".m.gguf.tmp-")  # renamed into place afterwards
    assert sorted(p.name for p in tmp_path.iterdir()) == ["convert_hf_to_gguf.py", "m.gguf"]
    # The fixture tokenizer was trained with SentencePiece's default NFKC normaliser, which llama.cpp lacks.
    assert "normalises text with 'nmt_nfkc'" in capsys.readouterr().err


def test_converter_failure_is_one_line_and_leaves_no_file(merged, tmp_path):
    with pytest.raises(ZhtrainError, match=r"converter failed on .*\(exit 1\): ValueError: boom in the converter"):
        export_with(
            merged["model"], "--outfile", tmp_path / "m.gguf", "--converter", fake(tmp_path, FAKE_FAIL), "--no-check"
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["convert_hf_to_gguf.py"]


def test_bad_inputs(merged, tmp_path, capsys):
    converter = fake(tmp_path, FAKE_OK)
    with pytest.raises(ZhtrainError, match="LoRA adapter, not a model"):
        export_with(merged["adapter"], "--converter", converter)
    with pytest.raises(ZhtrainError, match="no such folder"):
        export_with(tmp_path / "nothing", "--converter", converter)
    existing = tmp_path / "old.gguf"
    existing.write_bytes(b"old")
    with pytest.raises(ZhtrainError, match="exists; pass --overwrite"):
        export_with(merged["model"], "--outfile", existing, "--converter", converter)
    assert existing.read_bytes() == b"old"
    export_with(merged["model"], "--outfile", existing, "--converter", converter, "--overwrite", "--no-check")
    assert existing.read_bytes().startswith(b"GGUF")
    no_tokenizer = tmp_path / "no_tok"
    shutil.copytree(merged["model"], no_tokenizer, ignore=shutil.ignore_patterns("tokenizer*"))
    with pytest.raises(ZhtrainError, match="no tokenizer.model or tokenizer.json"):
        export_with(no_tokenizer, "--converter", converter)
    with pytest.raises(ZhtrainError, match="zhtrain export onnx: unknown format"):
        export.main(["onnx", str(merged["model"])])
    export.main([])
    assert "zhtrain export gguf MODEL_DIR" in capsys.readouterr().out


def test_converter_is_extracted_once_from_the_pinned_source_package(tmp_path, monkeypatch):
    """The fetch path without the network: a fake sdist with the real layout, checksum pinned."""
    root = "llama_cpp_python-0.3.36/vendor/llama.cpp/"
    payload = io.BytesIO()
    with tarfile.open(fileobj=payload, mode="w:gz") as archive:
        for name in (
            "convert_hf_to_gguf.py",
            "conversion/__init__.py",
            "gguf-py/gguf/__init__.py",
            "LICENSE",
            "ggml/src/big.c",
        ):
            data = f"# {name}\n".encode()
            info = tarfile.TarInfo(root + name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    blob = payload.getvalue()
    monkeypatch.setenv("ZHTRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(
        export,
        "LLAMA_CPP",
        export.files.Sdist(
            "llama-cpp-python",
            "0.3.36",
            "llama_cpp_python-0.3.36.tar.gz",
            hashlib.sha256(blob).hexdigest(),
            root.rstrip("/"),
        ),
    )
    calls = []

    def downloader(sdist, folder):
        calls.append(sdist.requirement)
        (folder / sdist.filename).write_bytes(blob)

    script = export.ensure_converter(downloader)
    assert script.read_text() == "# convert_hf_to_gguf.py\n"
    tool = script.parent
    assert (tool / "conversion" / "__init__.py").is_file() and (tool / "gguf-py" / "gguf" / "__init__.py").is_file()
    assert not (tool / "ggml").exists()  # only what the converter needs
    assert export.ensure_converter(downloader) == script and calls == ["llama-cpp-python==0.3.36"]


# ---------------------------------------------------------------------------------------------
# llama.cpp's real converter (its source fetched once from PyPI and cached) and llama.cpp itself (xllamacpp)

CHINESE_LINES = [
    "白日依山尽，黄河入海流。",
    "人民日报社论：迎接新的一年。",
    "中国人民银行决定下调存款利率。",
    "欲穷千里目，更上一层楼",
]


def extend_sentencepiece(base_model: Path, pieces, dest: Path) -> Path:
    """Append pieces (score 0, normal) to a SentencePiece model, as the seed's merge_tokenizers.py does."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    from transformers import AutoTokenizer

    proto = pb.ModelProto()
    proto.ParseFromString(Path(base_model).read_bytes())
    present = {p.piece for p in proto.pieces}
    for piece in pieces:
        if piece not in present:
            present.add(piece)
            proto.pieces.add(piece=piece, score=0.0)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "tokenizer.model").write_bytes(proto.SerializeToString())
    AutoTokenizer.from_pretrained(str(dest)).save_pretrained(str(dest))
    return dest


def llama_like_sentencepiece(folder: Path) -> Path:
    """A small SentencePiece model with LLaMA's settings (identity normaliser, byte fallback)."""
    import sentencepiece as spm
    from fixtures import make_lines

    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(make_lines(3000, seed=5)),
        model_prefix=str(folder / "tokenizer"),
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    return folder / "tokenizer.model"


def merged_with_extended_vocab(root: Path, base_sp: Path, extra_pieces) -> Path:
    from fixtures import make_tiny_llama
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


def test_gguf_of_a_model_with_an_extended_sentencepiece_vocab(tmp_path):
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


SHARED_TOKENIZERS = Path(__file__).resolve().parents[3] / "shared" / "data" / "tokenizers"


@pytest.mark.skipif(
    not (SHARED_TOKENIZERS / "chinese_sp-20000.model").is_file(),
    reason=f"{SHARED_TOKENIZERS} absent (real LLaMA + Chinese SP tokenizers)",
)
def test_gguf_of_a_model_with_the_real_49953_chinese_llama_vocab(tmp_path):
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
