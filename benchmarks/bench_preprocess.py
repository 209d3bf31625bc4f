"""P1 / P2: preprocessing throughput against the seed's recipe, and peak memory against corpus size.

P1. The same file of real Chinese text (People's Daily 1998-01, reshuffled and repeated to the
size asked) is turned into cached training blocks by:

  baseline  the seed's recipe (run_clm_pt_with_peft.py): the slow `LlamaTokenizer` (in
            transformers 5, which dropped it: zhtrain's SentencePieceLlamaTokenizer, the same
            sentencepiece-backed Python tokenizer and ids), `load_dataset("text")`, `datasets.map`
            of the tokenizer per line (batched, num_proc = workers), `group_texts` per 1000-line
            batch into blocks of 512, `save_to_disk`, `train_test_split`
  baseline-fast  the same recipe with transformers 5's AutoTokenizer (the `tokenizers` conversion,
            faster than the seed's tokenizer; on the Chinese merge its ids differ from the seed's
            on about a third of lines, see zhtrain/sp_tokenizer.py)
  zhtrain   `zhtrain.data.text.load_text_blocks` (what `zhtrain pretrain --preprocess_only` runs),
            `workers` processes, cache rebuilt from scratch, its default (exact) tokenization path:
            raw sentencepiece, checked against the tokenizer's own ids at run time
  raw       `sentencepiece.encode` of the same lines, already in memory, on all cores (the better
            of its own threads and one process per core): the practical limit the fast path is
            measured against (ids counted, not written anywhere)

each in a fresh child process, alternating, `--repeats` times; medians and ratios are printed side
by side. Throughput is given in text MB/s (the same input for all) and tokens/s (each path's own
count: zhtrain adds BOS and EOS per line, the baseline's tokenizer BOS only, raw neither).

P2. zhtrain's peak memory (whole process tree, PSS and RSS) on files of `--p2-sizes` MB.

    python benchmarks/bench_preprocess.py                       # P1 (merged 49953 tokenizer) + P2
    python benchmarks/bench_preprocess.py --tokenizer llama --repeats 3 --p2-sizes
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    MB,
    OUT,
    build_corpus,
    chinese_llama_tokenizer,
    gb,
    llama_tokenizer,
    median,
    repeat_file,
    run_child,
    write_json,
)  # noqa: E402

BASELINE = r"""
import json, os, sys, time
from itertools import chain
import datasets
from datasets import load_dataset
from transformers import AutoTokenizer
datasets.disable_progress_bars()
tokenizer_dir, data_file, cache, workers, which = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
if which == "slow":  # the seed's LlamaTokenizer: sentencepiece behind the Python tokenizer API
    from zhtrain.sp_tokenizer import SentencePieceLlamaTokenizer
    tokenizer = SentencePieceLlamaTokenizer.from_pretrained(tokenizer_dir)
else:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
block_size = 512

def tokenize_function(examples):
    return tokenizer(examples["text"])

def group_texts(examples):  # the seed's, verbatim in substance
    concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
    total_length = len(concatenated[list(examples.keys())[0]])
    if total_length >= block_size:
        total_length = (total_length // block_size) * block_size
    result = {k: [t[i : i + block_size] for i in range(0, total_length, block_size)] for k, t in concatenated.items()}
    result["labels"] = result["input_ids"].copy()
    return result

start = time.perf_counter()
raw = load_dataset("text", data_files=data_file, cache_dir=os.path.join(cache, "text"), keep_in_memory=False)
tokenized = raw.map(tokenize_function, batched=True, num_proc=workers, remove_columns="text", load_from_cache_file=True,
                    keep_in_memory=False, cache_file_names={k: os.path.join(cache, "tokenized.arrow") for k in raw})
grouped = tokenized.map(group_texts, batched=True, num_proc=workers, load_from_cache_file=True, keep_in_memory=False,
                        cache_file_names={k: os.path.join(cache, "grouped.arrow") for k in tokenized})
grouped.save_to_disk(os.path.join(cache, "saved"))
split = datasets.load_from_disk(os.path.join(cache, "saved"))["train"].train_test_split(test_size=0.001)
seconds = time.perf_counter() - start
import pyarrow.compute as pc
tokens = int(pc.sum(pc.list_value_length(tokenized["train"].data.column("input_ids"))).as_py())
print(json.dumps({"seconds": seconds, "tokens": tokens, "blocks": len(split["train"]) + len(split["test"])}))
"""

ZHTRAIN = r"""
import json, logging, sys, time
from zhtrain.data.text import load_text_blocks
from zhtrain.model import load_tokenizer
tokenizer_dir, data_dir, cache, workers, mode = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
chosen = []
class Catch(logging.Handler):
    def emit(self, record):
        message = record.getMessage()
        if message.startswith(("tokenizing with", "not tokenizing with")):
            chosen.append(message)
logging.getLogger("zhtrain").addHandler(Catch()); logging.getLogger("zhtrain").setLevel(logging.INFO)
tokenizer = load_tokenizer(tokenizer_dir, backend="tokenizers" if mode == "tok" else "auto")
start = time.perf_counter()
train, evaluation, stats = load_text_blocks(data_dir, tokenizer, 512, cache, 0.001, workers=workers,
                                            overwrite_cache=True, show_progress=False, fast_tokenization=mode != "hf")
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "tokens": stats.tokens, "blocks": stats.train_blocks + stats.eval_blocks,
                  "encoder": chosen}))
