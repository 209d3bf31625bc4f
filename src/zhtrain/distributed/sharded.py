"""Sharded weights: ZeRO-3 partitions, FSDP1/FSDP2 shards and the DDP/DeepSpeed wrappers.

A resize, a new-row initialisation or an adapter save must see whole tensors, not local shards of
size 0 (the seed's ZeRO-3 failure): `gathered`, `full_shape`, `full_numel`, `gather_trainable_state`.
`unwrap` is the one way to the model inside DDP, FSDP1 or a DeepSpeed engine; FSDP2 (`fully_shard`,
one unit per decoder layer) shards in place: `layer_classes`, `shard`, `save_full_model`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path
from typing import Iterable, Optional

import torch

from zhtrain.errors import ZhtrainError
from zhtrain.files import give_default_mode

logger = logging.getLogger(__name__)


def is_zero3_partitioned(params: Iterable[torch.nn.Parameter]) -> bool:
    return any(hasattr(p, "ds_id") for p in params)


def gathered(params: Iterable[torch.nn.Parameter], modifier_rank: Optional[int] = 0):
    """Context in which ZeRO-3-partitioned `params` are whole (a no-op for ordinary tensors).

    With modifier_rank=0, what rank 0 writes inside is what every rank holds afterwards. All
    ranks must enter it together (it is a collective).
    """
    params = list(params)
    if not is_zero3_partitioned(params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def full_shape(param: torch.Tensor) -> torch.Size:
    """A parameter's real shape, also when ZeRO-3 has left a local placeholder of size 0."""
    return getattr(param, "ds_shape", None) or param.shape


def full_numel(param: torch.Tensor) -> int:
    return int(getattr(param, "ds_numel", 0) or param.numel())


_WRAPPERS = ("DistributedDataParallel", "FullyShardedDataParallel", "DeepSpeedEngine")


def unwrap(model):
    """The PEFT/transformers model inside DDP, FSDP1 or a DeepSpeed engine (FSDP2 wraps in place)."""
    while type(model).__name__ in _WRAPPERS:
        model = model.module
    return model


def is_sharded(model) -> bool:
    """True when ranks hold only shards of the weights (ZeRO-3, FSDP1, FSDP2)."""
    for module in model.modules():
        if type(module).__name__ == "FullyShardedDataParallel":
            return True
    return any(hasattr(p, "ds_id") or hasattr(p, "full_tensor") for p in model.parameters())


def gather_trainable_state(model) -> Optional[dict[str, torch.Tensor]]:
    """For saving an adapter: the gathered trainable weights when they are sharded, else None
    (PEFT then reads the model's own tensors). A collective when sharded: call it on every rank."""
    return full_trainable_state(model) if is_sharded(model) else None


_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "module.")


def full_trainable_state(model) -> Optional[dict[str, torch.Tensor]]:
    """The trainable weights (LoRA + modules_to_save) in full, on CPU, keyed as `unwrap(model).state_dict()`.

    A collective under ZeRO-3 and FSDP: every rank must call it; only rank 0 gets the dict (others
    get None). Without sharding, only the caller's own tensors are read.
    """
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1
    except ImportError:  # pragma: no cover
        FSDP1 = None
    if FSDP1 is not None and any(isinstance(m, FSDP1) for m in model.modules()):
        root = model if isinstance(model, FSDP1) else next(m for m in model.modules() if isinstance(m, FSDP1))
        context = FSDP1.summon_full_params(root, writeback=False, offload_to_cpu=True, rank0_only=True)
    else:
        context = contextlib.nullcontext()
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    state: dict[str, torch.Tensor] = {}
    with context, gathered([p for _, p in trainable], modifier_rank=None):
        for name, param in trainable:
            tensor = param.detach()
            if hasattr(tensor, "full_tensor"):  # FSDP2 / DTensor: all-gather (collective)
                tensor = tensor.full_tensor()
            if rank == 0:
                for prefix in _WRAPPER_PREFIXES:
                    name = name.replace(prefix, "")
                state[name] = tensor.to("cpu", copy=True).contiguous()
    return state if rank == 0 else None


def layer_classes(model, requested: Optional[list[str]] = None) -> list[type]:
    """Classes of the modules that become FSDP units: the requested names, else `_no_split_modules`."""
    base = unwrap(model)
    if hasattr(base, "get_base_model"):  # PEFT
        base = base.get_base_model()
    present = {type(m).__name__: type(m) for m in base.modules()}
    names = list(requested or getattr(base, "_no_split_modules", None) or [])
    if not names:
        raise ZhtrainError(
            f"{type(base).__name__}: no decoder-layer class to wrap (the model lists no _no_split_modules); "
            "pass --fsdp_transformer_layer_cls_to_wrap"
        )
    missing = [name for name in names if name not in present]
    if requested and missing:
        candidates = sorted(n for n in present if n.endswith(("Layer", "Block")))
        raise ZhtrainError(
            f"--fsdp_transformer_layer_cls_to_wrap {','.join(missing)}: no such module in {type(base).__name__}; "
            f"use {', '.join(candidates) or 'a class of the model'}"
        )
    found = [present[name] for name in names if name in present]
    if not found:
        raise ZhtrainError(
            f"{type(base).__name__}: none of its _no_split_modules ({', '.join(names)}) is in the model; pass "
            "--fsdp_transformer_layer_cls_to_wrap"
        )
    return found


def shard(model, classes: list[type], mesh=None, reshard_after_forward: bool = True):
    """FSDP2: `fully_shard` each decoder layer, then the root module. Returns the (same) model."""
    from torch.distributed.fsdp import fully_shard

    units = [m for m in model.modules() if isinstance(m, tuple(classes))]
    for module in units:
        fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    logger.info("FSDP2: %d %s units + root", len(units), "/".join(c.__name__ for c in classes))
    return model


def is_rank0() -> bool:
    return not _distributed() or torch.distributed.get_rank() == 0


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def gather_full_state_dict(model) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU state dict on rank 0; an empty dict on the other ranks. A collective."""
    model = unwrap(model)
    if not _distributed():
        return {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    # full_state_dict + cpu_offload: each tensor is all-gathered, moved to CPU on rank 0 and freed on
    # the others before the next one, so no GPU ever holds the whole model.
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    return state if is_rank0() else {}


def save_full_model(model, tokenizer, output_dir, sentencepiece_model: Optional[Path] = None) -> Optional[Path]:
    """Gather (all ranks) and write a transformers-loadable folder (rank 0). Returns the folder on rank 0."""
    state = gather_full_state_dict(model)
    if not is_rank0():
        barrier()
        return None
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".model.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    base = unwrap(model)
    base.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    if sentencepiece_model is not None:
        shutil.copyfile(sentencepiece_model, tmp / "tokenizer.model")  # transformers 5 no longer writes it
    give_default_mode(tmp)
    _move_files_into(tmp, out)
    barrier()
    return out


def _move_files_into(tmp: Path, out: Path) -> None:
    """Replace the model files in `out` (which also holds checkpoints and logs) one by one."""
    for stale in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        if not (tmp / stale.name).exists():
            stale.unlink()
    for item in tmp.iterdir():
        os.replace(item, out / item.name)
    tmp.rmdir()


def barrier() -> None:
    if _distributed():
        torch.distributed.barrier()
