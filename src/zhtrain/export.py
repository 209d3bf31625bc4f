"""`zhtrain export gguf`: a merged Hugging Face model -> one GGUF file, through llama.cpp's own converter.

    zhtrain merge --base_model llama --lora_model pt_lora_model --output_dir merged
    zhtrain export gguf merged --outfile merged-f16.gguf --outtype f16

The converter is llama.cpp's `convert_hf_to_gguf.py` (with its `conversion/` package and its own
`gguf-py`), taken from the pinned `llama-cpp-python` source package on PyPI the first time and cached
under `$ZHTRAIN_CACHE/tools/` (or pass `--converter path/to/llama.cpp/convert_hf_to_gguf.py`). It runs
as a subprocess into a temporary file that is renamed into place only when it succeeded.

With `xllamacpp` installed (a prebuilt llama.cpp binding), the GGUF is then loaded by llama.cpp itself
and its tokenization of sample Chinese lines is compared with the Hugging Face tokenizer's.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from zhtrain import files
from zhtrain.cli import (
    CommandParser,  # config file first, --print_config, one-line errors
)
from zhtrain.errors import ZhtrainError, run_command
from zhtrain.tokenizer.loading import load_tokenizer
from zhtrain.weights.hf_folder import open_checkpoint

LLAMA_CPP = files.Sdist(
    "llama-cpp-python",
    "0.3.36",
    "llama_cpp_python-0.3.36.tar.gz",
    "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
    "llama_cpp_python-0.3.36/vendor/llama.cpp",
)
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
OUTTYPES = ("f32", "f16", "bf16", "q8_0", "auto")
CHECK_LINES = (
    "白日依山尽，黄河入海流。",
    "人民日报社论：迎接新的一年。",
    "中国人民银行决定下调存款利率。",
    "Hello, world!",
)


@dataclass
class GgufOptions:
    model_dir: Path
    outfile: Path
    outtype: str = "f16"
    overwrite: bool = False
    converter: Optional[Path] = None
    check: Optional[bool] = None  # None: check when xllamacpp is installed


def usage() -> str:
    return (
        "usage: zhtrain export gguf MODEL_DIR [--outfile FILE] [--outtype f16] [--overwrite]\n\n"
        "formats:\n  gguf  llama.cpp's GGUF (convert_hf_to_gguf.py)"
    )


def main(argv: Optional[list[str]] = None) -> None:
    argv = list(argv or [])
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    if argv[0] != "gguf":
        raise ZhtrainError(f"zhtrain export {argv[0]}: unknown format; choose: gguf")
    export_gguf(parse_gguf_args(argv[1:]))


def parse_gguf_args(argv: list[str]) -> GgufOptions:
    p = CommandParser(prog="zhtrain export gguf", description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", help="A merged model folder in Hugging Face format (from zhtrain merge).")
    p.add_argument("--outfile", default=None, help="The GGUF file (default: MODEL_DIR/ggml-model-OUTTYPE.gguf).")
    p.add_argument(
        "--outtype",
        choices=OUTTYPES,
        default="f16",
        help="Tensor type, as llama.cpp's converter (default: %(default)s).",
    )
    p.add_argument("--overwrite", action="store_true", help="Replace an existing --outfile.")
    p.add_argument(
        "--converter",
        default=None,
        help="Use this convert_hf_to_gguf.py (a llama.cpp checkout) instead of the cached one.",
    )
    p.add_argument(
        "--check",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Load the GGUF with xllamacpp and compare its tokenization with the HF tokenizer (default: when "
        "installed).",
    )
    ns = p.parse_args(argv)
    model_dir = Path(ns.model_dir)
    outfile = Path(ns.outfile) if ns.outfile else model_dir / f"ggml-model-{ns.outtype}.gguf"
    return GgufOptions(
        model_dir, outfile, ns.outtype, ns.overwrite, Path(ns.converter) if ns.converter else None, ns.check
    )


def export_gguf(opts: GgufOptions) -> Path:
    """The recipe: check the folder -> get the converter -> convert into a temp file -> rename -> check."""

    start = time.perf_counter()
    open_checkpoint(opts.model_dir, flag="zhtrain export gguf")  # says "run zhtrain merge" for an adapter folder
    if not any((opts.model_dir / name).is_file() for name in ("tokenizer.model", "tokenizer.json")):
        raise ZhtrainError(
            f"{opts.model_dir}: no tokenizer.model or tokenizer.json; a GGUF carries its tokenizer, copy it there"
        )
    if opts.outfile.exists() and not opts.overwrite:
        raise ZhtrainError(f"--outfile {opts.outfile} exists; pass --overwrite to replace it or choose another name")
    warn_about_normalizer(opts.model_dir)
    converter = opts.converter or ensure_converter()
    if not Path(converter).is_file():
        raise ZhtrainError(f"--converter {converter}: no such file; pass llama.cpp's convert_hf_to_gguf.py")
    with files.write_aside(opts.outfile) as tmp:
        run_converter(Path(converter), opts.model_dir, tmp, opts.outtype)
        if not tmp.is_file() or tmp.stat().st_size == 0:
            raise ZhtrainError(f"llama.cpp's converter reported success but wrote no {tmp}; see its log above")
    size = opts.outfile.stat().st_size
    print(
        f"zhtrain export: {opts.outfile} ({size / 2**20:.1f} MiB, {opts.outtype}) in "
        f"{time.perf_counter() - start:.1f}s",
        flush=True,
    )
    check_tokenization(opts)
    return opts.outfile


# ---------------------------------------------------------------------------------------------
# The converter: fetched once, run as a subprocess


def ensure_converter(downloader: Optional[files.Downloader] = None) -> Path:
    """llama.cpp's converter from the pinned llama-cpp-python source package, extracted once into the cache."""
    dest = files.cache_root() / "tools" / f"llama.cpp-{LLAMA_CPP.version}"
    script = dest / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    tarball = files.fetch_sdist(LLAMA_CPP, downloader)
    with files.write_aside(dest) as tmp:
        extract_converter(tarball, tmp)
    return script


