"""What zhtrain adds for multi-process runs (torchrun + DDP / DeepSpeed ZeRO-2/3 / FSDP).

The engines are the field's own (torch.distributed, DeepSpeed, FSDP through the HF Trainer and
accelerate); this module only holds what they leave to the caller:

- `init_cpu_process_group`: on CPU, the gloo group honours --ddp_timeout (HF passes it on GPUs only);
- `data_first`: the token cache is built once, by node 0's main process first, also across nodes;
- `check_deepspeed_config` / `explain_deepspeed_mismatches`: a DeepSpeed config that contradicts the
  flags is explained in one line before any slow step;
- `prepare_deepspeed`: DeepSpeed's communication set up before any model is built (ZeRO-3
  partitions weights as they are created; on CPU accelerate does not set it up);
- `gathered` / `full_shape` / `full_numel` / `gather_trainable_state`: ZeRO-3 and FSDP shard the
  weights, so a resize, a new-row initialisation or an adapter save must see whole tensors, not
  local shards of size 0 (the seed's ZeRO-3 failure);
- `explain_lost_peer`: a rank that died or stalled past --ddp_timeout is said in one sentence.

FSDP wrapping itself (one `fully_shard` unit per decoder layer) lives in `zhtrain.fsdp`; the launcher
checks (wrong --master_addr/--master_port) in `zhtrain.launch`.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
from datetime import timedelta
from pathlib import Path

import torch

from zhtrain.errors import ZhtrainError


def init_cpu_process_group(ddp_timeout: int) -> None:
    """On CPU, create the gloo process group ourselves, with --ddp_timeout.

    transformers passes --ddp_timeout to the process group only on GPUs; on CPU a rank stuck on a
    dead peer would wait gloo's default 30 minutes. accelerate then reuses this group.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "MASTER_ADDR" not in os.environ:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(seconds=ddp_timeout))


@contextlib.contextmanager
def data_first(training_args):
    """Tokenize once: node 0's main process first, then the other nodes' main processes (their
    disk may not be shared; on a shared one they find the cache), then everyone else reads it.

    HF's main_process_first() alone is per node, so on a shared file system the main process of
    every node would tokenize the same files at the same time.
    """
    with training_args.main_process_first(local=False, desc="tokenizing (node 0)"):
        with training_args.main_process_first(local=True, desc="tokenizing (other nodes)"):
            yield


def _read_deepspeed_config(value) -> tuple[str, dict]:
    if isinstance(value, dict):
        return "--deepspeed", value
    text = str(value)
    if text.lstrip().startswith("{"):
        source, raw = "--deepspeed", text
    else:
        source = f"--deepspeed {text}"
        try:
            raw = Path(text).read_text(encoding="utf-8")
        except OSError as err:
            raise ZhtrainError(f"{source}: cannot read it ({err.strerror}); pass a DeepSpeed JSON config") from None
    try:
        config = json.loads(raw)
    except ValueError as err:
        raise ZhtrainError(f"{source}: not valid JSON ({err}); fix the file") from None
    if not isinstance(config, dict):
        raise ZhtrainError(f"{source}: a DeepSpeed config must be a JSON object")
    return source, config


