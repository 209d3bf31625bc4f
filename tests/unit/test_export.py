"""`zhtrain export gguf`: argument handling and errors with a stand-in converter, and the converter's fetch
(no network).

llama.cpp's real converter and llama.cpp itself run in tests/recipes/test_export_gguf.py."""

from __future__ import annotations

import hashlib
import io
import shutil
import tarfile
from pathlib import Path

import pytest
from helpers import load_model, make_adapter

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
