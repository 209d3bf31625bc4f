"""Read a LoRA adapter folder — zhtrain's, any current PEFT LoRA, or the seed's old format — into
plain per-module operations that the merge applies to base weights.

Formats accepted:
- `adapter_model.safetensors` (zhtrain, current PEFT) or `adapter_model.bin` (the seed's, loaded with
  `torch.load(weights_only=True)`: no pickled code runs);
- keys as PEFT saves them (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`,
  `base_model.model.model.embed_tokens.weight` for a `modules_to_save` module, which is also the
  seed's PEFT-13e53fc spelling), or as a live PeftModel names them (`.lora_A.default.weight`,
  `.modules_to_save.default.weight`, `.base_layer.weight`).

Each base weight an adapter changes gets an `Edit`: a full replacement (modules_to_save, saved
embedding layers) and/or a low-rank update `B @ A * scaling`, computed in float32 by the merge.
"""

from __future__ import annotations

import math
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from zhtrain.errors import ZhtrainError, refused_pickle
from zhtrain.tokenizer.loading import load_tokenizer
from zhtrain.weights.hf_folder import check_safetensors_file, read_json_object

CONFIG_NAME = "adapter_config.json"


WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


# adapter_config.json options that change what the weights mean in ways a plain W + B@A merge cannot express.
UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA (rescales each column after the update)",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on raw parameters",
    "trainable_token_indices": "trainable token indices",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "block-diagonal LoRA",
    "alora_invocation_tokens": "activated LoRA",
}


PREFIXES = ("base_model.model.", "base_model.")


_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
    r"(?:\.(?!(?:weight|bias)$)(?P<adapter>[^.]+))?(?:\.(?P<param>weight|bias))?$"
)


_WRAPPED_FULL = re.compile(
    r"^(?P<module>.+)\.(?:modules_to_save\.[^.]+|modules_to_save|base_layer)\.(?P<param>weight|bias)$"
)


@dataclass
class LowRank:
    """`delta = B @ A * scaling` (transposed for fan_in_fan_out and for embeddings)."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    transpose: bool

    def delta(self) -> torch.Tensor:
        update = self.B.float() @ self.A.float()
        return (update.T if self.transpose else update) * self.scaling

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = self.B.shape[0], self.A.shape[1]
        return (cols, rows) if self.transpose else (rows, cols)


@dataclass
class Edit:
    """What one adapter does to one base tensor: replace it, then add a low-rank update."""

    replace: Optional[torch.Tensor] = None
    low_rank: Optional[LowRank] = None
    bias_update: Optional[torch.Tensor] = None  # lora_B.bias * scaling (PEFT's lora_bias), for the bias tensor


@dataclass
class Adapter:
    path: Path
    config: dict
    edits: dict[str, Edit]  # base tensor name (e.g. "model.layers.0.self_attn.q_proj.weight") -> edit
    tokenizer_len: Optional[int] = None
    weight_file: Optional[Path] = None
    ignored: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return str(self.path)

    @property
    def has_tokenizer(self) -> bool:
        return self.tokenizer_len is not None

    def edit_for(self, suffix: str) -> Optional[tuple[str, Edit]]:
        """The edit of the tensor whose name ends with `suffix` (e.g. "embed_tokens.weight")."""
        for key, edit in self.edits.items():
            if key == suffix or key.endswith("." + suffix):
                return key, edit
        return None


def load_adapter(folder: str | Path, with_tokenizer: bool = True) -> Adapter:
    """Read an adapter folder; raises ZhtrainError naming the folder and the fix."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ZhtrainError(
            f"--lora_model {folder}: no such folder; pass a LoRA adapter folder (e.g. output_dir/pt_lora_model)"
        )
    config = read_adapter_config(folder)
    weight_file = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if weight_file is None:
        raise ZhtrainError(f"{folder}: no {' or '.join(WEIGHT_FILES)}; the adapter's weights are missing")
    raw = read_weights(weight_file)
    if not raw:
        raise ZhtrainError(
            f"{weight_file}: holds no tensors (an empty adapter, the seed's known 443-byte bug); retrain or use a "
            "checkpoint's adapter"
        )
    edits, ignored = to_edits(raw, config, weight_file)
    tokenizer_len = tokenizer_length(folder) if with_tokenizer else None
    return Adapter(folder, config, edits, tokenizer_len, weight_file, ignored)


