"""Argument groups shared by the commands, with the seed scripts' flag names.

One dataclass per concern; `HfArgumentParser` turns them into CLI flags (and `--help`), so the
flag names, defaults and help text have exactly one source. A YAML/JSON config file may come
first on the command line; flags after it override it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from transformers import HfArgumentParser, TrainingArguments

from zhtrain.cli import (
    CONFIG_EPILOG,
    expand_config_file,
    yaml_value,
)
from zhtrain.distributed import engines
from zhtrain.errors import ZhtrainError, at_least
from zhtrain.model.vocab import NEW_TOKEN_INITS


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Base model folder in Hugging Face format (LLaMA-family)."}
    )
    tokenizer_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Tokenizer folder to train with (defaults to the model folder)."}
    )
    tokenizer_name: Optional[str] = field(default=None, metadata={"help": "Alias of --tokenizer_name_or_path."})
    config_name: Optional[str] = field(default=None, metadata={"help": "Config folder if not the model's."})
    cache_dir: Optional[str] = field(default=None, metadata={"help": "Accepted for compatibility; unused."})
    use_fast_tokenizer: bool = field(default=True, metadata={"help": "Use the fast (Rust) tokenizer."})
    tokenizer_backend: str = field(
        default="auto",
        metadata={
            "help": "auto: a LLaMA SentencePiece tokenizer (tokenizer.model) runs through sentencepiece itself, giving "
            "the ids of the seed's slow LlamaTokenizer; others through AutoTokenizer. sentencepiece|tokenizers force "
            "one."
        },
    )
    model_revision: str = field(default="main", metadata={"help": "Accepted for compatibility; unused."})
    use_auth_token: bool = field(default=False, metadata={"help": "Accepted for compatibility; unused."})
    model_type: Optional[str] = field(default=None, metadata={"help": "Accepted for compatibility; unused."})
    config_overrides: Optional[str] = field(
        default=None, metadata={"help": "Config overrides, e.g. 'rope_theta=20000,max_position_embeddings=4096'."}
    )
    torch_dtype: Optional[str] = field(
        default=None,
        metadata={
            "help": "dtype to load the model in. On a machine without CUDA zhtrain loads in float32.",
            "choices": ["auto", "bfloat16", "float16", "float32"],
        },
    )
    attn_implementation: str = field(
        default="sdpa", metadata={"help": "Attention kernel: sdpa | eager | flash_attention_2."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow model code from the model folder. Off unless you pass it."}
    )
    new_token_init: str = field(
        default="subword_mean",
        metadata={
            "help": "How embedding rows of tokens the model lacks start: subword_mean (the mean of the rows of the "
            "pieces the model's own tokenizer splits the token into), contextual (rows from the base model's hidden "
            "states: a slower, closer start), mean (of all rows), random (the seed).",
            "choices": list(NEW_TOKEN_INITS),
        },
    )
    custom_vocab: bool = field(
        default=False,
        metadata={
            "help": "Allow a tokenizer/model vocabulary pair outside the seed's four modes "
            "(the model is resized when the tokenizer is larger)."
        },
    )

    def __post_init__(self):
        if self.tokenizer_name_or_path is None:
            self.tokenizer_name_or_path = self.tokenizer_name or self.model_name_or_path


@dataclass
class LoraArguments:
    trainable: str = field(
        default="q_proj,v_proj", metadata={"help": "Comma-separated module names that get LoRA adapters."}
    )
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r."})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA alpha (scaling = alpha / r)."})
    lora_dropout: float = field(default=0.1, metadata={"help": "Dropout on the LoRA path."})
    modules_to_save: Optional[str] = field(
        default=None,
        metadata={
            "help": "Comma-separated modules trained in full and saved with the adapter, e.g. embed_tokens,lm_head."
        },
    )
    peft_path: Optional[str] = field(
        default=None, metadata={"help": "Continue training this existing LoRA adapter folder."}
    )

    def __post_init__(self):
        at_least(self.lora_rank, 1, "--lora_rank")
        if not 0 <= self.lora_dropout < 1:
            raise ZhtrainError(f"--lora_dropout {self.lora_dropout}: a probability, 0 <= p < 1 (the seed used 0.05)")
        if not self.lora_alpha > 0:
            raise ZhtrainError(f"--lora_alpha {self.lora_alpha}: must be positive (scaling = alpha / r)")

    @property
    def target_modules(self) -> list[str]:
        return split_names(self.trainable)

    @property
    def modules_to_save_list(self) -> list[str]:
        return split_names(self.modules_to_save)


def split_names(text: Optional[str]) -> list[str]:
    return [name.strip() for name in (text or "").split(",") if name.strip()]


@dataclass
class ZhtrainTrainingArguments(TrainingArguments):
    """HF TrainingArguments plus the seed's spellings that transformers 5.x dropped.

    On a machine without CUDA, fp16/bf16/tf32 cannot apply: they are switched off with one note
    (bf16 autocast on CPU measured ~25x slower than fp32), and `use_cpu` is set, without which
    DDP/DeepSpeed ranks on CPU silently train their own copies.
    """

    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start afresh even if --output_dir holds checkpoints (they are removed)."},
    )
    warmup_ratio: Optional[float] = field(
        default=None, metadata={"help": "Seed spelling: warmup as a fraction of the total steps."}
    )
    evaluation_strategy: Optional[str] = field(default=None, metadata={"help": "Seed spelling of --eval_strategy."})
    fsdp_transformer_layer_cls_to_wrap: Optional[str] = field(
        default=None, metadata={"help": "Seed spelling: the layer class FSDP wraps (fsdp_config)."}
    )
    save_safetensors: Optional[bool] = field(
        default=None, metadata={"help": "Accepted for compatibility; zhtrain always writes safetensors."}
    )
    group_by_length: bool = field(
        default=False, metadata={"help": "Seed spelling of --train_sampling_strategy group_by_length."}
    )
    chunked_loss: bool = field(
        default=True,
        metadata={
            "help": "Training loss: lm_head + cross-entropy a few hundred positions at a time, so the "
            "tokens x vocab logits never exist whole (same loss and gradients; see zhtrain/loss.py). "
            "--chunked_loss False uses the model's own loss."
        },
    )
    keep_dropout_masks: bool = field(
        default=True,
        metadata={
            "help": "With --gradient_checkpointing on CPU, each LoRA dropout mask is drawn once and kept for the "
            "backward pass instead of drawn again (same values; see zhtrain/checkpointing.py). "
            "--keep_dropout_masks False draws them twice, as PyTorch does."
        },
    )
    report_to: Optional[str] = field(
        default=None,
        metadata={"help": "Where to log: tensorboard (the default when it is installed, else none), wandb, all, none."},
    )

    def __post_init__(self):
        self.compat_notes: list[str] = []
        for flag in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            at_least(getattr(self, flag), 1, f"--{flag}")
        if self.report_to is None:
            from transformers.integrations import is_tensorboard_available

            self.report_to = "tensorboard" if is_tensorboard_available() else "none"
        if self.warmup_ratio is not None:
            self.warmup_steps = float(self.warmup_ratio)
        if self.evaluation_strategy is not None:
            self.eval_strategy = self.evaluation_strategy
        # The seed's --gradient_checkpointing[_kwargs]: transformers 5.x calls them deprecated aliases of
        # activation_checkpointing[_kwargs] and warns on every run; same meaning, so move them over quietly.
        for old, new in (
            ("gradient_checkpointing", "activation_checkpointing"),
            ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"),
        ):
            if hasattr(self, new) and getattr(self, new) is None and getattr(self, old) is not None:
                setattr(self, new, getattr(self, old))
        if self.fsdp_transformer_layer_cls_to_wrap:
            config = (
                dict(self.fsdp_config or {}) if not isinstance(self.fsdp_config, str) else _read_json(self.fsdp_config)
            )
            config["transformer_layer_cls_to_wrap"] = split_names(self.fsdp_transformer_layer_cls_to_wrap)
            self.fsdp_config = config
        if isinstance(self.deepspeed, str) and not self.deepspeed.lstrip().startswith("{"):
            self.deepspeed = resolve_shipped_config(self.deepspeed, "--deepspeed", self.compat_notes)
        if self.group_by_length:
            self.train_sampling_strategy = "group_by_length"
        if self.save_safetensors is False:
            self.compat_notes.append("--save_safetensors False ignored: zhtrain writes safetensors only")
        import torch

        if self.deepspeed:  # before the CPU fallback below: the flags as the user passed them
            engines.check_deepspeed_config(self.deepspeed, bool(self.fp16), bool(self.bf16), torch.cuda.is_available())

        if not torch.cuda.is_available():
            for flag in ("fp16", "bf16", "tf32"):
                if getattr(self, flag):
                    self.compat_notes.append(f"--{flag} needs a CUDA GPU; none here, so this run trains in float32")
                    setattr(self, flag, None if flag == "tf32" else False)
            if self.fsdp:
                self.compat_notes.append(
                    f"--fsdp {self.fsdp!r} needs CUDA GPUs (accelerate enables FSDP only there); on CPU the processes "
                    "train with DDP over gloo instead, each holding a full copy of the model"
                )
                self.fsdp = None
            self.use_cpu = True
            # Here, not later: TrainingArguments.__post_init__ reads self.device, which creates the process group
            # with gloo's 30-minute default; zhtrain's group honours --ddp_timeout (HF passes it on GPUs only).
            engines.init_cpu_process_group(self.ddp_timeout)
        super().__post_init__()
        engines.explain_deepspeed_mismatches(self)


SHIPPED_CONFIGS = Path(__file__).parents[1] / "configs"


def resolve_shipped_config(path: str, flag: str, notes: list[str]) -> str:
    """A config path as given, or else zhtrain's shipped file of that name (run_pt.sh passes a bare name)."""
    if Path(path).is_file():
        return path
    shipped = SHIPPED_CONFIGS / Path(path).name
    if shipped.is_file():
        notes.append(f"{flag} {path}: not in the current folder; using zhtrain's shipped {shipped}")
        return str(shipped)
    available = ", ".join(sorted(p.name for p in SHIPPED_CONFIGS.glob("*.json")))
    raise ZhtrainError(f"{flag} {path}: no such file; pass a path, or one of the shipped configs: {available}")