def extract_converter(tarball: Path, dest: Path) -> None:
    root = LLAMA_CPP.member + "/"
    wanted = [root + part for part in CONVERTER_PARTS]
    with tarfile.open(tarball, "r:*") as archive:
        members = [
            m
            for m in archive.getmembers()
            if m.isfile() and any(m.name == w or (w.endswith("/") and m.name.startswith(w)) for w in wanted)
        ]
        if not any(m.name == root + "convert_hf_to_gguf.py" for m in members):
            raise ZhtrainError(
                f"{tarball}: has no {root}convert_hf_to_gguf.py; delete it so that it is downloaded again"
            )
        for member in members:
            target = dest / member.name[len(root) :]
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.extractfile(member) as source, open(target, "wb") as out:
                shutil.copyfileobj(source, out)


def run_converter(converter: Path, model_dir: Path, outfile: Path, outtype: str) -> None:
    """Run convert_hf_to_gguf.py; its log streams to stderr, and its last lines go into the error."""
    command = [sys.executable, str(converter), str(model_dir), "--outfile", str(outfile), "--outtype", outtype]
    print(f"zhtrain export: {' '.join(command)}", flush=True)
    tail: collections.deque = collections.deque(maxlen=15)
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, errors="replace"
    )
    assert process.stdout is not None
    for line in process.stdout:
        sys.stderr.write(line)
        tail.append(line.rstrip())
    code = process.wait()
    if code != 0:
        reason = next(
            (line for line in reversed(tail) if "Error" in line or "error" in line), tail[-1] if tail else "no output"
        )
        raise ZhtrainError(
            f"llama.cpp's converter failed on {model_dir} (exit {code}): {reason.strip()}; its full log is above"
        )


