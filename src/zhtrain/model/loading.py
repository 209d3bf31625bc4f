"""Load the base model: config (with overrides), weight files checked whole, dtype, precision helpers."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Optional

import torch

from zhtrain.distributed.sharded import full_numel
from zhtrain.errors import ZhtrainError, refused_pickle
from zhtrain.weights.hf_folder import check_safetensors_file

logger = logging.getLogger(__name__)


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def load_config(model_args):
    from transformers import AutoConfig

    source = model_args.config_name or model_args.model_name_or_path
    if not source:
        raise ZhtrainError("--model_name_or_path is required: a LLaMA-family model folder in Hugging Face format")
    if not Path(source).is_dir():
        raise ZhtrainError(f"--model_name_or_path {source}: no such folder; pass a local model in Hugging Face format")
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=model_args.trust_remote_code)
    except (OSError, ValueError) as err:
        raise ZhtrainError(f"{source}: cannot read config.json ({err})") from err
    if model_args.config_overrides:
        try:
            config.update_from_string(model_args.config_overrides)
        except ValueError as err:  # an unknown key or a malformed pair
            raise ZhtrainError(
                f"--config_overrides {model_args.config_overrides!r}: {err}; write key=value pairs separated by "
                "commas, with keys from the model's config.json"
            ) from err
    if model_args.model_name_or_path:
        check_weight_files(Path(model_args.model_name_or_path))
    return config


def check_weight_files(folder: Path) -> None:
    """Every safetensors file of the model is whole (see weights.check_safetensors_file)."""

    for path in sorted(folder.glob("*.safetensors")):
        check_safetensors_file(path, "copy the model again")


def resolve_dtype(name: Optional[str], on_gpu: bool) -> Optional[torch.dtype]:
    """float16/bfloat16 weights only on a GPU; on CPU they are slow or unsupported, so float32."""
    if name in (None, "auto"):
        return torch.float32 if not on_gpu else None
    if not on_gpu and name != "float32":
        logger.warning("--torch_dtype %s needs a GPU; loading in float32 on CPU", name)
        return torch.float32
    return DTYPES[name]


def load_base_model(model_args, config, on_gpu: bool):
    from transformers import AutoModelForCausalLM

    dtype = resolve_dtype(model_args.torch_dtype, on_gpu)
    kwargs = dict(
        config=config,
        trust_remote_code=model_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
    )
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **kwargs)
    except pickle.UnpicklingError as err:
        raise unsafe_pickle_error(model_args.model_name_or_path, model_args.model_name_or_path, err) from None
    except (OSError, ValueError, ImportError) as err:
        raise ZhtrainError(f"{model_args.model_name_or_path}: cannot load the model ({err})") from err
    model.config.use_cache = False  # the KV cache is useless in training and clashes with checkpointing
    return model


def unsafe_pickle_error(where: str, folder, err) -> ZhtrainError:
    bins = sorted(Path(folder).glob("*.bin")) if Path(folder).is_dir() else []
    return refused_pickle(f"{where}: {bins[0].name if len(bins) == 1 else '.bin weights'}", err)


def cast_trainable_to_fp32(model) -> None:
    """Mixed precision keeps master weights in fp32; fp16 trainable weights break the grad scaler."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def warn_if_pure_half(model, training_args) -> None:
    """--torch_dtype float16 without --fp16/--bf16 trains half-precision weights with no grad scaler.

    The seed's run_pt.sh passes both flags; dropping --fp16 leaves fp16 weights updated in fp16,
    which diverges (measured on an H200: loss 10.9 -> 18.9 in 3 steps)."""
    if training_args.fp16 or training_args.bf16 or training_args.deepspeed:
        return
    if any(p.requires_grad and p.dtype == torch.float16 for p in model.parameters()):
        logger.warning(
            "--torch_dtype float16 without --fp16: trainable weights stay fp16 with no loss scaling and training "
            "may diverge; add --fp16 (as run_pt.sh does) or --bf16, or load float32"
        )


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(full_numel(p) for p in model.parameters() if p.requires_grad)  # full_numel: ZeRO-3 shards
    total = sum(full_numel(p) for p in model.parameters())
    return trainable, total
