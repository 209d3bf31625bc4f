"""Multi-process and multi-node runs on CPU over gloo: DDP, DeepSpeed ZeRO-2/3, FSDP2, faults.

Every run asserts the world size and the engine/wrapper class: a misconfigured CPU run silently
trains one copy per rank. Multi-process runs are compared with ONE in-process run of the same
global batch (1 process x batch 2 == 2 processes x batch 1): losses within LOSS_TOL and adapter
weights within ADAPTER_TOL (measured differences: about 1e-6 and 6e-7, from the order of sums).
All runs use a model of 320 rows grown to a 400-token tokenizer, so every engine also resizes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fixtures import make_tiny_llama

REPO = Path(__file__).resolve().parents[2]
LOSS_TOL = 1e-4
ADAPTER_TOL = 1e-5
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]  # the `torchrun` console script, same code
SEED_LORA = [
    "--trainable",
    "q_proj,v_proj,k_proj,o_proj,gate_proj,down_proj,up_proj",
    "--modules_to_save",
    "embed_tokens,lm_head",
    "--lora_rank",
    "8",
    "--lora_alpha",
    "32",
    "--lora_dropout",
    "0",
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def flags(model, tokenizer, data, out, cache, batch: int, *extra) -> list[str]:
    return [
        "--model_name_or_path",
        str(model),
        "--tokenizer_name_or_path",
        str(tokenizer),
        "--dataset_dir",
        str(data),
        "--data_cache_dir",
        str(cache),
        "--output_dir",
        str(out),
        "--block_size",
        "32",
        "--per_device_train_batch_size",
        str(batch),
        "--max_steps",
        "4",
        "--learning_rate",
        "1e-3",
        "--do_train",
        "--seed",
        "7",
        "--report_to",
        "none",
        "--logging_steps",
        "1",
        "--save_steps",
        "2",
        "--disable_tqdm",
        "True",
        "--validation_split_percentage",
        "0.05",
        "--overwrite_output_dir",
        *SEED_LORA,
        *extra,
    ]


def env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")


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


# ---------------------------------------------------------------------------------------------
# Fixtures: a model smaller than the tokenizer, and the one-process reference run


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("m320") / "model", vocab_size=320)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from fixtures import make_text_dir

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


# ---------------------------------------------------------------------------------------------
# (1) torchrun --nproc_per_node 2 with DDP and with DeepSpeed ZeRO-2


@pytest.mark.slow
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


@pytest.mark.slow
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


# ---------------------------------------------------------------------------------------------
# (2) the seed's multi-node command, two nodes on loopback


@pytest.mark.slow
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
    # Tokenized once, by node 0; node 1 waited, then read the cache (zhtrain.distributed.engines.data_first).
    built = [re.search(r"\(([\d,]+) from cache\)", log).group(1) for log in logs]
    assert built[0] == "0" and built[1] != "0", built
    assert_cache_built_once(cache, corpus)
    assert_same_training(tmp_path / "out0", reference)
    node1 = {p.relative_to(tmp_path / "out1").as_posix() for p in (tmp_path / "out1").rglob("*")}
    assert not any(
        "pt_lora_model" in p or p in ("report.json", "zhtrain_run.json", "trainer_state.json") for p in node1
    ), node1


# ---------------------------------------------------------------------------------------------
# (3) DeepSpeed ZeRO-3: resize + new rows on partitioned weights, modules_to_save, a full adapter


@pytest.mark.slow
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


@pytest.mark.slow
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


# ---------------------------------------------------------------------------------------------
# (4) FSDP2: zhtrain.fsdp wrapping and rank-0 adapter saving over gloo (the Trainer cannot shard on CPU)


@pytest.mark.slow
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


# ---------------------------------------------------------------------------------------------
# Faults


def _worker_of(launcher: subprocess.Popen):
    import psutil

    for child in psutil.Process(launcher.pid).children(recursive=True):
        if "zhtrain.pretrain" in child.cmdline():  # torchrun's worker: python -u -m zhtrain.pretrain ...
            return child
    return None


@pytest.mark.slow
def test_a_stalled_then_killed_rank_ends_the_job_with_a_sentence(tmp_path, small_model, sp_tokenizer_dir, corpus):
    """Node 1's worker is frozen (SIGSTOP) mid-run: node 0 gives up after --ddp_timeout with one
    sentence (gloo's own default would be 30 minutes on CPU); then the frozen worker is killed and
    node 1's launcher names it."""
    timeout_s, port = 15, free_port()
    launchers, logs = [], [tmp_path / "node0.log", tmp_path / "node1.log"]
    for node in (0, 1):
        cmd = [
            sys.executable,
            "-m",
            "zhtrain",
            "launch",
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
            "pretrain",
            *flags(
                small_model,
                sp_tokenizer_dir,
                corpus,
                tmp_path / f"out{node}",
                tmp_path / "cache",
                1,
                "--max_steps",
                "100000",
                "--save_steps",
                "100000",
                "--ddp_timeout",
                str(timeout_s),
            ),
        ]
        launchers.append(start(cmd, logs[node], tmp_path))
    worker = None
    try:
        deadline = time.monotonic() + 300
        while logs[0].read_text().count("{'loss'") < 3:  # training steps are being logged
            assert time.monotonic() < deadline and all(p.poll() is None for p in launchers), logs[0].read_text()[-3000:]
            time.sleep(0.5)
        worker = _worker_of(launchers[1])
        assert worker is not None
        worker.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        launchers[0].wait(timeout=timeout_s + 90)
        assert time.monotonic() - stopped < timeout_s + 60
        log0 = logs[0].read_text()
        assert launchers[0].returncode != 0
        assert re.search(
            rf"zhtrain: error: rank 0 of 2 lost contact with another process during training \(.*\): another "
            rf"rank died or was killed .* --ddp_timeout {timeout_s}s",
            log0,
        ), log0[-3000:]
        assert "zhtrain: error: rank 0 (local rank 0, pid" in log0  # the launcher's summary line
        worker.kill()
        launchers[1].wait(timeout=60)
        log1 = logs[1].read_text()
        assert launchers[1].returncode != 0
        assert re.search(r"zhtrain: error: rank 1 \(local rank 0, pid \d+\) was killed by SIGKILL", log1), log1[-3000:]
    finally:
        for proc in launchers:
            if proc.poll() is None:
                child = _worker_of(proc)
                if child is not None:
                    child.kill()
                proc.kill()
                proc.wait()


@pytest.mark.slow
def test_wrong_master_address_or_port_fails_fast_with_a_sentence(tmp_path):
    """Plain torchrun would retry for 10-15 minutes; `zhtrain launch` checks first. Both launches
    run at once: node 0 given an address that is not this machine's, node 1 a port nobody serves."""
    common = ["--nproc_per_node", "1", "pretrain", "--output_dir", str(tmp_path / "out")]
    cases = {
        "not this machine": [
            "--nnodes",
            "2",
            "--node_rank",
            "0",
            "--master_addr",
            "10.255.255.1",
            "--master_port",
            str(free_port()),
        ],
        "nothing answers": [
            "--nnodes",
            "2",
            "--node_rank",
            "1",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            "--rdzv_conf",
            "timeout=3",
        ],
    }
    started = time.monotonic()
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "zhtrain", "launch", *argv, *common],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
            env=env(),
        )
        for name, argv in cases.items()
    }
    results = {name: (proc.communicate(timeout=120), proc.returncode) for name, proc in procs.items()}
    assert time.monotonic() - started < 120
    (_, err), code = results["not this machine"]
    assert code == 2 and err.strip().splitlines()[-1] == (
        f"zhtrain: error: --master_addr 10.255.255.1 --master_port {cases['not this machine'][-1]}: "
        "10.255.255.1 is not an address of this machine, but --node_rank 0 hosts the rendezvous there; "
        "pass this machine's address as the other nodes reach it"
    )
    (_, err), code = results["nothing answers"]
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith(
        f"zhtrain: error: --master_addr 127.0.0.1 --master_port {cases['nothing answers'][-3]}: "
        "node 0's rendezvous did not answer within 3s"
    ), err[-2000:]
    assert "Traceback" not in err


