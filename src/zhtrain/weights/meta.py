"""Meta's consolidated LLaMA layout (`consolidated.NN.pth` + `params.json`), to and from HF names.

The rules are the seed's `merge_llama_with_chinese_lora.py`: Meta key names, wq/wk un-permuted
(HF's conversion interleaves the rotary halves), one file per model-parallel shard with
{7B: 1, 13B: 2, 33B: 4, 65B: 8} shards by hidden size, every tensor split along its
model-parallel dimension (norms replicated), and the output layer split unevenly when the vocabulary
does not divide (49953 rows over 2 shards -> [24976, 24977]).

`read_meta` turns such a folder back into HF-named tensors; the merge uses it to verify the pth
output and the tests to prove the round trip is exact.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import torch

from zhtrain.errors import ZhtrainError

SHARDS_BY_HIDDEN_SIZE = {4096: 1, 5120: 2, 6656: 4, 8192: 8}  # 7B, 13B, 33B, 65B


# HF name -> (Meta name, model-parallel split dimension; None = replicated in every shard)
TOP_LEVEL = {
    "model.embed_tokens.weight": ("tok_embeddings.weight", 1),
    "model.norm.weight": ("norm.weight", None),
    "lm_head.weight": ("output.weight", 0),
}


PER_LAYER = {
    "self_attn.q_proj.weight": ("attention.wq.weight", 0),
    "self_attn.k_proj.weight": ("attention.wk.weight", 0),
    "self_attn.v_proj.weight": ("attention.wv.weight", 0),
    "self_attn.o_proj.weight": ("attention.wo.weight", 1),
    "mlp.gate_proj.weight": ("feed_forward.w1.weight", 0),
    "mlp.down_proj.weight": ("feed_forward.w2.weight", 1),
    "mlp.up_proj.weight": ("feed_forward.w3.weight", 0),
    "input_layernorm.weight": ("attention_norm.weight", None),
    "post_attention_layernorm.weight": ("ffn_norm.weight", None),
}


SKIPPED = re.compile(r"rotary_emb\.inv_freq$")  # recomputed from params, as in the seed's script


_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


_META_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")


def meta_name(hf_name: str) -> Optional[tuple[str, Optional[int]]]:
    """(Meta name, split dim) for an HF tensor name; None for tensors Meta's layout does not keep."""
    if SKIPPED.search(hf_name):
        return None
    if hf_name in TOP_LEVEL:
        return TOP_LEVEL[hf_name]
    match = _HF_LAYER.match(hf_name)
    if match and match.group(2) in PER_LAYER:
        name, dim = PER_LAYER[match.group(2)]
        return f"layers.{match.group(1)}.{name}", dim
    raise ZhtrainError(
        f"{hf_name}: has no name in Meta's LLaMA layout (--output_type pth supports LLaMA models only); "
        "use --output_type huggingface"
    )


def hf_name(meta: str) -> str:
    for hf, (name, _) in TOP_LEVEL.items():
        if name == meta:
            return hf
    match = _META_LAYER.match(meta)
    if match:
        for hf_suffix, (name, _) in PER_LAYER.items():
            if name == match.group(2):
                return f"model.layers.{match.group(1)}.{hf_suffix}"
    raise ZhtrainError(f"{meta}: not a Meta LLaMA tensor name")


def default_num_shards(hidden_size: int) -> int:
    return SHARDS_BY_HIDDEN_SIZE.get(hidden_size, 1)


PARAMS_KEYS = ("hidden_size", "num_attention_heads", "num_hidden_layers")  # what params.json and the unpermute need


def check_config(config: dict, folder: Path) -> None:
    missing = [key for key in PARAMS_KEYS if not isinstance(config.get(key), int)]
    if missing:
        raise ZhtrainError(
            f"{folder / 'config.json'}: no integer {', '.join(missing)}; --output_type pth needs them for params.json "
            "(restore the model's config.json)"
        )


def params_json(config: dict) -> dict:
    """Meta's params.json from an HF LLaMA config (vocab_size -1 as in Meta's and the seed's files)."""
    params = {
        "dim": config["hidden_size"],
        "multiple_of": 256,
        "n_heads": config["num_attention_heads"],
        "n_layers": config["num_hidden_layers"],
        "norm_eps": config.get("rms_norm_eps", 1e-6),
        "vocab_size": -1,
    }
    kv_heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    if kv_heads != params["n_heads"]:
        params["n_kv_heads"] = kv_heads
    rope_theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta") or 10000.0
    if float(rope_theta) != 10000.0:
        params["rope_theta"] = rope_theta
    return params


