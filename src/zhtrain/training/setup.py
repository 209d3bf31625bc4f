"""The prologue every training command shares: logging, notes, CPU threads, DeepSpeed, seed."""

from __future__ import annotations

import logging
import os
import sys

import torch

from zhtrain.distributed.engines import prepare_deepspeed


def start_run(training_args, log: logging.Logger) -> int:
    """The prologue every training command shares: logging, notes, threads, DeepSpeed, seed."""
    from transformers import set_seed

    setup_logging(training_args)
    for note in training_args.compat_notes:
        log.warning(note)
    threads = set_cpu_threads()
    prepare_deepspeed(training_args)  # before any model is built: ZeRO-3 partitions weights as they are created
    set_seed(training_args.seed)
    log.info(
        "world size %d, %d CPU threads per process, device %s", training_args.world_size, threads, training_args.device
    )
    return threads


def set_cpu_threads() -> int:
    """One sensible thread count per process: cores / local processes (unless OMP_NUM_THREADS is set).

    N processes x all-cores threads oversubscribe the CPU, and OpenMP collapses under it.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    # The cores this process may run on (taskset, cpusets), not the host's count.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // max(local, 1))
    torch.set_num_threads(threads)
    return threads


def setup_logging(training_args) -> None:
    import transformers

    level = logging.INFO if training_args.should_log else logging.WARNING
    # The log goes to stdout, as in the seed's scripts (HF examples): stderr keeps progress bars,
    # and a run that fails on bad input prints its one-line error there alone.
    handler = logging.StreamHandler(sys.stdout)
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        level=level,
        force=True,
        handlers=[handler],
    )
    logging.getLogger("zhtrain").setLevel(level)
    # transformers' INFO dumps every config; its warnings and the Trainer's progress still show.
    transformers.utils.logging.set_verbosity(logging.WARNING)
    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
