"""`zhtrain launch`: its command line and the cores each process gets."""

from __future__ import annotations

import os


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
