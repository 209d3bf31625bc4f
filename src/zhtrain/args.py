"""Argument groups shared by the commands, with the seed scripts' flag names.

One dataclass per concern; `HfArgumentParser` turns them into CLI flags (and `--help`), so the
flag names, defaults and help text have exactly one source. A YAML/JSON config file may come
first on the command line; flags after it override it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from transformers import HfArgumentParser, TrainingArguments

from zhtrain.errors import ZhtrainError

logger = logging.getLogger(__name__)


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
        metadata={"help": "Comma-separated modules trained in full and saved with the adapter, e.g. embed_tokens,lm_head."},
    )
    peft_path: Optional[str] = field(
        default=None, metadata={"help": "Continue training this existing LoRA adapter folder."}
    )

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
    evaluation_strategy: Optional[str] = field(
        default=None, metadata={"help": "Seed spelling of --eval_strategy."}
    )
    fsdp_transformer_layer_cls_to_wrap: Optional[str] = field(
        default=None, metadata={"help": "Seed spelling: the layer class FSDP wraps (fsdp_config)."}
    )
    save_safetensors: Optional[bool] = field(
        default=None, metadata={"help": "Accepted for compatibility; zhtrain always writes safetensors."}
    )
    group_by_length: bool = field(
        default=False, metadata={"help": "Seed spelling of --train_sampling_strategy group_by_length."}
    )

    def __post_init__(self):
        self.compat_notes: list[str] = []
        if self.warmup_ratio is not None:
            self.warmup_steps = float(self.warmup_ratio)
        if self.evaluation_strategy is not None:
            self.eval_strategy = self.evaluation_strategy
        if self.fsdp_transformer_layer_cls_to_wrap:
            config = dict(self.fsdp_config or {}) if not isinstance(self.fsdp_config, str) else _read_json(self.fsdp_config)
            config["transformer_layer_cls_to_wrap"] = split_names(self.fsdp_transformer_layer_cls_to_wrap)
            self.fsdp_config = config
        if isinstance(self.deepspeed, str) and not self.deepspeed.lstrip().startswith("{"):
            self.deepspeed = resolve_shipped_config(self.deepspeed, "--deepspeed", self.compat_notes)
        if self.group_by_length:
            self.train_sampling_strategy = "group_by_length"
        if self.save_safetensors is False:
            self.compat_notes.append("--save_safetensors False ignored: zhtrain writes safetensors only")
        import torch

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
        super().__post_init__()


SHIPPED_CONFIGS = Path(__file__).parent / "configs"


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


def expand_config_file(argv: list[str]) -> list[str]:
    """`cmd config.yaml --flag v` -> the config's keys as flags, then the CLI flags (which win)."""
    if not argv or not argv[0].endswith((".yaml", ".yml", ".json")):
        return argv
    path = Path(argv[0])
    if not path.is_file():
        raise ZhtrainError(f"{path}: config file not found; check the path")
    try:
        if path.suffix == ".json":
            config = json.loads(path.read_text(encoding="utf-8"))
        else:
            import yaml

            config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except Exception as err:  # yaml and json raise different types; both are the user's file
        raise ZhtrainError(f"{path}: not valid {path.suffix[1:].upper()} ({err}); fix the file") from err
    if not isinstance(config, dict):
        raise ZhtrainError(f"{path}: a config file must be a mapping of flag names to values")
    flags: list[str] = []
    for key, value in config.items():
        if value is None:
            continue
        flags.append(f"--{key}")
        if isinstance(value, (list, tuple)):
            flags.extend(str(item) for item in value)
        elif isinstance(value, dict):
            flags.append(json.dumps(value))
        else:
            flags.append(str(value))
    return flags + argv[1:]


def parse_args(dataclass_types, argv: Optional[list[str]], prog: str):
    """Parse argv into the dataclasses; unknown flags are an error (argparse's own message, exit 2)."""
    parser = HfArgumentParser(dataclass_types, prog=prog)
    argv = expand_config_file(list(argv or []))
    try:
        return parser.parse_args_into_dataclasses(args=argv)
    except ValueError as err:  # e.g. TrainingArguments' own consistency checks
        raise ZhtrainError(f"{prog}: {err}") from err


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0