def _read_json(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ZhtrainError(f"{path}: cannot read JSON ({err}); fix the file or pass another") from err


class ZhtrainArgumentParser(HfArgumentParser):
    """HfArgumentParser whose errors are one line (ZhtrainError), not usage text + exit."""

    def error(self, message):
        raise ZhtrainError(f"{self.prog}: {message}; see `{self.prog} --help`")


def parse_args(dataclass_types, argv: Optional[list[str]], prog: str):
    """Parse `[config.yaml] [--flag value ...]` into the dataclasses.

    Unknown flags are an error; `--print_config` prints the merged settings (every field of every
    group, as YAML that can be used as a config file) and exits.
    """
    argv = list(argv or [])
    print_config = "--print_config" in argv
    argv = [arg for arg in argv if arg != "--print_config"]
    parser = ZhtrainArgumentParser(dataclass_types, prog=prog, epilog=CONFIG_EPILOG)
    argv = expand_config_file(argv, parser)
    try:
        parsed = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    except ValueError as err:  # unknown flags, or TrainingArguments' own consistency checks
        text = str(err)
        if "not used by the HfArgumentParser" in text:
            text = unknown_flags_message(parser, text.split(":", 1)[1].strip(), prog)
        raise ZhtrainError(f"{prog}: {text}") from err
    if print_config:
        print(config_yaml(parser, argv, dataclass_types, prog), end="", flush=True)
        raise SystemExit(0)
    return parsed


def unknown_flags_message(parser, listed: str, prog: str) -> str:
    """`unknown flag(s) --lora_rnak 8 (did you mean --lora_rank?); see ...` from HF's "[...] not used"."""
    import ast
    import difflib

    try:
        unused = [str(item) for item in ast.literal_eval(listed)]
    except (ValueError, SyntaxError):
        unused = [listed]
    flags = [item for item in unused if item.startswith("-")]
    close = (
        difflib.get_close_matches(flags[0], [a for a in parser._option_string_actions if a.startswith("--")], n=1)
        if flags
        else []
    )
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown flag(s) {' '.join(unused)}{hint}; see `{prog} --help`"


def config_yaml(parser, argv: list[str], dataclass_types, prog: str) -> str:
    """The merged settings (defaults < config file < flags) as YAML, one section per group."""
    import dataclasses

    import yaml

    namespace, _ = parser.parse_known_args(args=argv)
    parts = [f"# {prog}: merged settings (defaults < config file < flags); usable as a config file\n"]
    for group in dataclass_types:
        values = {
            f.name: yaml_value(getattr(namespace, f.name))
            for f in dataclasses.fields(group)
            if f.init and hasattr(namespace, f.name)
        }
        parts.append(f"# --- {group.__name__}\n")
        parts.append(yaml.safe_dump(values, sort_keys=False, allow_unicode=True, default_flow_style=False))
    return "".join(parts)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0
