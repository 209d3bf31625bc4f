"""What zhtrain owns of FSDP: the wrapping policy, the rank-0 full-state-dict gather, the save.

The sharding engine is torch's (FSDP2 `fully_shard`, through the HF Trainer and accelerate on
GPUs). zhtrain adds:

- `layer_classes`: the decoder-layer class(es) each FSDP unit wraps, from
  `--fsdp_transformer_layer_cls_to_wrap` (checked against the model: a name that matches no
  module is an error, not a silent single-unit wrap) or else the model's `_no_split_modules`;
- `shard`: FSDP2 wrapping, one unit per decoder layer, then the root (embeddings, norm, head);
- `gather_full_state_dict`: the full state dict on rank 0 only, offloaded to CPU tensor by tensor
  (FastChat's OOM at the final save, lm-sys/FastChat#693, came from gathering on every GPU);
- `save_full_model`: a Hugging Face folder (config, safetensors, tokenizer) that
  `AutoModelForCausalLM.from_pretrained` loads, written by rank 0 into a temp folder and moved in.

`gather_full_state_dict` and `save_full_model` are collectives: every rank must call them. They
work the same for an FSDP2 (`FSDPModule`), FSDP1, DDP or plain model.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from zhtrain.errors import ZhtrainError
from zhtrain.weights import give_default_mode

logger = logging.getLogger(__name__)


def unwrap(model):
    """The module inside DDP (FSDP2 modifies the model in place, so it needs no unwrapping)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


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
        raise ZhtrainError(f"{type(base).__name__}: none of its _no_split_modules ({', '.join(names)}) is in the model; pass --fsdp_transformer_layer_cls_to_wrap")
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
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # full_state_dict + cpu_offload: each tensor is all-gathered, moved to CPU on rank 0 and freed on
    # the others before the next one, so no GPU ever holds the whole model.
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    return state if is_rank0() else {}


def save_full_model(model, tokenizer, output_dir, sentencepiece_model: Optional[Path] = None) -> Optional[Path]:
    """Gather (all ranks) and write a transformers-loadable folder (rank 0). Returns the folder on rank 0."""
    state = gather_full_state_dict(model)
    if not is_rank0():
        _barrier()
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
    _barrier()
    return out


def _move_files_into(tmp: Path, out: Path) -> None:
    """Replace the model files in `out` (which also holds checkpoints and logs) one by one."""
    for stale in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        if not (tmp / stale.name).exists():
            stale.unlink()
    for item in tmp.iterdir():
        os.replace(item, out / item.name)
    tmp.rmdir()


def _barrier() -> None:
    if _distributed():
        torch.distributed.barrier()