def read_adapter_config(folder: Path) -> dict:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise ZhtrainError(
            f"{folder}: no {CONFIG_NAME}; a LoRA folder needs it (r, lora_alpha, target_modules); copy the one "
            "written with the adapter by training, never a hand-made one (a wrong lora_alpha silently ruins the merge)"
        )
    config = read_json_object(path, "LoRA settings")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise ZhtrainError(f"{path}: peft_type {peft_type}; zhtrain merge folds LoRA adapters only")
    for option, what in UNSUPPORTED_OPTIONS.items():
        if config.get(option):
            raise ZhtrainError(
                f"{path}: {option} ({what}) is not supported by zhtrain merge; merge it with PEFT's merge_and_unload"
            )
    for option in ("r", "lora_alpha"):
        if not isinstance(config.get(option), (int, float)) or config[option] <= 0:
            raise ZhtrainError(
                f"{path}: {option} is {config.get(option)!r}; it must be the positive number used in training"
            )
    for option in ("rank_pattern", "alpha_pattern"):  # module-name regex -> number, as PEFT writes them
        patterns = config.get(option) or {}
        if not isinstance(patterns, dict):
            raise ZhtrainError(
                f"{path}: {option} is {type(patterns).__name__}; it must be an object of module pattern -> number, as "
                "training wrote it"
            )
        for pattern, value in patterns.items():
            try:
                re.compile(pattern)
            except re.error as err:
                raise ZhtrainError(
                    f"{path}: {option} key {pattern!r} is not a regular expression ({err}); restore the file written "
                    "by training"
                ) from err
            if not isinstance(value, (int, float)) or value <= 0:
                raise ZhtrainError(
                    f"{path}: {option}[{pattern!r}] is {value!r}; it must be the positive number used in training"
                )
    return config


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        # weights_only: a pickled adapter cannot run code.
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise refused_pickle(str(path), err) from None
    except Exception as err:  # safetensors and torch.load raise many types for a damaged file
        raise ZhtrainError(
            f"{path}: cannot read the adapter weights ({type(err).__name__}: {err}); the file is damaged or not an "
            "adapter"
        ) from err
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ZhtrainError(f"{path}: not a state dict of tensors; pass the adapter_model.bin written by training")
    return loaded


def base_name(raw_key: str) -> str:
    """Strip PEFT's `base_model.model.` wrapper: the rest is the base model's own name."""
    for prefix in PREFIXES:
        if raw_key.startswith(prefix):
            return raw_key[len(prefix) :]
    return raw_key


def to_edits(raw: dict[str, torch.Tensor], config: dict, source: Path) -> tuple[dict[str, Edit], list[str]]:
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    edits: dict[str, Edit] = {}
    ignored: list[str] = []
    for raw_key, tensor in raw.items():
        key = base_name(raw_key)
        lora = _LORA_KEY.match(key)
        if lora:
            slot = lora["kind"] + ("." + lora["param"] if lora["param"] == "bias" else "")
            pairs.setdefault(lora["module"], {})[slot] = tensor
            continue
        if ".original_module." in key or "lora_magnitude_vector" in key:
            if "lora_magnitude_vector" in key:
                raise ZhtrainError(
                    f"{source}: {raw_key} is a DoRA magnitude; DoRA adapters are not supported by zhtrain merge"
                )
            ignored.append(raw_key)  # PEFT's untouched copy of a modules_to_save module
            continue
        wrapped = _WRAPPED_FULL.match(key)
        name = f"{wrapped['module']}.{wrapped['param']}" if wrapped else key
        if not name.endswith((".weight", ".bias")):
            raise ZhtrainError(
                f"{source}: unknown key {raw_key}; zhtrain merge understands LoRA A/B pairs and full module weights"
            )
        edits.setdefault(name, Edit()).replace = tensor
    for module, parts in pairs.items():
        add_low_rank(edits, module, parts, config, source)
    return edits, ignored


