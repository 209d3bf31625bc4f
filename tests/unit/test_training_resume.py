"""Where a run starts: the newest complete checkpoint of the same run; what a kill left is removed."""

from __future__ import annotations

import pytest
from helpers import fake_checkpoint, training_args

from zhtrain.errors import ZhtrainError
from zhtrain.training.resume import RUN_FILE, prepare_output_dir


def test_resume_skips_and_removes_what_a_kill_left_half_written(tmp_path):
    out = tmp_path / "out"
    identity = {"run": 1}
    prepare_output_dir(training_args(out), identity)  # records the run
    fake_checkpoint(out, 2)
    fake_checkpoint(out, 4)
    fake_checkpoint(out, 6, complete=False)  # killed while the Trainer was writing it
    (out / ".pt_lora_model.tmp-999999").mkdir()  # an adapter temp folder of a dead process
    (out / "checkpoint-4" / ".pt_lora_model.tmp-999999").mkdir()
    resume = prepare_output_dir(training_args(out), identity)
    assert resume == str(out / "checkpoint-4")
    assert not (out / "checkpoint-6").exists()
    assert (
        not (out / ".pt_lora_model.tmp-999999").exists()
        and not (out / "checkpoint-4" / ".pt_lora_model.tmp-999999").exists()
    )
    assert (out / "checkpoint-2").exists()


def test_checkpoints_not_written_by_zhtrain_are_not_touched(tmp_path):
    out = tmp_path / "out"
    fake_checkpoint(out, 3, complete=False)  # e.g. the seed's own run: no zhtrain_run.json
    with pytest.raises(ZhtrainError, match="not written by zhtrain; pass --resume_from_checkpoint"):
        prepare_output_dir(training_args(out), {"run": 1})
    assert (out / "checkpoint-3").exists() and not (out / RUN_FILE).exists()
    # Named explicitly, it is resumed (with a warning: no manifest).
    explicit = training_args(out, resume_from_checkpoint=str(out / "checkpoint-3"))
    assert prepare_output_dir(explicit, {"run": 1}) == str(out / "checkpoint-3")
