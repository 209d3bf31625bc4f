"""benchmarks/gpu_check.sh, the prepared GPU check, in its tiny CPU mode: the script itself works."""

from __future__ import annotations

import re
import subprocess
import sys

from helpers import REPO, subprocess_env


def env() -> dict:
    return subprocess_env()


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