def add_low_rank(
    edits: dict[str, Edit], module: str, parts: dict[str, torch.Tensor], config: dict, source: Path
) -> None:
    embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
    a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
    if a_key not in parts or b_key not in parts:
        missing = b_key if a_key in parts else a_key
        raise ZhtrainError(f"{source}: {module} has no {missing}; the adapter file is incomplete")
    A, B = parts[a_key], parts[b_key]
    rank = A.shape[0]
    if A.dim() != 2 or B.dim() != 2 or B.shape[1] != rank:
        raise ZhtrainError(
            f"{source}: {module} has A {list(A.shape)} and B {list(B.shape)}, which do not form a rank-r pair"
        )
    configured_rank = pattern_value(config.get("rank_pattern") or {}, module, config["r"])
    if int(configured_rank) != rank:
        raise ZhtrainError(
            f"{source}: {module} was trained with rank {rank} but adapter_config.json says r={configured_rank}; "
            "the config was edited by hand or belongs to another adapter: restore the one written by training"
        )
    alpha = pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    transpose = embedding or bool(config.get("fan_in_fan_out"))
    edit = edits.setdefault(f"{module}.weight", Edit())
    edit.low_rank = LowRank(A, B, float(scaling), transpose)
    if "lora_B.bias" in parts:
        edits.setdefault(f"{module}.bias", Edit()).bias_update = parts["lora_B.bias"].float() * scaling


def pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key)."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def tokenizer_length(folder: Path) -> Optional[int]:
    """len() of the tokenizer saved with the adapter, or None when the folder has none."""
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None

    return len(load_tokenizer(str(folder)))


def tokenizer_files(folder: Path) -> list[Path]:
    return [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]


def touches_embeddings(adapter: Adapter) -> bool:
    return any(adapter.edit_for(name) for name in ("embed_tokens.weight", "lm_head.weight"))


def wanted_vocab(adapter: Adapter, running: int) -> int:
    """The vocabulary the model must have when this adapter is applied: its tokenizer's length, else
    its saved embedding rows, else unchanged."""
    if adapter.tokenizer_len is not None:
        return adapter.tokenizer_len
    found = adapter.edit_for("embed_tokens.weight")
    if found and found[1].replace is not None:
        return int(found[1].replace.shape[0])
    return running


def canonical_peft_keys(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys as PEFT's save_pretrained writes them (what PeftModel.from_pretrained expects)."""
    out = {}
    for key, tensor in raw.items():
        if ".original_module." in key:
            continue
        key = re.sub(r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)\.(?!(?:weight|bias)$)[^.]+", r".\1", key)
        key = re.sub(r"\.modules_to_save(\.[^.]+)?\.(weight|bias)$", r".\2", key)
        if not key.startswith("base_model."):
            key = "base_model.model." + key
        out[key] = tensor
    return out


def check_adapter_folder(folder: str, flag: str) -> None:
    """An adapter folder to continue from, checked before the model loads: a config that is a JSON
    object, and weights whose safetensors header covers the file."""

    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise ZhtrainError(f"{flag} {folder}: no {CONFIG_NAME} there; pass a LoRA adapter folder")
    read_json_object(path, "LoRA settings")
    weights = next((Path(folder) / name for name in WEIGHT_FILES if (Path(folder) / name).is_file()), None)
    if weights is None:
        raise ZhtrainError(f"{flag} {folder}: no {' or '.join(WEIGHT_FILES)}; the adapter's weights are missing")
    if weights.suffix == ".safetensors":
        check_safetensors_file(weights, "copy it again from the training run")
