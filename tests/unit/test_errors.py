"""One-line errors: what the CLI prints for a ZhtrainError, wherever it was raised."""

from __future__ import annotations

import pytest

from zhtrain.errors import ZhtrainError


def test_an_error_raised_in_a_dataloader_worker_stays_one_line(capsys):
    """--lazy_preprocess encodes in DataLoader workers: torch re-raises their error with the worker's
    traceback in its message; the CLI still prints only the sentence."""
    import torch

    from zhtrain.errors import run_command

    class BadRecord(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, index):
            raise ZhtrainError("train.json: line 3 (record 2): the template changes the reply; fix the record")

    def main(argv):
        list(torch.utils.data.DataLoader(BadRecord(), num_workers=1))

    with pytest.raises(SystemExit) as exit_info:
        run_command(main, [])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "zhtrain: error: train.json: line 3 (record 2): the template changes the reply; fix the record"
    ]
