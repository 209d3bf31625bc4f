"""Faults of multi-node runs on CPU: a rank that stalls then dies, and a rendezvous that cannot work, each end
with one sentence instead of torch's long waits."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import dist_flags as flags
from helpers import free_port, make_text_dir, make_tiny_llama, subprocess_env


def env() -> dict:
    return subprocess_env()


def start(cmd: list[str], log: Path, cwd: Path) -> subprocess.Popen:
    """Output to a file: a pipe nobody reads fills up and blocks the process in a write."""
    with open(log, "w") as handle:
        return subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, text=True, cwd=cwd, env=env())


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("m320") / "model", vocab_size=320)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_text_dir(tmp_path_factory.mktemp("corpus") / "data")


def _worker_of(launcher: subprocess.Popen):
    import psutil

    for child in psutil.Process(launcher.pid).children(recursive=True):
        if "zhtrain.pretrain" in child.cmdline():  # torchrun's worker: python -u -m zhtrain.pretrain ...
            return child
    return None


def test_a_stalled_then_killed_rank_ends_the_job_with_a_sentence(
    tmp_path, small_model, sp_tokenizer_dir, corpus, request
):
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
        request.getfixturevalue("wrong_master")  # its launches run while node 0 waits out the timeout (no CPU)
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


@pytest.fixture(scope="module")
def wrong_master(tmp_path_factory):
    """The two launches of the test below, started (once) by whichever test asks first."""
    tmp_path = tmp_path_factory.mktemp("wrong_master")
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
    procs = {}
    for k, (name, argv) in enumerate(cases.items()):
        with open(tmp_path / f"{k}.out", "w") as out, open(tmp_path / f"{k}.err", "w") as err:
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "zhtrain", "launch", *argv, *common],
                stdout=out,
                stderr=err,
                text=True,
                cwd=tmp_path,
                env=env(),
            )
    yield cases, procs, started, tmp_path
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_wrong_master_address_or_port_fails_fast_with_a_sentence(wrong_master):
    """Plain torchrun would retry for 10-15 minutes; `zhtrain launch` checks first. Both launches
    run at once: node 0 given an address that is not this machine's, node 1 a port nobody serves."""
    cases, procs, started, tmp_path = wrong_master
    for proc in procs.values():
        proc.wait(timeout=120)
    results = {
        name: ((None, (tmp_path / f"{k}.err").read_text()), proc.returncode)
        for k, (name, proc) in enumerate(procs.items())
    }
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
