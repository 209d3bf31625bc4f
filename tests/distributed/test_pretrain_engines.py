"""Multi-process and multi-node runs on CPU over gloo: DDP, DeepSpeed ZeRO-2/3, FSDP2, faults.

Every run asserts the world size and the engine/wrapper class: a misconfigured CPU run silently
trains one copy per rank. Multi-process runs are compared with ONE in-process run of the same
global batch (1 process x batch 2 == 2 processes x batch 1): losses within LOSS_TOL and adapter
weights within ADAPTER_TOL (measured differences: about 1e-6 and 6e-7, from the order of sums).
All runs use a model of 320 rows grown to a 400-token tokenizer, so every engine also resizes.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, TORCHRUN, free_port, make_text_dir, make_tiny_llama, subprocess_env
from helpers import dist_flags as flags

LOSS_TOL = 1e-4
ADAPTER_TOL = 1e-5


def env() -> dict:
    return subprocess_env()


def run(cmd: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env())
    assert proc.returncode == 0, f"{' '.join(cmd[:8])}...\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def start(cmd: list[str], log: Path, cwd: Path) -> subprocess.Popen:
    """Output to a file: a pipe nobody reads fills up and blocks the process in a write."""
    with open(log, "w") as handle:
        return subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, text=True, cwd=cwd, env=env())


def losses_of(out: Path) -> list[float]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def adapter_of(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "pt_lora_model" / "adapter_model.safetensors"))


def assert_same_training(out: Path, reference: dict) -> None:
    """Same losses and the same adapter as the one-process run with the same global batch."""
    assert losses_of(out) == pytest.approx(reference["losses"], abs=LOSS_TOL)
    adapter, expected = adapter_of(out), reference["adapter"]
    assert adapter.keys() == expected.keys()
    for name, tensor in expected.items():
        assert adapter[name].shape == tensor.shape, name
        torch.testing.assert_close(adapter[name], tensor, atol=ADAPTER_TOL, rtol=1e-3, msg=name)
    assert any(k.endswith("embed_tokens.weight") and v.shape[0] == 400 for k, v in adapter.items())


def assert_cache_built_once(cache: Path, data: Path) -> None:
    """One token file and one metadata file per source file; no temp file left by a race."""
    names = sorted(p.name for p in cache.iterdir())
    stems = sorted(p.stem for p in data.glob("*.txt"))
    assert [n.rsplit("-", 1)[0] for n in names if n.endswith(".tokens")] == stems, names
    assert [n.rsplit("-", 1)[0] for n in names if n.endswith(".json")] == stems, names
    assert len(names) == 2 * len(stems), names


def assert_no_leftovers(out: Path) -> None:
    leftovers = [p.name for p in out.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
    assert not leftovers, leftovers


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("m320") / "model", vocab_size=320)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_text_dir(tmp_path_factory.mktemp("corpus") / "data")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small_model, sp_tokenizer_dir, corpus) -> dict:
    """One process, batch 2: what every 2-process run (batch 1 each) must reproduce."""
    from zhtrain.pretrain import parse_pretrain_args, pretrain

    root = tmp_path_factory.mktemp("reference")
    result = pretrain(
        *parse_pretrain_args(flags(small_model, sp_tokenizer_dir, corpus, root / "out", root / "cache", 2))
    )
    model = result.trainer.model.eval()
    probe = torch.arange(3, 35)[None]
    with torch.no_grad():
        logits = model(input_ids=probe).logits
    return {"losses": losses_of(root / "out"), "adapter": adapter_of(root / "out"), "probe": probe, "logits": logits}


@pytest.mark.parametrize("engine", ["DistributedDataParallel", "DeepSpeedEngine"])
def test_two_processes_train_like_one(tmp_path, small_model, sp_tokenizer_dir, corpus, reference, engine):
    extra = (
        ["--deepspeed", str(REPO / "src" / "zhtrain" / "configs" / "ds_zero2_no_offload.json")]
        if engine == "DeepSpeedEngine"
        else []
    )
    out, cache = tmp_path / "out", tmp_path / "cache"
    cmd = [
        *TORCHRUN,
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        "zhtrain.pretrain",
        *flags(small_model, sp_tokenizer_dir, corpus, out, cache, 1, *extra),
    ]
    log = run(cmd, tmp_path)
    text = log.stdout + log.stderr
    assert text.count(f"trained with engine {engine}, world size 2") == 1  # rank 0 alone logs
    # torchrun gives each of 2 processes OMP_NUM_THREADS=1: 2 processes x 1 thread on this machine
    assert re.search(r"world size 2, \d+ CPU threads per process", text)
    assert_same_training(out, reference)
    assert_cache_built_once(cache, corpus)
    assert_no_leftovers(out)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


def test_two_processes_with_checkpointing_keep_dropout_masks_and_train_the_same(
    tmp_path, small_model, sp_tokenizer_dir, corpus
):
    """LoRA dropout under gradient checkpointing, 2 processes: each rank's masks kept from its own
    generator train exactly as masks drawn again in the recompute (--keep_dropout_masks False)."""

    def ddp(name: str, *extra: str):
        out = tmp_path / name
        cmd = [
            *TORCHRUN,
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            "-m",
            "zhtrain.pretrain",
            *flags(
                small_model,
                sp_tokenizer_dir,
                corpus,
                out,
                tmp_path / "cache",
                1,
                "--lora_dropout",
                "0.1",
                "--gradient_checkpointing",
                *extra,
            ),
        ]
        log = run(cmd, tmp_path)
        text = log.stdout + log.stderr
        assert text.count("trained with engine DistributedDataParallel, world size 2") == 1
        return text, losses_of(out), adapter_of(out)

    kept_log, kept_losses, kept_adapter = ddp("kept")
    redrawn_log, redrawn_losses, redrawn_adapter = ddp("redrawn", "--keep_dropout_masks", "False")
    assert "draw each mask once" in kept_log and "draw each mask once" not in redrawn_log
    assert len(kept_losses) == 4 and kept_losses == redrawn_losses
    assert kept_adapter.keys() == redrawn_adapter.keys()
    for key in kept_adapter:
        assert torch.equal(kept_adapter[key], redrawn_adapter[key]), key


def test_two_nodes_on_loopback_train_like_one(tmp_path, small_model, sp_tokenizer_dir, corpus, reference):
    """Node 1 gets its own --output_dir only to show that it writes no adapter, report or run file
    (a shared folder would hide who wrote them); the data cache is shared, as on a shared disk."""
    port, cache = free_port(), tmp_path / "cache"
    procs = []
    for node in (0, 1):
        cmd = [
            *TORCHRUN,
            "--nnodes",
            "2",
            "--node_rank",
            str(node),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
            "--nproc_per_node",
            "1",
            "-m",
            "zhtrain.pretrain",
            *flags(small_model, sp_tokenizer_dir, corpus, tmp_path / f"out{node}", cache, 1),
        ]
        procs.append(start(cmd, tmp_path / f"node{node}.log", tmp_path))
    for proc in procs:
        proc.wait(timeout=600)
    logs = [(tmp_path / f"node{node}.log").read_text() for node in (0, 1)]
    for node, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"node {node}:\n{log[-5000:]}"
        assert "trained with engine DistributedDataParallel, world size 2" in log  # each node's local main logs
    # Tokenized once, by node 0; node 1 waited, then read the cache (zhtrain.distributed.data_first).
    built = [re.search(r"\(([\d,]+) from cache\)", log).group(1) for log in logs]
    assert built[0] == "0" and built[1] != "0", built
    assert_cache_built_once(cache, corpus)
    assert_same_training(tmp_path / "out0", reference)
    node1 = {p.relative_to(tmp_path / "out1").as_posix() for p in (tmp_path / "out1").rglob("*")}
    assert not any(
        "pt_lora_model" in p or p in ("report.json", "zhtrain_run.json", "trainer_state.json") for p in node1
    ), node1


def test_zero3_resizes_trains_embeddings_and_saves_a_full_adapter(
    tmp_path, small_model, sp_tokenizer_dir, corpus, reference
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, cache = tmp_path / "out", tmp_path / "cache"
    cmd = [
        *TORCHRUN,
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        "zhtrain.pretrain",
        *flags(
            small_model,
            sp_tokenizer_dir,
            corpus,
            out,
            cache,
            1,
            "--deepspeed",
            str(REPO / "src" / "zhtrain" / "configs" / "ds_zero3.json"),
        ),
    ]
    log = run(cmd, tmp_path)
    text = log.stdout + log.stderr
    assert "trained with engine DeepSpeedEngine, world size 2" in text
    # ZeRO-3 for real: each rank saved its own partition of the model weights.
    states = sorted(p.name for p in (out / "checkpoint-4" / "global_step4").glob("*model_states.pt"))
    assert states == ["zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"]
    # The vocabulary step read the partitioned (0-row) weights' real size: 320 -> 400, and the
    # trainable count is that of the full weights, as in the one-process run.
    assert "resized embeddings 320 -> 400" in text
    assert re.search(r"trainable parameters: 33,792 of 77,984", text), re.findall(r"trainable parameters: [^\n]*", text)
    # The adapter is whole (the seed's ZeRO-3 adapters had 0-size tensors) and equals the
    # one-process run's; reloaded with PEFT it gives that trained model's logits.
    assert_same_training(out, reference)
    base = AutoModelForCausalLM.from_pretrained(str(small_model))
    base.resize_token_embeddings(400)
    model = PeftModel.from_pretrained(base, str(out / "pt_lora_model")).eval()
    with torch.no_grad():
        logits = model(input_ids=reference["probe"]).logits
    torch.testing.assert_close(logits, reference["logits"], atol=1e-4, rtol=1e-4)
    assert_no_leftovers(out)


def test_zero3_stage1_trains_only_the_new_rows(tmp_path, small_model, sp_tokenizer_dir, corpus):
    """--training_stage embeddings --train_new_rows_only on partitioned weights: the model's own rows stay
    bit-identical."""
    from transformers import AutoModelForCausalLM

    out, cache = tmp_path / "out", tmp_path / "cache"
    cmd = [
        *TORCHRUN,
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        "zhtrain.pretrain",
        *flags(
            small_model,
            sp_tokenizer_dir,
            corpus,
            out,
            cache,
            1,
            "--deepspeed",
            str(REPO / "src" / "zhtrain" / "configs" / "ds_zero3.json"),
            "--training_stage",
            "embeddings",
            "--train_new_rows_only",
            "--save_strategy",
            "no",
        ),
    ]
    text = (lambda log: log.stdout + log.stderr)(run(cmd, tmp_path))
    assert "trained with engine DeepSpeedEngine, world size 2" in text
    weights = adapter_of(out)
    base = AutoModelForCausalLM.from_pretrained(str(small_model))
    for name, matrix in (
        ("embed_tokens", base.get_input_embeddings().weight),
        ("lm_head", base.get_output_embeddings().weight),
    ):
        trained = next(t for k, t in weights.items() if name in k)
        assert trained.shape == (400, matrix.shape[1])
        assert torch.equal(trained[:320], matrix.detach())  # the model's own rows: untouched
        start = matrix.detach().mean(0)  # the folder has no tokenizer, so new rows start at the mean
        assert (trained[320:] - start).abs().max() > 1e-4  # and the new rows learned
    assert not any(("lora_B" in k) and t.any() for k, t in weights.items())  # Stage 1: the LoRA stays zero
    assert_no_leftovers(out)


def test_fsdp2_shards_trains_like_one_process_and_rank0_saves_the_adapter(
    tmp_path, small_model, sp_tokenizer_dir, corpus
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    worker = [
        str(REPO / "benchmarks" / "bench_distributed.py"),
        "--worker",
        "--model",
        str(small_model),
        "--tokenizer",
        str(sp_tokenizer_dir),
        "--data",
        str(corpus),
        "--cache",
        str(tmp_path / "cache"),
    ]
    run([sys.executable, *worker, "--out", str(tmp_path / "one"), "--batch", "2"], tmp_path)
    run(
        [
            *TORCHRUN,
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            *worker,
            "--out",
            str(tmp_path / "two"),
            "--batch",
            "1",
        ],
        tmp_path,
    )
    one = json.loads((tmp_path / "one" / "fsdp_result.json").read_text())
    two = json.loads((tmp_path / "two" / "fsdp_result.json").read_text())
    assert (one["world_size"], one["wrapper"]) == (1, "PeftModelForCausalLM")
    assert (two["world_size"], two["wrapper"], two["fsdp_units"]) == (
        2,
        "FSDPPeftModelForCausalLM",
        3,
    )  # 2 layers + root
    assert two["losses"] == pytest.approx(one["losses"], abs=LOSS_TOL)
    assert one["losses"][-1] < one["losses"][0]
    for name, tensor in adapter_of(tmp_path / "one").items():
        torch.testing.assert_close(adapter_of(tmp_path / "two")[name], tensor, atol=ADAPTER_TOL, rtol=1e-3, msg=name)
    probe = torch.load(tmp_path / "two" / "probe_logits.pt", weights_only=True)
    base = AutoModelForCausalLM.from_pretrained(str(small_model))
    base.resize_token_embeddings(400)
    model = PeftModel.from_pretrained(base, str(tmp_path / "two" / "pt_lora_model")).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=probe["input_ids"][None]).logits, probe["logits"], atol=1e-5, rtol=1e-5
        )
    assert_no_leftovers(tmp_path / "two")
