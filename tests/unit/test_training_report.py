"""The run report without matplotlib: no plot, and it says why."""

from __future__ import annotations

import json
import sys


def test_report_without_matplotlib_skips_the_plot(tmp_path, monkeypatch):
    from zhtrain.training.report import write_report

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    history = [{"step": 1, "loss": 2.0, "learning_rate": 1e-3}, {"step": 1, "eval_loss": 1.5}]
    write_report(str(tmp_path), {"command": "pretrain", "output_dir": str(tmp_path), "global_step": 1}, history)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["plot"] is None and "matplotlib is not installed" in report["plot_note"]
    assert (
        not (tmp_path / "loss.png").exists() and "matplotlib is not installed" in (tmp_path / "report.md").read_text()
    )
