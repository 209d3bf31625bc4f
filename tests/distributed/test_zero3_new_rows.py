"""--new_token_init subword_mean on DeepSpeed ZeRO-3-partitioned weights (tests/workers/zero3_init_worker.py, its own
process): sizes come from ds_shape and rows are written gathered."""

from __future__ import annotations

import subprocess
import sys

from helpers import WORKERS, free_port, subprocess_env


def test_subword_mean_under_deepspeed_zero3(sp_tokenizer_dir, merged_dir, tiny_model_dir):
    """Partitioned weights have 0 local rows: sizes come from ds_shape and rows are written gathered."""
    import deepspeed  # noqa: F401  (in the dev extras: its absence is a failure, not a skip)

    worker = WORKERS / "zero3_init_worker.py"
    result = subprocess.run(
        [sys.executable, str(worker), str(sp_tokenizer_dir), str(merged_dir), str(tiny_model_dir), str(free_port())],
        capture_output=True,
        text=True,
        timeout=600,
        env=subprocess_env(),
    )
    assert result.returncode == 0 and "ZERO3_OK" in result.stdout, result.stdout[-2000:] + result.stderr[-3000:]