"""

RAW = r"""
import json, multiprocessing, os, sys, time
import sentencepiece
from zhtrain.data.text import iter_line_batches
from pathlib import Path
model, data_file = sys.argv[1], sys.argv[2]
batches = list(iter_line_batches(Path(data_file)))
processor = sentencepiece.SentencePieceProcessor(model_file=model)
cores = len(os.sched_getaffinity(0))

def count(i):
    return sum(len(ids) for ids in processor.encode(batches[i], num_threads=1))

# The better of: one process with sentencepiece's own threads, one process per core.
start = time.perf_counter()
tokens = sum(len(ids) for batch in batches for ids in processor.encode(batch, num_threads=cores))
threads_seconds = time.perf_counter() - start
with multiprocessing.get_context("fork").Pool(cores) as pool:
    start = time.perf_counter()
    assert sum(pool.imap(count, range(len(batches)))) == tokens
    processes_seconds = time.perf_counter() - start
print(json.dumps({"seconds": min(threads_seconds, processes_seconds), "tokens": tokens,
                  "threads_seconds": threads_seconds, "processes_seconds": processes_seconds}))
"""


def prepare(tokenizer_kind: str, size_mb: float) -> tuple[Path, Path]:
    tokenizer = (
        chinese_llama_tokenizer(OUT / "tokenizer-49953")
        if tokenizer_kind == "chinese"
        else llama_tokenizer(OUT / "tokenizer-32000")
    )
    corpus = build_corpus(OUT / f"corpus-{size_mb:g}MB" / "peoples_daily.txt", size_mb)
    return tokenizer, corpus


def run_trial(
    kind: str, tokenizer: Path, corpus: Path, workers: int, scratch: Path, pss_every: Optional[float] = None
) -> dict:
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        if kind in ("baseline", "baseline-fast"):
            result = run_child(
                BASELINE,
                [str(tokenizer), str(corpus), str(scratch), str(workers), "slow" if kind == "baseline" else "fast"],
            )
        elif kind == "raw":
            result = run_child(RAW, [str(tokenizer / "tokenizer.model"), str(corpus)])
        else:
            mode = {"zhtrain-hf": "hf", "zhtrain-tok": "tok"}.get(kind, "auto")
            n = 1 if kind == "zhtrain-1proc" else workers
            result = run_child(
                ZHTRAIN, [str(tokenizer), str(corpus.parent), str(scratch), str(n), mode], pss_every=pss_every
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result["mb_per_s"] = corpus.stat().st_size / MB / result["seconds"]
    result["tokens_per_s"] = result["tokens"] / result["seconds"]
    return result


def p1(tokenizer_kind: str, size_mb: float, workers: int, repeats: int, kinds: list[str]) -> dict:
    tokenizer, corpus = prepare(tokenizer_kind, size_mb)
    runs: dict[str, list[dict]] = {kind: [] for kind in kinds}
    for r in range(repeats):
        for kind in kinds if r % 2 == 0 else kinds[::-1]:  # alternate the order too
            result = run_trial(kind, tokenizer, corpus, workers, OUT / "scratch")
            runs[kind].append(result)
            print(
                f"  P1 run {r + 1}/{repeats} {kind:<14} {result['seconds']:7.2f}s  {result['mb_per_s']:6.2f} MB/s  "
                f"{result['tokens_per_s'] / 1e6:5.2f} M tokens/s  peak {gb(result['peak_pss'])} PSS"
                + (f"  [{'; '.join(result['encoder'])}]" if result.get("encoder") else ""),
                flush=True,
            )
    summary = {
        kind: {
            "seconds": median(r["seconds"] for r in rs),
            "mb_per_s": median(r["mb_per_s"] for r in rs),
            "tokens_per_s": median(r["tokens_per_s"] for r in rs),
            "tokens": rs[0]["tokens"],
            "peak_pss": median(r["peak_pss"] for r in rs),
            "peak_rss": median(r["peak_rss"] for r in rs),
            "encoder": rs[0].get("encoder"),
            "runs": rs,
        }
        for kind, rs in runs.items()
    }
    report = {
        "tokenizer": tokenizer_kind,
        "size_mb": corpus.stat().st_size / MB,
        "workers": workers,
        "repeats": repeats,
        "kinds": summary,
    }
    print_p1(report)
    return report


def print_p1(report: dict) -> None:
    kinds = report["kinds"]
    print(
        f"\nP1 preprocessing, {report['size_mb']:.0f} MB People's Daily, tokenizer {report['tokenizer']}, "
        f"{report['workers']} workers, median of {report['repeats']}:"
    )
    print(f"  {'path':<14} {'seconds':>8} {'MB/s':>7} {'M tok/s':>8} {'peak PSS':>9}  {'x baseline':>10} {'of raw':>7}")
    for kind, s in kinds.items():
        vs_base = s["mb_per_s"] / kinds["baseline"]["mb_per_s"] if "baseline" in kinds else float("nan")
        vs_raw = s["tokens_per_s"] / kinds["raw"]["tokens_per_s"] if "raw" in kinds else float("nan")
        print(
            f"  {kind:<14} {s['seconds']:8.2f} {s['mb_per_s']:7.2f} {s['tokens_per_s'] / 1e6:8.2f} "
            f"{gb(s['peak_pss']):>9}  {vs_base:9.2f}x {vs_raw:6.0%}"
        )
    print(
        "  (peak PSS read at RSS highs only, so as not to slow these runs: a lower bound for forked workers; P2 is the "
        "memory figure)"
    )


def p2(tokenizer_kind: str, sizes: list[float], workers: int) -> dict:
    tokenizer, corpus = prepare(tokenizer_kind, 50)
    rows = []
    for size in sizes:
        folder = OUT / f"p2-{size:g}MB"
        big = repeat_file(corpus, folder / "big.txt", size)
        big_size = big.stat().st_size / MB
        try:
            result = run_trial("zhtrain", tokenizer, big, workers, OUT / "scratch", pss_every=0.05)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        result["size_mb"] = big_size
        rows.append(result)
        print(
            f"  P2 {big_size:6.0f} MB  {result['seconds']:7.1f}s  {result['tokens'] / 1e6:7.1f} M tokens  "
            f"peak PSS {gb(result['peak_pss'])}  peak RSS {gb(result['peak_rss'])}",
            flush=True,
        )
    report = {"tokenizer": tokenizer_kind, "workers": workers, "rows": rows}
    print_p2(report)
    return report


def print_p2(report: dict) -> None:
    print(f"\nP2 preprocessing peak memory (zhtrain, tokenizer {report['tokenizer']}, {report['workers']} workers):")
    print(f"  {'text':>8} {'seconds':>8} {'M tokens':>9} {'peak PSS':>9} {'peak RSS':>9}")
    for row in report["rows"]:
        print(
            f"  {row['size_mb']:6.0f}MB {row['seconds']:8.1f} {row['tokens'] / 1e6:9.1f} {gb(row['peak_pss']):>9} "
            f"{gb(row['peak_rss']):>9}"
        )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tokenizer", choices=["chinese", "llama"], default="chinese", help="chinese = LLaMA+Chinese 49953 (default)"
    )
    parser.add_argument("--mb", type=float, default=50, help="P1 corpus size in MB")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--kinds",
        default="baseline,baseline-fast,zhtrain,raw",
        help="baseline (the seed's slow tokenizer), baseline-fast (AutoTokenizer), zhtrain (default paths), raw; "
        "also zhtrain-1proc (one process), zhtrain-hf (--fast_tokenization False), zhtrain-tok "
        "(--tokenizer_backend tokenizers: transformers 5's ids)",
    )
    parser.add_argument("--p2-sizes", type=float, nargs="*", default=[100, 500, 1000], help="MB; none to skip P2")
    parser.add_argument("--p2-tokenizer", choices=["chinese", "llama"], default=None, help="default: --tokenizer")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    report = {}
    if args.repeats > 0:
        report["p1"] = p1(args.tokenizer, args.mb, args.workers, args.repeats, args.kinds.split(","))
    if args.p2_sizes:
        report["p2"] = p2(args.p2_tokenizer or args.tokenizer, args.p2_sizes, args.workers)
    if args.json:
        write_json(Path(args.json), report)
    return report


if __name__ == "__main__":
    main()
