"""`make bench`: P1-P5 against the seed's recipe, printed and written to benchmarks/results.md.

    python benchmarks/run_all.py             # the full set (about 12-15 minutes on 2 idle cores)
    python benchmarks/run_all.py --quick     # smaller inputs, fewer repeats (a smoke run, ~5 minutes)

P1/P2: bench_preprocess.py, P3/P4: bench_train.py, P5: bench_merge.py (the merge stage's own
benchmark, run as it is when present). Nothing is tuned to the targets: whatever is measured is
written, with the goal beside it and whether it is met. Timings on a machine shared with other
work are inflated; the load average is recorded at the start and the end.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_preprocess  # noqa: E402
import bench_train  # noqa: E402
from common import ENV, OUT, REPO, gb, machine, write_json  # noqa: E402

RESULTS = REPO / "benchmarks" / "results.md"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller inputs and fewer repeats")
    parser.add_argument("--skip", default="", help="comma list of parts to skip: p1,p2,p3,p5")
    parser.add_argument("--output", default=str(RESULTS))
    parser.add_argument(
        "--render-only", action="store_true", help="rewrite results.md from benchmarks/out/results.json"
    )
    args = parser.parse_args(argv)
    if args.render_only:
        import json

        saved = json.loads((OUT / "results.json").read_text())
        text = render(
            saved["machine"],
            saved["report"],
            saved["commands"],
            saved["durations"],
            saved["total"],
            datetime.datetime.fromisoformat(saved["started"]),
            saved["quick"],
        )
        Path(args.output).write_text(text, encoding="utf-8")
        print(summary_table(saved["report"]))
        return
    skip = set(filter(None, args.skip.split(",")))
    started, wall = datetime.datetime.now(), time.perf_counter()
    info = machine()
    print(
        f"machine: {info['cpu']}, {info['cores']} cores, {info['memory_gb']} GB, load average "
        f"{info['load_average_at_start']:.2f}"
    )
    commands, report, durations = [], {}, {}

    p1_args = ["--mb", "20" if args.quick else "50", "--repeats", "1" if args.quick else "3", "--p2-sizes"]
    if "p1" not in skip:
        commands.append("python benchmarks/bench_preprocess.py " + " ".join(p1_args))
        t = time.perf_counter()
        report["p1"] = bench_preprocess.main(p1_args)["p1"]
        durations["P1"] = time.perf_counter() - t
    p2_sizes = ["100", "300"] if args.quick else ["100", "500", "1000"]
    p2_args = ["--repeats", "0", "--p2-tokenizer", "llama", "--p2-sizes", *p2_sizes]
    if "p2" not in skip:
        commands.append("python benchmarks/bench_preprocess.py " + " ".join(p2_args))
        t = time.perf_counter()
        report["p2"] = bench_preprocess.main(p2_args)["p2"]
        durations["P2"] = time.perf_counter() - t
    p3_args = [
        "--steps",
        "24",
        "--repeats",
        "1" if args.quick else "3",
        "--kinds",
        "baseline,zhtrain,baseline-passive,zhtrain-redraw",
    ]
    if "p3" not in skip:
        commands.append("python benchmarks/bench_train.py " + " ".join(p3_args))
        t = time.perf_counter()
        report["p3"] = bench_train.main(p3_args)
        durations["P3/P4"] = time.perf_counter() - t
    merge_script = REPO / "benchmarks" / "bench_merge.py"
    if "p5" not in skip and merge_script.is_file():
        merge_args = ["--layers", "4"] if args.quick else []
        commands.append("python benchmarks/bench_merge.py " + " ".join(merge_args))
        t = time.perf_counter()
        report["p5"] = run_merge_benchmark(merge_script, merge_args)
        durations["P5"] = time.perf_counter() - t
    info["load_average_at_end"] = __import__("os").getloadavg()[0]
    total = time.perf_counter() - wall
    write_json(
        OUT / "results.json",
        {
            "machine": info,
            "report": report,
            "durations": durations,
            "commands": commands,
            "total": total,
            "started": started.isoformat(),
            "quick": args.quick,
        },
    )
    text = render(info, report, commands, durations, total, started, args.quick)
    Path(args.output).write_text(text, encoding="utf-8")
    print("\n" + summary_table(report))
    print(f"\nwritten {args.output} ({total / 60:.1f} minutes)")


def run_merge_benchmark(script: Path, extra: list[str]) -> dict:
    json_path = OUT / "merge.json"
    result = subprocess.run(
        [sys.executable, str(script), "--json", str(json_path), *extra], env=ENV, capture_output=True, text=True
    )
    print(result.stdout, end="")
    if result.returncode != 0:
        print(result.stderr[-3000:], file=sys.stderr)
        return {"error": f"bench_merge.py exited {result.returncode}", "stdout": result.stdout}
    import json

    return {
        "rows": json.loads(json_path.read_text()),
        "table": [l for l in result.stdout.splitlines() if l.startswith("|")],
        "stdout": result.stdout,
    }


# ---------------------------------------------------------------------------------------------
# The results table


def targets(report: dict) -> list[tuple[str, str, str, str]]:
    """(figure, goal, measured, met) for each of P1-P5 that ran."""
    rows = []
    if "p1" in report:
        kinds = report["p1"]["kinds"]
        base, ours, raw = kinds["baseline"], kinds["zhtrain"], kinds["raw"]
        speed, of_raw = ours["mb_per_s"] / base["mb_per_s"], ours["tokens_per_s"] / raw["tokens_per_s"]
        measured = (
            f"{speed:.2f}x baseline ({ours['mb_per_s']:.2f} vs {base['mb_per_s']:.2f} MB/s; "
            f"{ours['tokens_per_s'] / 1e6:.2f} vs {base['tokens_per_s'] / 1e6:.2f} M tokens/s); "
            f"{of_raw:.0%} of raw sentencepiece ({raw['tokens_per_s'] / 1e6:.2f} M tokens/s; "
            f"{ours['mb_per_s'] / raw['mb_per_s']:.0%} in MB/s, as zhtrain's tokens include a BOS and EOS per line)"
        )
        if "baseline-fast" in kinds:
            fast = kinds["baseline-fast"]
            measured += (
                f"; {ours['mb_per_s'] / fast['mb_per_s']:.2f}x the recipe with transformers 5's fast tokenizer "
                f"({fast['mb_per_s']:.2f} MB/s)"
            )
        tokenizer = {"chinese": "49953"}.get(report["p1"]["tokenizer"], report["p1"]["tokenizer"])
        rows.append(
            (
                f"P1 preprocessing tokens/s, {report['p1']['size_mb']:.0f} MB, {tokenizer} tokenizer, "
                f"{report['p1']['workers']} workers",
                ">= 4x baseline and >= 80% of raw sentencepiece",
                measured,
                yes(speed >= 4 and of_raw >= 0.8),
            )
        )
    if "p2" in report:
        peaks = [(r["size_mb"], r["peak_pss"], r["peak_rss"]) for r in report["p2"]["rows"]]
        worst = max(p for _, p, _ in peaks)
        flat = max(p for _, p, _ in peaks) <= 1.25 * min(p for _, p, _ in peaks)
        measured = ", ".join(f"{size:.0f} MB: {gb(pss)} PSS ({gb(rss)} RSS)" for size, pss, rss in peaks)
        rows.append(
            (
                "P2 preprocessing peak memory vs corpus size",
                "< 1.5 GB and flat",
                measured,
                yes(worst < 1.5 * 2**30 and flat),
            )
        )
    if "p3" in report:
        kinds = report["p3"]["kinds"]
        base, ours = kinds["baseline"], kinds["zhtrain"]
        speed = ours["tokens_per_s"] / base["tokens_per_s"]
        gap = bench_train.max_loss_gap(ours["losses"], base["losses"])
        measured = (
            f"{speed:.2f}x ({ours['tokens_per_s']:.0f} vs {base['tokens_per_s']:.0f} tokens/s); largest loss gap "
            f"{gap:.1e}"
        )
        if "baseline-passive" in kinds:
            passive = kinds["baseline-passive"]
            measured += (
                f"; vs the baseline with zhtrain's thread policy (OMP_WAIT_POLICY=PASSIVE): "
                f"{ours['tokens_per_s'] / passive['tokens_per_s']:.2f}x"
            )
        if "zhtrain-redraw" in kinds:
            redraw = kinds["zhtrain-redraw"]
            measured += (
                f"; zhtrain drawing LoRA dropout masks twice (--keep_dropout_masks False): "
                f"{redraw['tokens_per_s']:.0f} tokens/s, loss gap "
                f"{bench_train.max_loss_gap(redraw['losses'], ours['losses']):.1e} to zhtrain"
            )
        rows.append(
            (
                "P3 pre-training tokens/s (4 layers, hidden 256, vocab 49953, block 512)",
                ">= 1.3x baseline, loss curve equal (first 20 steps within 1e-4)",
                measured,
                yes(speed >= 1.3 and gap <= 1e-4),
            )
        )
        memory = ours["peak_pss"] / base["peak_pss"]
        imports = report["p3"]["imports_only_pss"]
        above = (ours["peak_pss"] - imports) / (base["peak_pss"] - imports)
        rows.append(
            (
                "P4 pre-training peak memory",
                "<= 0.6x baseline",
                f"{memory:.2f}x ({gb(ours['peak_pss'])} vs {gb(base['peak_pss'])} PSS); above a process that only "
                f"imports the libraries ({gb(imports)}): {above:.2f}x",
                yes(memory <= 0.6),
            )
        )
    if "p5" in report:
        merge = report["p5"]
        if "rows" in merge:
            ours = [r for r in merge["rows"] if r["method"].startswith("zhtrain")]
            text = "; ".join(
                f"{r['model_mb']:.0f} MiB model, largest shard {r['largest_shard_mb']:.0f} MiB, adapter "
                f"{r['adapter_mb']:.0f} MiB: {r['above_baseline_mb']:.0f} MiB above imports"
                for r in ours[:4]
            )
            rows.append(("P5 merge peak memory vs model size", "about one shard + adapters", text, "see table"))
        else:
            rows.append(("P5 merge peak memory vs model size", "about one shard + adapters", merge["error"], "no"))
    return rows


def yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def summary_table(report: dict) -> str:
    lines = ["| figure | goal | measured | met |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in targets(report)]
    return "\n".join(lines)


def render(info, report, commands, durations, total, started, quick) -> str:
    out = [
        "# zhtrain benchmarks",
        "",
        f"Written by `make bench` (`python benchmarks/run_all.py{' --quick' if quick else ''}`) on "
        f"{started:%Y-%m-%d %H:%M}, {total / 60:.1f} minutes "
        f"({', '.join(f'{k} {v / 60:.1f} min' for k, v in durations.items())}).",
        "Every run is a fresh child process; zhtrain and the baseline alternate; figures are medians.",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
    ]
    out += [f"| {key} | {value} |" for key, value in info.items()]
    out += [
        "",
        "Load average above the core count means other work shared the cores while this ran: absolute",
        "times are then inflated, and ratios of alternating runs are the figures to read.",
        "",
        "## Results",
        "",
        summary_table(report),
        "",
    ]
    if "p1" in report:
        out += [
            "## P1: preprocessing throughput",
            "",
            "```",
            capture(bench_preprocess.print_p1, report["p1"]),
            "```",
            "",
        ]
        out += [
            "Tokenization path chosen by zhtrain: "
            f"{'; '.join(report['p1']['kinds']['zhtrain'].get('encoder') or ['-'])}.",
            "",
        ]
        out += ["Each run, MB/s (the spread shows how much other work on the machine moved the figures):", ""]
        out += [
            f"- {kind}: " + ", ".join(f"{r['mb_per_s']:.2f}" for r in s["runs"])
            for kind, s in report["p1"]["kinds"].items()
        ]
        out += ["", p1_note(report["p1"]), ""]
    if "p2" in report:
        out += [
            "## P2: preprocessing memory vs corpus size",
            "",
            "```",
            capture(bench_preprocess.print_p2, report["p2"]),
            "```",
            "",
        ]
    if "p3" in report:
        out += [
            "## P3/P4: pre-training throughput and memory",
            "",
            "```",
            capture(bench_train.print_report, report["p3"]),
            "```",
            "",
        ]
        out += ["Each run, tokens/s:", ""]
        out += [
            f"- {kind}: " + ", ".join(f"{r['tokens_per_s']:.0f}" for r in s["runs"])
            for kind, s in report["p3"]["kinds"].items()
        ]
        out += ["", p3_note(report["p3"]), ""]
        losses = {kind: s["losses"][:20] for kind, s in report["p3"]["kinds"].items()}
        out += [
            "Loss, first steps (same seed, same blocks):",
            "",
            "| step | " + " | ".join(losses) + " |",
            "|---|" + "---|" * len(losses),
        ]
        for i in range(min(len(v) for v in losses.values())):
            out.append(f"| {i + 1} | " + " | ".join(f"{v[i]:.6f}" for v in losses.values()) + " |")
        out.append("")
    if "p5" in report:
        out += ["## P5: merge memory (benchmarks/bench_merge.py)", ""]
        out += report["p5"].get("table") or ["```", report["p5"].get("stdout", ""), "```"]
        out.append("")
    out += ["## Commands", ""] + [f"- `{c}`" for c in commands] + [""]
    return "\n".join(out)


# The notes under P1 and P3/P4 say what the columns are and how they are measured; every figure in
# them is formatted from this run's report (results.md holds only what its run computed).


def p1_note(p1: dict) -> str:
    kinds = p1["kinds"]
    text = (
        "The baseline tokenizes as the seed did, with the slow sentencepiece-backed `LlamaTokenizer`\n"
        "(transformers 5 dropped it; zhtrain's `SentencePieceLlamaTokenizer` is the same thing and gives the same\n"
        "ids)."
    )
    if "baseline-fast" in kinds:
        text += (
            " `baseline-fast` runs the same recipe with transformers 5's `AutoTokenizer`, a `tokenizers`\n"
            "conversion of the model."
        )
    text += (
        " zhtrain loads LLaMA SentencePiece folders with the seed's ids\n"
        "(`--tokenizer_backend auto`), so its exact fast path is raw sentencepiece, one process per core,\n"
        "checked against the tokenizer's own ids on a sample at run time."
    )
    return text


def p3_note(p3: dict) -> str:
    tps = {kind: s["tokens_per_s"] for kind, s in p3["kinds"].items()}
    lines = []
    if "baseline-passive" in tps:
        clauses = []
        if "zhtrain" in tps:
            clauses.append(
                f"zhtrain / baseline-passive (this run: {tps['zhtrain'] / tps['baseline-passive']:.2f}x) is what "
                "zhtrain's training changes give"
            )
        if "baseline" in tps:
            clauses.append(
                f"baseline-passive / baseline (this run: {tps['baseline-passive'] / tps['baseline']:.2f}x) is the "
                "thread policy alone"
            )
        lines.append(
            "`baseline-passive` is the baseline with `OMP_WAIT_POLICY=PASSIVE`, which zhtrain sets for itself"
            + (":\n" + ";\n".join(clauses) if clauses else "")
            + "."
        )
    lines.append(
        "What differs in zhtrain: the chunked lm_head loss (no `block x vocab` logits, each\n"
        "chunk's gradients formed at once, the 1/N normaliser applied inside the chunks), PEFT's frozen\n"
        "originals of embed_tokens/lm_head sharing the trained tensors, and LoRA dropout masks\n"
        "drawn once instead of again in the checkpointed recompute"
        + (" (`zhtrain-redraw` draws them twice)." if "zhtrain-redraw" in tps else ".")
    )
    lines.append(
        "The same in both: the lm_head matmuls, the zero-filled dense embedding gradient, fused AdamW over\n"
        "the trained weights, their dense gradients and clipping."
    )
    return "\n".join(lines)


def capture(fn, *args) -> str:
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        fn(*args)
    return buffer.getvalue().strip("\n")


if __name__ == "__main__":
    main()
