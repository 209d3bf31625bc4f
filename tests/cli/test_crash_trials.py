"""Kill -9 trials (benchmarks/crash_trials.py), a few kills: nothing half-written is ever resumed from, and the
final model equals an uninterrupted run's."""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import REPO, subprocess_env


def test_crash_trials_lose_nothing(tmp_path):
    result_file = tmp_path / "result.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "crash_trials.py"),
            "--kills",
            "4",
            "--max_steps",
            "16",
            "--files",
            "4",
            "--lines",
            "1000",
            "--workdir",
            str(tmp_path / "work"),
            "--json",
            str(result_file),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env=subprocess_env(),
    )
    assert result_file.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(result_file.read_text())
    assert result["kills_landed"] >= 3, proc.stdout
    assert result["half_written_checkpoints"] == 0 and result["resumed_from_incomplete_checkpoint"] == 0
    assert result["broken_cache_entries"] == 0 and result["final_run_returncode"] == 0
    assert result["final_vs_uninterrupted"]["bitwise_equal"], result["final_vs_uninterrupted"]
    assert proc.returncode == 0, proc.stdout[-3000:]