def test_deepspeed_config_contradicting_the_flags_is_one_line(tmp_path, tiny_model_dir, sp_tokenizer_dir, text_dir):
    from zhtrain.errors import ZhtrainError
    from zhtrain.pretrain import parse_pretrain_args

    config = json.loads((REPO / "src" / "zhtrain" / "configs" / "ds_zero2_no_offload.json").read_text())
    config["fp16"]["enabled"] = True
    path = tmp_path / "ds_fp16.json"
    path.write_text(json.dumps(config))
    argv = flags(
        tiny_model_dir, sp_tokenizer_dir, text_dir, tmp_path / "out", tmp_path / "cache", 1, "--deepspeed", str(path)
    )
    with pytest.raises(ZhtrainError) as err:
        parse_pretrain_args([*argv, "--bf16"])
    assert str(err.value) == (
        f'--deepspeed {path}: fp16.enabled is true but the flags say --bf16; set fp16.enabled to "auto" '
        "so the flags decide, or pass --fp16 instead of --bf16"
    )
    if not torch.cuda.is_available():  # here fp16 itself cannot run: say that, not a batch of HF mismatches later
        with pytest.raises(ZhtrainError, match=r"fp16.enabled is true, which needs a CUDA GPU \(none here\)"):
            parse_pretrain_args([*argv, "--fp16"])
    config["fp16"]["enabled"] = "auto"
    config["train_micro_batch_size_per_gpu"] = 4
    path.write_text(json.dumps(config))
    with pytest.raises(
        ZhtrainError,
        match=r"values contradict the flags \(ds train_micro_batch_size_per_gpu=4 vs hf "
        r"per_device_train_batch_size=1\); set them to \"auto\"",
    ):
        parse_pretrain_args(argv)


def test_launch_gives_each_process_its_share_of_the_cores(monkeypatch):
    from torch.distributed.run import parse_args

    from zhtrain.launch import set_threads, split_argv

    launcher, module, command = split_argv(["--nproc_per_node", "2", "pretrain", "--output_dir", "x"])
    assert (launcher, module, command) == (["--nproc_per_node", "2"], "zhtrain.pretrain", ["--output_dir", "x"])
    args = parse_args([*launcher, "-m", module, *command])
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    set_threads(args)
    assert os.environ["OMP_NUM_THREADS"] == str(max(1, len(os.sched_getaffinity(0)) // 2))
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the documented override wins
    set_threads(args)
    assert os.environ["OMP_NUM_THREADS"] == "3"


# ---------------------------------------------------------------------------------------------
# (6) the GPU check, in its tiny CPU mode


@pytest.mark.slow
def test_gpu_check_script_runs_in_tiny_mode(tmp_path):
    script = REPO / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    proc = subprocess.run(
        ["bash", str(script)],
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(env(), GPU_CHECK_TINY="1", GPU_CHECK_DIR=str(tmp_path / "work"), PYTHON=sys.executable),
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    assert lines[-1] == "gpu_check: OK"
    pretrain_row = next(line for line in lines if line.startswith("pretrain: ZeRO-2 fp16"))
    assert "DeepSpeedEngine" in pretrain_row and re.search(r"\s\d+\s", pretrain_row)
    assert any(line.startswith("sft: FSDP full_shard bf16") for line in lines)
