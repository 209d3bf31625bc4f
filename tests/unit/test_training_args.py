"""zhtrain's TrainingArguments: the default logger."""

from __future__ import annotations

import pytest

from zhtrain.training.args import ZhtrainTrainingArguments


@pytest.mark.parametrize("available, expected", [(True, ["tensorboard"]), (False, [])])
def test_tensorboard_is_the_default_logger_when_installed(monkeypatch, tmp_path, available, expected):
    import transformers.integrations

    monkeypatch.setattr(transformers.integrations, "is_tensorboard_available", lambda: available)
    assert ZhtrainTrainingArguments(output_dir=str(tmp_path)).report_to == expected
    assert ZhtrainTrainingArguments(output_dir=str(tmp_path), report_to="none").report_to == []