def heads_for(hf: str, config: dict) -> Optional[int]:
    if hf.endswith("self_attn.q_proj.weight"):
        return config["num_attention_heads"]
    if hf.endswith("self_attn.k_proj.weight"):
        return config.get("num_key_value_heads") or config["num_attention_heads"]
    return None


def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's rotary layout -> Meta's (inverse of transformers' convert_llama_weights_to_hf.permute)."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's rotary layout -> HF's (transformers' convert_llama_weights_to_hf.permute)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def split_sizes(length: int, parts: int, uneven_ok: bool, name: str) -> list[int]:
    if length % parts == 0:
        return [length // parts] * parts
    if not uneven_ok:
        raise ZhtrainError(
            f"--num_shards {parts} does not divide {name}'s dimension of {length}; choose a divisor of it"
        )
    sizes = [length // parts] * parts
    sizes[-1] += length % parts  # the seed's rule: 49953 over 2 -> [24976, 24977]
    return sizes


def to_meta_parts(hf: str, tensor: torch.Tensor, config: dict, parts: int) -> list[tuple[str, torch.Tensor]]:
    """One HF tensor -> its slice for each model-parallel shard (Meta name, tensor)."""
    mapped = meta_name(hf)
    if mapped is None:
        return []
    name, dim = mapped
    heads = heads_for(hf, config)
    if heads:
        tensor = unpermute(tensor, heads)
    if dim is None:
        return [(name, tensor)] * parts  # norms: the same vector in every shard
    if parts == 1:
        return [(name, tensor)]
    sizes = split_sizes(tensor.shape[dim], parts, uneven_ok=(name == "output.weight"), name=name)
    # clone: torch.save of a view would store the whole tensor in every shard
    return [(name, piece.clone()) for piece in tensor.split(sizes, dim=dim)]


def shard_file(index: int) -> str:
    return f"consolidated.{index:02d}.pth"


def read_meta(folder: str | Path, config: dict) -> dict[str, torch.Tensor]:
    """A Meta consolidated folder -> HF-named tensors (concatenated, wq/wk permuted back)."""
    folder = Path(folder)
    files = sorted(folder.glob("consolidated.*.pth"))
    if not files:
        raise ZhtrainError(f"{folder}: no consolidated.*.pth files")
    shards = [torch.load(str(f), map_location="cpu", weights_only=True, mmap=True) for f in files]
    out: dict[str, torch.Tensor] = {}
    for meta in shards[0]:
        hf = hf_name(meta)
        _, dim = meta_name(hf)
        pieces = [shard[meta] for shard in shards]
        tensor = pieces[0].clone() if dim is None or len(pieces) == 1 else torch.cat(pieces, dim=dim)
        heads = heads_for(hf, config)
        out[hf] = permute(tensor, heads) if heads else tensor
    return out


def write_consolidated(tensors, out: Path, config: dict, parts: int, max_bytes: int) -> None:
    """HF-named (name, tensor) pairs -> consolidated.NN.pth + params.json. While streaming, the slices of up to
    max_bytes are saved per part; each consolidated file is then assembled once (Meta's format is one file per part)."""
    slices: list[dict] = [{} for _ in range(parts)]
    chunks, held = 0, 0

    def flush():
        nonlocal slices, chunks, held
        for part, state in enumerate(slices):
            torch.save(state, out / f".slice-{chunks:05d}-{part:02d}.pth")
        slices, chunks, held = [{} for _ in range(parts)], chunks + 1, 0

    for hf, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if held and held + size > max_bytes:
            flush()
        for part, (name, piece) in enumerate(to_meta_parts(hf, tensor, config, parts)):
            slices[part][name] = piece
        held += size
    flush()
    for part in range(parts):
        files = [out / f".slice-{number:05d}-{part:02d}.pth" for number in range(chunks)]
        state: dict = {}
        for path in files:
            state.update(torch.load(str(path), map_location="cpu", weights_only=True, mmap=True))
        torch.save(state, out / shard_file(part))
        del state
        for path in files:
            path.unlink()
    write_params(out, config)


def write_params(folder: Path, config: dict) -> None:
    (folder / "params.json").write_text(json.dumps(params_json(config)) + "\n", encoding="utf-8")


def check_names(shapes: dict) -> None:
    """Fail before writing anything if some tensor has no Meta name."""
    for name in shapes:
        meta_name(name)
