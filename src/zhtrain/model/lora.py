"""LoRA through PEFT: check the targets on a weightless skeleton, attach or continue an adapter,
Stage 1 (embeddings only), and PEFT's frozen modules_to_save copies shared with the trained ones.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import re
import warnings
from typing import Optional

import torch

from zhtrain.distributed.sharded import is_zero3_partitioned
from zhtrain.errors import ZhtrainError
from zhtrain.model.loading import unsafe_pickle_error
from zhtrain.weights.adapter_file import check_adapter_folder

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def peft_quietly():
    """PEFT 0.21 reads transformers 5's deprecated `model.is_gradient_checkpointing` when it wraps a
    model, which prints a FutureWarning in every run; that one warning is silenced, nothing else."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def check_module_names(model, names: list[str], flag: str) -> None:
    """Every name must match some module (PEFT ignores a typo if another name matches)."""
    module_names = [name for name, _ in model.named_modules()]
    for wanted in names:
        pattern = re.compile(rf"(^|\.){re.escape(wanted)}$")
        if not any(pattern.search(name) for name in module_names):
            leaves = sorted(
                {name.rsplit(".", 1)[-1] for name in module_names if name and not name.split(".")[-1].isdigit()}
            )
            raise ZhtrainError(f"{flag}: {wanted!r} matches no module of the model; choose from {', '.join(leaves)}")


def check_lora_flags(config, lora_args, trust_remote_code: bool = False) -> None:
    """--peft_path / --trainable / --modules_to_save checked before the data step, on a weightless
    (meta-device) skeleton of the model: a typo costs seconds, not a tokenized corpus."""
    from transformers import AutoModelForCausalLM

    if lora_args.peft_path:
        check_adapter_folder(lora_args.peft_path, "--peft_path")
        return
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    with torch.device("meta"):
        if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:
            # The class itself, not from_config: under ZeRO-3 from_config wraps deepspeed.zero.Init,
            # which cannot partition meta tensors ("Cannot copy out of meta tensor").
            skeleton = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)](config)
        else:
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    check_module_names(skeleton, lora_args.target_modules, "--trainable")
    check_module_names(skeleton, lora_args.modules_to_save_list, "--modules_to_save")


def apply_lora(model, lora_args, gradient_checkpointing: bool, drop_frozen_copies: bool = False):
    """Wrap the model with a new LoRA (or continue `--peft_path`); returns the PeftModel.

    `drop_frozen_copies`: see `share_trained_copies` (not under DeepSpeed/FSDP, which shard or
    flatten each parameter on its own)."""
    from peft import LoraConfig, TaskType, get_peft_model

    if lora_args.peft_path:
        check_adapter_folder(lora_args.peft_path, "--peft_path")
        logger.info("continuing LoRA from %s (its rank/alpha/targets apply)", lora_args.peft_path)
        model = load_peft_adapter(model, lora_args.peft_path, "--peft_path", is_trainable=True)
    else:
        check_module_names(model, lora_args.target_modules, "--trainable")
        check_module_names(model, lora_args.modules_to_save_list, "--modules_to_save")
        config = LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            target_modules=lora_args.target_modules,
            r=lora_args.lora_rank,
            lora_alpha=lora_args.lora_alpha,
            lora_dropout=lora_args.lora_dropout,
            modules_to_save=lora_args.modules_to_save_list or None,
            inference_mode=False,
        )
        with peft_quietly():
            model = get_peft_model(model, config)
    if drop_frozen_copies:
        freed = share_trained_copies(model)
        if freed:
            logger.info(
                "modules_to_save: PEFT's frozen originals share the trained weights (%.0f MB freed)", freed / 2**20
            )
    if gradient_checkpointing and not _embeddings_trainable(model):
        # With frozen embeddings the checkpointed blocks' inputs need grad, or backward finds nothing.
        model.enable_input_require_grads()
    return model


def share_trained_copies(model) -> int:
    """Point each `modules_to_save` wrapper's frozen original at its trained copy; returns bytes freed.

    PEFT keeps the original module (frozen, for `disable_adapter()`) beside the trained copy it
    saves: for embed_tokens + lm_head of a 49953-token vocabulary that is a second vocab x hidden
    pair of matrices held all run long (1.6 GB for a 7B model in fp32). Training never reads the
    originals, so they become the trained tensors: the adapter folder (which holds only the trained
    copies, under the same keys), resume and merge are unchanged; only `disable_adapter()` would
    now see the trained embeddings. Skipped for ZeRO-3 partitions and for several adapters.
    """
    from peft.utils.other import ModulesToSaveWrapper

    freed = 0
    for wrapper in model.modules():
        if not isinstance(wrapper, ModulesToSaveWrapper) or len(wrapper.modules_to_save) != 1:
            continue
        trained = next(iter(wrapper.modules_to_save.values()))
        originals = dict(wrapper.original_module.named_parameters())
        pairs = list(trained.named_parameters())
        if is_zero3_partitioned([*originals.values(), *(q for _, q in pairs)]):
            continue
        if sorted(originals) != sorted(n for n, _ in pairs) or any(originals[n].shape != q.shape for n, q in pairs):
            continue
        for name, param in pairs:
            if originals[name] is param:
                continue
            freed += originals[name].numel() * originals[name].element_size()
            owner_path, _, leaf = name.rpartition(".")
            owner = wrapper.original_module.get_submodule(owner_path) if owner_path else wrapper.original_module
            setattr(owner, leaf, param)
    return freed


def train_embeddings_only(model, first_row: int = 0) -> None:
    """Stage 1: freeze the LoRA matrices so only the trained copies of embed_tokens/lm_head learn.

    The LoRA stays exactly zero (B starts at 0 and never moves): the adapter keeps the standard
    layout, so it loads with PeftModel.from_pretrained, merges, and Stage 2 continues it (--peft_path).
    With `first_row` > 0, a gradient hook zeroes the rows below it: only the new tokens learn.
    """
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.requires_grad_(False)
    if first_row <= 0:
        return

    def new_rows_only(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[:first_row] = 0
        return grad

    for param in model.parameters():
        if param.requires_grad:  # the modules_to_save copies of embed_tokens and lm_head: [vocab, hidden]
            param.register_hook(new_rows_only)


def load_peft_adapter(model, path: str, flag: str, shown: Optional[str] = None, **kwargs):
    """PeftModel.from_pretrained with one-line errors: unsafe pickle, or an adapter for another base.

    `shown`: the folder to name in errors when `path` is a temporary copy of it."""
    from peft import PeftModel

    name = shown or path
    try:
        with peft_quietly():
            return PeftModel.from_pretrained(model, path, **kwargs)
    except pickle.UnpicklingError as err:
        raise unsafe_pickle_error(f"{flag} {name}", path, err) from None
    except RuntimeError as err:
        mismatch = re.search(
            r"size mismatch for (\S+): copying a param with shape (.+?) from checkpoint, "
            r"the shape in current model is (.+?)\.?$",
            str(err),
            re.M,
        )
        if mismatch is None:
            raise
        module, theirs, ours = (text.replace("torch.Size(", "").rstrip(")") for text in mismatch.groups())
        raise ZhtrainError(
            f"{flag} {name}: the adapter was trained on another base model ({module}: {theirs} in the adapter, "
            f"{ours} in this model); pass the base model (and tokenizer) it was trained with"
        ) from None


def _embeddings_trainable(model) -> bool:
    return any(p.requires_grad for p in model.get_input_embeddings().parameters())