def warn_about_normalizer(model_dir: Path) -> None:
    """llama.cpp applies no SentencePiece normaliser: a tokenizer.model with NFKC tokenizes some text differently."""
    path = model_dir / "tokenizer.model"
    if not path.is_file():
        return
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb

        proto = pb.ModelProto()
        proto.ParseFromString(path.read_bytes())
    except Exception:  # not a SentencePiece model: the converter will say so
        return
    name = proto.normalizer_spec.name
    if name and name != "identity":
        print(
            f"zhtrain export: warning: {path} normalises text with {name!r}; llama.cpp does not, so e.g. full-width "
            "punctuation (，) tokenizes differently in the GGUF (LLaMA's own tokenizer uses 'identity')",
            file=sys.stderr,
            flush=True,
        )


# ---------------------------------------------------------------------------------------------
# Check with llama.cpp itself (xllamacpp)


def check_tokenization(opts: GgufOptions) -> Optional[dict]:
    """Load the GGUF in llama.cpp (xllamacpp) and compare its tokens on sample lines with the tokenizer it was
    built from (tokenizer.model when there is one, else tokenizer.json); say so when the HF tokenizer differs."""
    if opts.check is False:
        return None
    if importlib.util.find_spec("xllamacpp") is None:
        if opts.check:
            raise ZhtrainError("--check needs xllamacpp: pip install 'zhtrain[gguf]'")
        print("zhtrain export: tokenization check skipped (pip install xllamacpp to run it)", flush=True)
        return None

    tokenizer = load_tokenizer(str(opts.model_dir))
    hf = {line: tokenizer(line, add_special_tokens=False).input_ids for line in CHECK_LINES}
    sp = sentencepiece_ids(opts.model_dir / "tokenizer.model", CHECK_LINES)
    gguf = gguf_tokenize(opts.outfile, CHECK_LINES)
    source, expected = ("tokenizer.model (SentencePiece)", sp) if sp is not None else ("tokenizer.json", hf)
    for line in CHECK_LINES:
        if gguf[line] != expected[line]:
            raise ZhtrainError(
                f"{opts.outfile}: llama.cpp tokenizes {line!r} as {gguf[line]} but {source} as {expected[line]}; "
                "the GGUF's tokenizer differs from the model's (see the normaliser warning above, if any)"
            )
    differing = [line for line in CHECK_LINES if hf[line] != gguf[line]]
    if differing:
        line = differing[0]
        print(
            "zhtrain export: warning: the Hugging Face tokenizer (tokenizer.json, which zhtrain trains with) tokenizes "
            f"{len(differing)} of {len(CHECK_LINES)} sample lines differently from tokenizer.model, which llama.cpp "
            f"follows: {line!r} -> {hf[line]} vs {gguf[line]}. transformers' conversion of appended SentencePiece "
            "pieces does not reproduce SentencePiece's choices; the GGUF will see other tokens than training did",
            file=sys.stderr,
            flush=True,
        )
    print(
        f"zhtrain export: llama.cpp loads {opts.outfile.name} and tokenizes {len(CHECK_LINES)} sample lines exactly as "
        f"{source}",
        flush=True,
    )
    return {"gguf": gguf, "hf_differs": differing}


def sentencepiece_ids(model_file: Path, lines) -> Optional[dict[str, list[int]]]:
    if not model_file.is_file():
        return None
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=str(model_file))
    return {line: processor.encode(line) for line in lines}


def gguf_tokenize(gguf: Path, lines, add_special: bool = False) -> dict[str, list[int]]:
    """Token ids from llama.cpp itself: xllamacpp's server on a free local port, /tokenize."""
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = str(gguf)
    params.n_ctx, params.n_parallel, params.warmup, params.verbosity = 256, 1, False, -1
    params.cpuparams.n_threads = params.cpuparams_batch.n_threads = 1
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        params.port = probe.getsockname()[1]
    try:
        server = xllamacpp.Server(params)
    except Exception as err:  # llama.cpp refuses the file
        raise ZhtrainError(f"{gguf}: llama.cpp cannot load it ({err})") from err
    try:
        out = {}
        for line in lines:
            body = json.dumps({"content": line, "add_special": add_special}).encode("utf-8")
            request = urllib.request.Request(
                server.listening_address + "/tokenize", data=body, headers={"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=60) as response:
                out[line] = json.loads(response.read())["tokens"]
        return out
    finally:
        del server


if __name__ == "__main__":
    run_command(main, sys.argv[1:])