def check_deepspeed_config(value, fp16: bool, bf16: bool, on_gpu: bool) -> dict:
    """Explain, in one line, a DeepSpeed config whose precision contradicts the flags (or the machine).

    `fp16`/`bf16` are the flags as the user passed them. Returns the parsed config.
    """
    source, config = _read_deepspeed_config(value)
    wanted = {"fp16": fp16, "bf16": bf16}
    enabled = {name: (config.get(name) or {}).get("enabled") for name in wanted}  # True / False / "auto" / None
    if enabled["fp16"] is True and enabled["bf16"] is True:
        raise ZhtrainError(f'{source}: enables both fp16 and bf16; set both to "auto" and pass --fp16 or --bf16')
    for name, value_in_file in enabled.items():  # contradictions first: they are wrong on any machine
        other = "bf16" if name == "fp16" else "fp16"
        if value_in_file is True and not wanted[name]:
            asked = f"--{other}" if wanted[other] else f"no --{name}"
            raise ZhtrainError(
                f'{source}: {name}.enabled is true but the flags say {asked}; set {name}.enabled to "auto" so the '
                f"flags decide, or pass --{name}" + (f" instead of --{other}" if wanted[other] else "")
            )
        if value_in_file is False and wanted[name]:
            raise ZhtrainError(
                f'{source}: {name}.enabled is false but --{name} was passed; set {name}.enabled to "auto" or drop '
                f"--{name}"
            )
    for name, value_in_file in enabled.items():
        if value_in_file is True and not on_gpu:
            raise ZhtrainError(
                f'{source}: {name}.enabled is true, which needs a CUDA GPU (none here); set it to "auto" so '
                "zhtrain trains in float32 on this machine"
            )
    return config


def explain_deepspeed_mismatches(training_args) -> None:
    """HF collects the remaining config/flag conflicts (batch size, clipping, lr...) and raises late, in
    several lines, after the model is loaded; say it now, in one."""
    hf_config = getattr(training_args, "hf_deepspeed_config", None)
    mismatches = [m.lstrip("- ") for m in getattr(hf_config, "mismatches", [])]
    if mismatches:
        source = (
            training_args.deepspeed
            if isinstance(training_args.deepspeed, str) and not training_args.deepspeed.lstrip().startswith("{")
            else "(inline JSON)"
        )
        raise ZhtrainError(
            f"--deepspeed {source}: values contradict the flags ({'; '.join(mismatches)}); "
            'set them to "auto" in the file so the flags decide, or change the flags'
        )


def prepare_deepspeed(training_args) -> None:
    """Set up DeepSpeed's communication before the model is loaded.

    With ZeRO-3, `from_pretrained` partitions weights inside `deepspeed.zero.Init`, which needs it;
    accelerate sets it up on GPUs but not with use_cpu, and zero.Init then sees a world of 1
    ("train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step * world_size").
    """
    if not training_args.deepspeed or training_args.world_size <= 1:
        return
    import deepspeed

    _ = training_args.device  # accelerate creates the torch process group first; DeepSpeed wraps it
    deepspeed.init_distributed(
        dist_backend="nccl" if torch.cuda.is_available() else "gloo", timeout=training_args.ddp_timeout_delta
    )


_PEER_FAILURE_SIGNS = ("closed by peer", "reset by peer", "timed out", "timeout", "broken pipe", "watchdog", "nccl")


@contextlib.contextmanager
def explain_lost_peer(training_args):
    """A rank that died, was killed, or stalled past --ddp_timeout surfaces in the others as a
    collective's error (gloo: "Connection closed by peer"; NCCL: a watchdog timeout) under a long
    traceback. Say it in one sentence instead; the process still exits non-zero."""
    try:
        yield
    except RuntimeError as err:  # torch.distributed.DistError subclasses RuntimeError
        text = str(err)
        if training_args.world_size <= 1 or not any(sign in text.lower() for sign in _PEER_FAILURE_SIGNS):
            raise
        first = next((line.strip() for line in text.splitlines() if line.strip()), type(err).__name__)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else training_args.process_index
        raise ZhtrainError(
            f"rank {rank} of {training_args.world_size} lost contact with another process during training "
            f"({first[:200]}): another rank died or was killed (its node's log shows why), or stalled longer than "
            f"--ddp_timeout {training_args.ddp_timeout}s. Run the same command again to resume from the last "
            f"checkpoint in {training_args.output_dir}"
        ) from None


def close_process_group() -> None:
    """The end of a training command: every rank waits for the others, then the process group is shut
    down here, not during interpreter exit. Left to exit, a rank that finished cleanly could die in gloo's
    teardown ("terminate called without an active exception", SIGABRT; about 1 run in 8 of a 2-process
    CPU job) and torchrun then reports the whole job as failed. The trainer and its DDP/DeepSpeed engine
    hold the group too: they are collected first."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    gc.collect()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
