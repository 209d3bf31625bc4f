"""Load the tokenizer and base model, fit the vocabulary, and attach LoRA through PEFT."""

from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path
from typing import Optional

import torch

from zhtrain.distributed import full_numel, is_zero3_partitioned
from zhtrain.errors import ZhtrainError, refused_pickle
from zhtrain.vocab import check_vocab_pair, model_vocab_size, resize_embeddings, untie_embeddings

logger = logging.getLogger(__name__)
TOKENIZER_BACKENDS = ("auto", "sentencepiece", "tokenizers")

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def load_tokenizer(path: Optional[str], use_fast: bool = True, trust_remote_code: bool = False, backend: str = "auto"):
    """Load a tokenizer from a folder (a `.model` file is taken from its folder) and check it is real.

    `backend` auto: LLaMA SentencePiece folders through sentencepiece itself, as the seed's slow
    LlamaTokenizer did (transformers 5's conversion gives other ids on the Chinese merge); anything
    else through AutoTokenizer. `sentencepiece` / `tokenizers` force one.
    """
    if backend not in TOKENIZER_BACKENDS:
        raise ZhtrainError(f"--tokenizer_backend {backend}: unknown; choose one of {', '.join(TOKENIZER_BACKENDS)}")
    from transformers import AutoTokenizer

    from zhtrain.sp_tokenizer import SentencePieceLlamaTokenizer, is_llama_sentencepiece_folder

    if not path:
        raise ZhtrainError("no tokenizer: pass --tokenizer_name_or_path (or --model_name_or_path)")
    folder = Path(path)
    if folder.is_file():
        folder = folder.parent  # transformers 5.x builds an empty tokenizer from a bare vocab_file
    if not folder.is_dir():
        raise ZhtrainError(f"tokenizer {path}: no such folder; pass a folder with tokenizer.json or tokenizer.model")
    if backend == "sentencepiece" and not (folder / "tokenizer.model").is_file():
        raise ZhtrainError(f"tokenizer {folder}: --tokenizer_backend sentencepiece needs a tokenizer.model in the folder")
    damaged = damaged_sentencepiece_model(folder) if not (folder / "tokenizer.json").is_file() else None
    if damaged:  # what transformers would build the tokenizer from; its own error points at converters (tiktoken)
        raise ZhtrainError(f"{folder / 'tokenizer.model'}: not a SentencePiece model ({damaged}); restore the file saved with the tokenizer")
    try:
        if backend == "sentencepiece" or (backend == "auto" and is_llama_sentencepiece_folder(folder)):
            tokenizer = SentencePieceLlamaTokenizer.from_pretrained(str(folder))  # the seed's ids (see sp_tokenizer.py)
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), use_fast=use_fast, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, RuntimeError) as err:
        raise ZhtrainError(f"tokenizer {folder}: cannot load ({err}); it needs tokenizer.json or tokenizer.model") from err
    if len(tokenizer) < 10:
        raise ZhtrainError(f"tokenizer {folder}: loaded only {len(tokenizer)} tokens; the folder's files are incomplete")
    return tokenizer


