"""A Hugging Face model folder's weights, read one shard at a time and written back the same way.

Reading never holds more than one shard: the names, shapes and dtypes come from the safetensors
headers (or, for the seed era's `pytorch_model-*.bin` shards, from a memory-mapped
`torch.load(weights_only=True)`), and tensors are loaded one by one when a shard is processed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from zhtrain.errors import ZhtrainError
from zhtrain.files import write_json_atomic

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


LAYOUTS = (  # (index file, single file) in order of preference
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)


@dataclass
class Checkpoint:
    folder: Path
    shards: list[Path]
    keys: dict[Path, list[str]]  # shard -> tensor names, in file order
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)

    @property
    def config(self) -> dict:
        return read_config(self.folder)

    def nbytes(self, dtype: torch.dtype | None = None) -> int:
        total = 0
        for name, shape in self.shapes.items():
            size = (dtype or self.dtypes[name]).itemsize
            total += size * _numel(shape)
        return total

    def shard_of(self, name: str) -> Path:
        for shard, names in self.keys.items():
            if name in names:
                return shard
        raise KeyError(name)


def _numel(shape) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def read_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ZhtrainError(f"{folder}: no config.json; pass a model folder in Hugging Face format")
    return read_json_object(path, "model settings")


def read_json_object(path: Path, what: str) -> dict:
    """A JSON file that must hold an object (a config): one line naming the file when it does not."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ZhtrainError(f"{path}: not valid JSON ({err}); restore the file written by training") from err
    if not isinstance(data, dict):
        raise ZhtrainError(f"{path}: not a JSON object of {what}; restore the file written by training")
    return data


def check_safetensors_file(path: Path, fix: str) -> None:
    """Its header parses and covers the file: a copy cut short fails here in one line, before any
    slow step, not in a traceback when the weights load."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            handle.keys()
    except Exception as err:  # safetensors raises its own error type for every kind of damage
        raise ZhtrainError(f"{path}: cannot read it ({err}); the file is damaged or cut short: {fix}") from err


def open_checkpoint(folder: str | Path, flag: str = "--base_model") -> Checkpoint:
    """The shard layout of a model folder, without loading any tensor."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ZhtrainError(f"{flag} {folder}: no such folder; pass a model folder in Hugging Face format")
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        raise ZhtrainError(
            f"{flag} {folder}: this is a LoRA adapter, not a model; pass the base model it was trained on (or merge it "
            "first)"
        )
    read_config(folder)
    for index_name, single_name in LAYOUTS:
        if (folder / index_name).is_file():
            shards = _shards_from_index(folder / index_name)
            break
        if (folder / single_name).is_file():
            shards = [folder / single_name]
            break
    else:
        if list(folder.glob("consolidated.*.pth")):
            raise ZhtrainError(
                f"{flag} {folder}: Meta consolidated.*.pth weights; convert them to Hugging Face format first"
            )
        raise ZhtrainError(
            f"{flag} {folder}: no model.safetensors, shards with an index, or pytorch_model.bin; not a Hugging Face "
            "model folder"
        )
    checkpoint = Checkpoint(folder, shards, {})
    for shard in shards:
        checkpoint.keys[shard] = []
        for name, (shape, dtype) in _header(shard).items():
            checkpoint.keys[shard].append(name)
            checkpoint.shapes[name] = shape
            checkpoint.dtypes[name] = dtype
    return checkpoint


def _shards_from_index(index: Path) -> list[Path]:
    data = read_json_object(index, "weight index entries")
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
        raise ZhtrainError(
            f"{index}: not a weight index (no 'weight_map' of tensor -> file names); restore the file saved with the "
            "model"
        )
    if not isinstance(data.get("metadata"), dict):  # transformers' loader reads it (KeyError inside it otherwise)
        raise ZhtrainError(f"{index}: no 'metadata' object; restore the file saved with the model")
    shards = []
    for name in dict.fromkeys(weight_map.values()):  # file order as first referenced, no duplicates
        path = index.parent / name
        if not path.is_file():
            raise ZhtrainError(
                f"{index}: lists {name}, which is missing from {index.parent}; the download is incomplete"
            )
        shards.append(path)
    return shards


def _header(shard: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    try:
        if shard.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(shard), framework="pt") as handle:
                out = {}
                for name in handle.keys():
                    piece = handle.get_slice(name)
                    out[name] = (tuple(piece.get_shape()), SAFETENSORS_DTYPES[piece.get_dtype()])
                return out
        state = _torch_load(shard)
        return {name: (tuple(t.shape), t.dtype) for name, t in state.items()}
    except ZhtrainError:
        raise
    except Exception as err:  # a truncated or foreign file
        raise ZhtrainError(
            f"{shard}: cannot read the weights ({type(err).__name__}: {err}); the file is damaged"
        ) from err


def _torch_load(path: Path) -> dict:
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # pre-zip format cannot be memory-mapped
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ZhtrainError(f"{path}: not a state dict")
    return state


def iter_shard(shard: Path, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of one shard, one tensor in memory at a time.

    safetensors: the file is opened per tensor, so its memory map (whose touched pages count as
    resident memory) never spans more than the tensor being read. A `.bin` shard can only be
    memory-mapped whole.
    """
    if shard.suffix == ".safetensors":
        from safetensors import safe_open

        for name in names:
            with safe_open(str(shard), framework="pt") as handle:
                tensor = handle.get_tensor(name)
            yield name, tensor
        return
    state = _torch_load(shard)
    for name in names:
        yield name, state.pop(name)


class ShardWriter:
    """Safetensors shards of at most `max_bytes` each, written as tensors arrive; named
    model-0000i-of-0000N.safetensors (or model.safetensors) once N is known, with the index."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending[name] = tensor
        self.pending_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        path = self.folder / f".part-{len(self.written):05d}.safetensors"
        self.total += save_shard(self.pending, path)
        self.written.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[str]:
        self.flush()
        names = shard_names(len(self.written))
        weight_map = {}
        for (path, keys), name in zip(self.written, names):
            os.replace(path, self.folder / name)
            weight_map.update(dict.fromkeys(keys, name))
        if len(names) > 1:
            write_index(self.folder, weight_map, self.total)
        return names


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def save_shard(tensors: dict[str, torch.Tensor], path: Path) -> int:
    """Write one safetensors shard; returns its payload size in bytes."""
    from safetensors.torch import save_file

    tensors = {name: t.contiguous() for name, t in tensors.items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def write_index(folder: Path, weight_map: dict[str, str], total_size: int) -> None:
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    write_json_atomic(folder / "model.safetensors.index.json", index)
