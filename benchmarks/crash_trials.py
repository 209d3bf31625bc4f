"""Kill -9 trials: does `zhtrain pretrain` lose nothing when it is killed at a random moment?

A tiny model is trained with `zhtrain pretrain` in a subprocess, which is SIGKILLed N times at
random moments in three phases and restarted each time with the same command:

  preprocessing  while a data file is being tokenized into the cache
  training       a random number of steps into the session
  checkpoint     right after a checkpoint-N folder appears, while it is being written

After every kill the output folder is inspected: each checkpoint is either complete (its manifest
matches and every file loads) or incomplete (no manifest); a checkpoint marked complete that does
not load is "half-written" and must never happen. The restarted run must resume from a complete
checkpoint. At the end the adapter is compared with an uninterrupted run's, tensor by tensor.

    python benchmarks/crash_trials.py                 # 20 kills
    python benchmarks/crash_trials.py --kills 5 --json result.json
Exit status 0 only if nothing was half-written, every restart resumed from a complete checkpoint,
and the final adapter equals the uninterrupted run's bitwise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "src"))

PHASES = ("preprocessing", "training", "checkpoint")
ENV = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")


def make_assets(root: Path, files: int, lines: int) -> dict:
    from helpers import make_sp_tokenizer, make_text_dir, make_tiny_llama

    assets = {"tokenizer": root / "tokenizer", "model": root / "model", "data": root / "data"}
    if not (assets["model"] / "config.json").is_file():
        make_sp_tokenizer(assets["tokenizer"])
        make_tiny_llama(assets["model"], vocab_size=400)
        make_text_dir(assets["data"], files=files, lines=lines)
    return assets


def pretrain_command(assets: dict, out: Path, cache: Path, steps: int, save_steps: int) -> list[str]:
    """Deterministic on CPU: fixed seed, one thread, no data-loader workers; dropout on, as in the seed."""
    return [
        sys.executable,
        "-m",
        "zhtrain",
        "pretrain",
        "--model_name_or_path",
        str(assets["model"]),
        "--tokenizer_name_or_path",
        str(assets["tokenizer"]),
        "--dataset_dir",
        str(assets["data"]),
        "--data_cache_dir",
        str(cache),
        "--output_dir",
        str(out),
        "--block_size",
        "32",
        "--per_device_train_batch_size",
        "2",
        "--gradient_accumulation_steps",
        "2",
        "--max_steps",
        str(steps),
        "--save_steps",
        str(save_steps),
        "--save_total_limit",
        "2",
        "--learning_rate",
        "1e-3",
        "--lr_scheduler_type",
        "cosine",
        "--warmup_ratio",
        "0.1",
        "--seed",
        "7",
        "--trainable",
        "q_proj,v_proj,k_proj,o_proj,gate_proj,down_proj,up_proj",
        "--modules_to_save",
        "embed_tokens,lm_head",
        "--lora_rank",
        "8",
        "--lora_alpha",
        "32",
        "--lora_dropout",
        "0.05",
        "--do_train",
        "--logging_steps",
        "1",
        "--report_to",
        "none",
        "--disable_tqdm",
        "True",
    ]


# ---------------------------------------------------------------------------------------------
# Inspecting what a kill left behind


def inspect(out: Path, cache: Path) -> dict:
    """Every checkpoint: complete and loadable / incomplete / marked complete but broken."""
    from zhtrain.training.checkpoints import list_checkpoints

    found = {"complete": [], "incomplete": [], "half_written": [], "cache_broken": [], "cache_temp_files": 0}
    for step, path, complete in list_checkpoints(out):
        if not complete:
            found["incomplete"].append(step)
        elif loads(path):
            found["complete"].append(step)
        else:
            found["half_written"].append(step)
    adapter = out / "pt_lora_model"
    if adapter.exists() and not loads_adapter(adapter):
        found["half_written"].append("pt_lora_model")
    for meta in cache.glob("*.json") if cache.is_dir() else ():
        tokens = meta.with_suffix(".tokens")
        info = json.loads(meta.read_text())
        itemsize = 2 if info["dtype"] == "uint16" else 4
        if not tokens.is_file() or tokens.stat().st_size != info["n_tokens"] * itemsize:
            found["cache_broken"].append(meta.name)
    found["cache_temp_files"] = len(list(cache.glob("*.tmp-*"))) if cache.is_dir() else 0
    return found


def loads_adapter(folder: Path) -> bool:
    from safetensors import safe_open

    try:
        json.loads((folder / "adapter_config.json").read_text())
        with safe_open(str(folder / "adapter_model.safetensors"), "pt") as handle:
            for key in handle.keys():
                handle.get_tensor(key)
        return True
    except Exception:
        return False


def loads(checkpoint: Path) -> bool:
    import torch
    from transformers.trainer_pt_utils import safe_globals  # numpy RNG state, as the Trainer loads it

    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
        for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
            with safe_globals():
                torch.load(checkpoint / name, map_location="cpu", weights_only=True)
        return loads_adapter(checkpoint) and loads_adapter(checkpoint / "pt_lora_model")
    except Exception:
        return False


# ---------------------------------------------------------------------------------------------
# One killed run


def wait_for(proc, condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if condition():
            return True
        time.sleep(0.002)
    return False


def killed_run(
    cmd, log: Path, phase: str, out: Path, cache: Path, rng: random.Random, save_steps: int, timeout: float
) -> dict:
    before = {p.name for p in out.glob("checkpoint-*")} if out.is_dir() else set()
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=ENV, cwd=REPO)
        if phase == "preprocessing":
            triggered = wait_for(proc, lambda: any(cache.glob("*.tmp-*")), timeout)
            delay = rng.uniform(0, 0.3)
        elif phase == "training":
            target = rng.randint(1, 2 * save_steps)
            triggered = wait_for(proc, lambda: log.read_text().count("'loss':") >= target, timeout)
            delay = rng.uniform(0, 0.3)
        else:

            def new_checkpoint():
                return any(p.name not in before for p in out.glob("checkpoint-*")) if out.is_dir() else False

            triggered = wait_for(proc, new_checkpoint, timeout)
            delay = rng.uniform(0, 0.06)
        if triggered:
            time.sleep(delay)
        finished = proc.poll() is not None
        if not finished:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
    text = log.read_text()
    resumed = re.search(r"resuming from (\S+)", text)
    steps = re.findall(r"'loss':", text)
    return {
        "phase": phase,
        "triggered": triggered,
        "delay_s": round(delay, 3),
        "finished_before_kill": finished,
        "returncode": proc.returncode,
        "resumed_from": resumed.group(1) if resumed else None,
        "session_steps": len(steps),
    }


def steps_done(out: Path) -> int:
    from zhtrain.training.checkpoints import last_complete_checkpoint

    last = last_complete_checkpoint(out)
    return int(last.name.split("-")[1]) if last else 0


def compare_adapters(a: Path, b: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    x, y = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    if set(x) != set(y):
        return {"bitwise_equal": False, "max_abs_diff": None, "tensors": len(x), "note": "different tensor names"}
    diff = max(float((x[k].double() - y[k].double()).abs().max()) for k in x)
    return {"bitwise_equal": all(torch.equal(x[k], y[k]) for k in x), "max_abs_diff": diff, "tensors": len(x)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--max_steps", type=int, default=100)
    parser.add_argument("--save_steps", type=int, default=4)
    parser.add_argument("--files", type=int, default=8, help="text files (each is one cache entry)")
    parser.add_argument("--lines", type=int, default=1500, help="lines per text file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds to wait for a kill moment")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    root = args.workdir or Path(tempfile.mkdtemp(prefix="zhtrain-crash-"))
    root.mkdir(parents=True, exist_ok=True)
    assets = make_assets(root / "assets", args.files, args.lines)
    ref_out, out, cache = root / "reference", root / "trial", root / "cache"
    started = time.perf_counter()

    # The uninterrupted run, alongside the trials (its own cache: nothing shared).
    ref_cmd = pretrain_command(assets, ref_out, root / "reference-cache", args.max_steps, args.save_steps)
    reference: dict = {}

    def run_reference():
        proc = subprocess.run(ref_cmd, capture_output=True, text=True, env=ENV, cwd=REPO)
        reference.update(returncode=proc.returncode, tail=proc.stdout[-2000:] + proc.stderr[-2000:])

    ref_thread = threading.Thread(target=run_reference)
    ref_thread.start()

    cmd = pretrain_command(assets, out, cache, args.max_steps, args.save_steps)
    trials, previous_complete = [], []
    opening = ["preprocessing", *rng.sample(["training", "checkpoint"], 2)]  # every phase is hit, even with 3 kills
    for k in range(args.kills):
        available = [p for p in PHASES if p != "preprocessing" or len(list(cache.glob("*.tokens"))) < args.files]
        if steps_done(out) >= args.max_steps:
            available = ["checkpoint"] if "preprocessing" not in available else available
        phase = opening[k] if k < len(opening) and opening[k] in available else rng.choice(available)
        trial = killed_run(cmd, root / f"kill-{k:02d}.log", phase, out, cache, rng, args.save_steps, args.timeout)
        trial["resumed_from_complete"] = (
            trial["resumed_from"] is None or int(trial["resumed_from"].rsplit("-", 1)[1]) in previous_complete
        )
        trial["after"] = inspect(out, cache)
        previous_complete = trial["after"]["complete"]
        trials.append(trial)
        a = trial["after"]
        print(
            f"kill {k + 1:2d}/{args.kills} {phase:13s} +{trial['delay_s']:.3f}s "
            f"{'(finished first)' if trial['finished_before_kill'] else '':16s} resumed from "
            f"{Path(trial['resumed_from']).name if trial['resumed_from'] else '-':14s} steps this run "
            f"{trial['session_steps']:2d} | complete {a['complete']} incomplete {a['incomplete']} half-written "
            f"{a['half_written']}",
            flush=True,
        )

    final_log = root / "final.log"
    with open(final_log, "w") as handle:
        final = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, env=ENV, cwd=REPO)
    final_text = final_log.read_text()
    final_resumed = re.search(r"resuming from (\S+)", final_text)
    ref_thread.join()
    final_inspection = inspect(out, cache)

    result = {
        "kills": args.kills,
        "kills_by_phase": {p: sum(t["phase"] == p for t in trials) for p in PHASES},
        "kills_landed": sum(not t["finished_before_kill"] for t in trials),
        "restarts": args.kills,
        "restarts_resumed_from_checkpoint": sum(t["resumed_from"] is not None for t in trials[1:])
        + (final_resumed is not None),
        "resumed_from_incomplete_checkpoint": sum(not t["resumed_from_complete"] for t in trials)
        + (final_resumed is not None and int(final_resumed.group(1).rsplit("-", 1)[1]) not in previous_complete),
        "incomplete_checkpoints_left_by_kills": sum(len(t["after"]["incomplete"]) for t in trials),
        "half_written_checkpoints": sum(len(t["after"]["half_written"]) for t in trials)
        + len(final_inspection["half_written"]),
        "broken_cache_entries": sum(len(t["after"]["cache_broken"]) for t in trials),
        "final_run_returncode": final.returncode,
        "reference_returncode": reference.get("returncode"),
        "seconds": round(time.perf_counter() - started, 1),
        "workdir": str(root),
    }
    if final.returncode == 0 and reference.get("returncode") == 0:
        result["final_vs_uninterrupted"] = compare_adapters(out / "pt_lora_model", ref_out / "pt_lora_model")
    else:
        result["final_vs_uninterrupted"] = {
            "bitwise_equal": False,
            "note": "a run failed",
            "final_tail": final_text[-1500:],
            "reference_tail": reference.get("tail"),
        }
    result["trials"] = trials

    summary = {k: v for k, v in result.items() if k != "trials"}
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    ok = (
        result["half_written_checkpoints"] == 0
        and result["resumed_from_incomplete_checkpoint"] == 0
        and result["broken_cache_entries"] == 0
        and result["final_vs_uninterrupted"].get("bitwise_equal") is True
    )
    print("crash trials:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
