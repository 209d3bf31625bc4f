"""Load the tokenizer and base model, fit the vocabulary, and attach LoRA through PEFT."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Optional

import torch

from zhtrain.errors import ZhtrainError
from zhtrain.vocab import check_vocab_pair, model_vocab_size, resize_embeddings, untie_embeddings

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def load_tokenizer(path: Optional[str], use_fast: bool = True, trust_remote_code: bool = False):
    """Load a tokenizer from a folder (a `.model` file is taken from its folder) and check it is real."""
    from transformers import AutoTokenizer

    if not path:
        raise ZhtrainError("no tokenizer: pass --tokenizer_name_or_path (or --model_name_or_path)")
    folder = Path(path)
    if folder.is_file():
        folder = folder.parent  # transformers 5.x builds an empty tokenizer from a bare vocab_file
    if not folder.is_dir():
        raise ZhtrainError(f"tokenizer {path}: no such folder; pass a folder with tokenizer.json or tokenizer.model")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), use_fast=use_fast, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as err:
        raise ZhtrainError(f"tokenizer {folder}: cannot load ({err}); it needs tokenizer.json or tokenizer.model") from err
    if len(tokenizer) < 10:
        raise ZhtrainError(f"tokenizer {folder}: loaded only {len(tokenizer)} tokens; the folder's files are incomplete")
    return tokenizer


def sentencepiece_file(tokenizer_path: Optional[str]) -> Optional[Path]:
    """The tokenizer's `tokenizer.model`, if any: copied next to adapters for SentencePiece tools."""
    if not tokenizer_path:
        return None
    folder = Path(tokenizer_path)
    if folder.is_file():
        return folder if folder.suffix == ".model" else None
    candidate = folder / "tokenizer.model"
    return candidate if candidate.is_file() else None


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
        config.update_from_string(model_args.config_overrides)
    return config


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
    kwargs = dict(config=config, trust_remote_code=model_args.trust_remote_code, attn_implementation=model_args.attn_implementation)
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **kwargs)
    except (OSError, ValueError, ImportError) as err:
        raise ZhtrainError(f"{model_args.model_name_or_path}: cannot load the model ({err})") from err
    model.config.use_cache = False  # the KV cache is useless in training and clashes with checkpointing
    return model


def fit_vocabulary(model, tokenizer, custom_vocab: bool, untie: bool, new_token_init: str = "mean") -> str:
    """Check the seed's modes, grow the embeddings to the tokenizer, untie if both are trained."""
    purpose = check_vocab_pair(model_vocab_size(model.config), len(tokenizer), custom_vocab)
    resize_embeddings(model, len(tokenizer), init=new_token_init)
    if untie and untie_embeddings(model):
        logger.info("embed_tokens and lm_head were tied; untied so both can be trained (tie_word_embeddings=false)")
    return purpose


def check_module_names(model, names: list[str], flag: str) -> None:
    """Every name must match some module (PEFT ignores a typo if another name matches)."""
    module_names = [name for name, _ in model.named_modules()]
    for wanted in names:
        pattern = re.compile(rf"(^|\.){re.escape(wanted)}$")
        if not any(pattern.search(name) for name in module_names):
            leaves = sorted({name.rsplit(".", 1)[-1] for name in module_names if name and not name.split(".")[-1].isdigit()})
            raise ZhtrainError(
                f"{flag}: {wanted!r} matches no module of the model; choose from {', '.join(leaves)}"
            )


def apply_lora(model, lora_args, gradient_checkpointing: bool):
    """Wrap the model with a new LoRA (or continue `--peft_path`); returns the PeftModel."""
    from peft import LoraConfig, PeftModel, TaskType, get_peft_model

    if lora_args.peft_path:
        if not (Path(lora_args.peft_path) / "adapter_config.json").is_file():
            raise ZhtrainError(f"--peft_path {lora_args.peft_path}: no adapter_config.json there; pass a LoRA adapter folder")
        logger.info("continuing LoRA from %s (its rank/alpha/targets apply)", lora_args.peft_path)
        model = PeftModel.from_pretrained(model, lora_args.peft_path, is_trainable=True)
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
        model = get_peft_model(model, config)
    if gradient_checkpointing and not _embeddings_trainable(model):
        # With frozen embeddings the checkpointed blocks' inputs need grad, or backward finds nothing.
        model.enable_input_require_grads()
    return model


def _embeddings_trainable(model) -> bool:
    return any(p.requires_grad for p in model.get_input_embeddings().parameters())


def cast_trainable_to_fp32(model) -> None:
    """Mixed precision keeps master weights in fp32; fp16 trainable weights break the grad scaler."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