def load_base_tokenizer(model_args, tokenizer):
    """The model folder's own tokenizer when the training tokenizer is a different, larger one (else None).

    `--new_token_init subword_mean` splits each new token with it; without one, new rows use the mean.
    """
    model_dir, tokenizer_dir = model_args.model_name_or_path, model_args.tokenizer_name_or_path
    if not model_dir or Path(model_dir).resolve() == Path(tokenizer_dir or model_dir).resolve():
        return None
    if not any((Path(model_dir) / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        logger.warning("the model folder %s has no tokenizer to split new tokens with; new embedding rows start at the mean", model_dir)
        return None
    try:
        # the Rust backend splits a new piece with the base's own BPE merges (see vocab.subword_pieces)
        base = load_tokenizer(model_dir, model_args.use_fast_tokenizer, model_args.trust_remote_code, backend="tokenizers")
    except ZhtrainError as err:
        logger.warning("no tokenizer in the model folder (%s); new embedding rows start at the mean", err)
        return None
    return base if len(base) < len(tokenizer) else None


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
        try:
            config.update_from_string(model_args.config_overrides)
        except ValueError as err:  # an unknown key or a malformed pair
            raise ZhtrainError(f"--config_overrides {model_args.config_overrides!r}: {err}; write key=value pairs separated by commas, "
                               "with keys from the model's config.json") from err
    if model_args.model_name_or_path:
        check_weight_files(Path(model_args.model_name_or_path))
    return config


def check_weight_files(folder: Path) -> None:
    """Every safetensors file of the model is whole (see weights.check_safetensors_file)."""
    from zhtrain.weights import check_safetensors_file

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
    kwargs = dict(config=config, trust_remote_code=model_args.trust_remote_code, attn_implementation=model_args.attn_implementation)
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


def fit_vocabulary(model, tokenizer, custom_vocab: bool, untie: bool, new_token_init: str = "mean", base_tokenizer=None) -> str:
    """Check the seed's modes, grow the embeddings to the tokenizer, untie if both are trained.

    `base_tokenizer` (the model's own) lets `subword_mean` start new rows from the pieces that spell them.
    """
    purpose = check_vocab_pair(model_vocab_size(model.config), len(tokenizer), custom_vocab)
    # Untied first, so that an init may give a new token different input and output rows.
    if untie and untie_embeddings(model):
        logger.info("embed_tokens and lm_head were tied; untied so both can be trained (tie_word_embeddings=false)")
    resize_embeddings(model, len(tokenizer), init=new_token_init, tokenizer=tokenizer, base_tokenizer=base_tokenizer)
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


def damaged_sentencepiece_model(folder: Path) -> Optional[str]:
    """sentencepiece's complaint about the folder's tokenizer.model, or None (absent or readable)."""
    model_file = folder / "tokenizer.model"
    if not model_file.is_file():
        return None
    import sentencepiece

    try:
        sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    except (OSError, RuntimeError) as err:
        return str(err).splitlines()[0] if str(err) else type(err).__name__
    return None


def check_adapter_folder(folder: str, flag: str) -> None:
    """An adapter folder to continue from, checked before the model loads: a config that is a JSON
    object, and weights whose safetensors header covers the file."""
    from zhtrain.adapters import CONFIG_NAME, WEIGHT_FILES
    from zhtrain.weights import check_safetensors_file, read_json_object

    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise ZhtrainError(f"{flag} {folder}: no {CONFIG_NAME} there; pass a LoRA adapter folder")
    read_json_object(path, "LoRA settings")
    weights = next((Path(folder) / name for name in WEIGHT_FILES if (Path(folder) / name).is_file()), None)
    if weights is None:
        raise ZhtrainError(f"{flag} {folder}: no {' or '.join(WEIGHT_FILES)}; the adapter's weights are missing")
    if weights.suffix == ".safetensors":
        check_safetensors_file(weights, "copy it again from the training run")


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
    from peft import LoraConfig, PeftModel, TaskType, get_peft_model

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
        model = get_peft_model(model, config)
    if drop_frozen_copies:
        freed = share_trained_copies(model)
        if freed:
            logger.info("modules_to_save: PEFT's frozen originals share the trained weights (%.0f MB freed)", freed / 2**20)
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


def unsafe_pickle_error(where: str, folder, err) -> ZhtrainError:
    bins = sorted(Path(folder).glob("*.bin")) if Path(folder).is_dir() else []
    return refused_pickle(f"{where}: {bins[0].name if len(bins) == 1 else '.bin weights'}", err)


def load_peft_adapter(model, path: str, flag: str, shown: Optional[str] = None, **kwargs):
    """PeftModel.from_pretrained with one-line errors: unsafe pickle, or an adapter for another base.

    `shown`: the folder to name in errors when `path` is a temporary copy of it."""
    from peft import PeftModel

    name = shown or path
    try:
        return PeftModel.from_pretrained(model, path, **kwargs)
    except pickle.UnpicklingError as err:
        raise unsafe_pickle_error(f"{flag} {name}", path, err) from None
    except RuntimeError as err:
        mismatch = re.search(r"size mismatch for (\S+): copying a param with shape (.+?) from checkpoint, "
                             r"the shape in current model is (.+?)\.?$", str(err), re.M)
        if mismatch is None:
            raise
        module, theirs, ours = (text.replace("torch.Size(", "").rstrip(")") for text in mismatch.groups())
        raise ZhtrainError(
            f"{flag} {name}: the adapter was trained on another base model ({module}: {theirs} in the adapter, "
            f"{ours} in this model); pass the base model (and tokenizer) it was trained with"
        ) from None


def _embeddings_trainable(model) -> bool:
    return any(p.requires_grad for p in model.get_input_embeddings().parameters())


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
        logger.warning("--torch_dtype float16 without --fp16: trainable weights stay fp16 with no loss scaling and training "
                       "may diverge; add --fp16 (as run_pt.sh does) or --bf16, or load float32")


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(full_numel(p) for p in model.parameters() if p.requires_grad)  # full_numel: ZeRO-3 shards
    total = sum(full_numel(p) for p in model.parameters())
    return trainable, total
