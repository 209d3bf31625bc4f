"""Check a merged model against PEFT's own result: logits of the merge vs base + adapters through PEFT.

The reference follows the order the seed's merge implies: for each adapter, grow the model to the
adapter's tokenizer, attach it with `PeftModel.from_pretrained`, and `merge_and_unload` it, then the
next. `generate` uses the same builder to run a base model with adapters (the last one attached as
LoRA layers); the tests also compare against that unmerged forward pass on tiny models.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import torch

from zhtrain.errors import ZhtrainError
from zhtrain.model.lora import load_peft_adapter
from zhtrain.model.vocab import resize_embeddings, untie_embeddings
from zhtrain.tokenizer.loading import load_tokenizer
from zhtrain.weights.adapter_file import (
    canonical_peft_keys,
    load_adapter,
    read_weights,
    touches_embeddings,
    wanted_vocab,
)
from zhtrain.weights.meta import read_meta

logger = logging.getLogger(__name__)


SAMPLE_TEXTS = ("白日依山尽，黄河入海流。", "人民日报社论：迎接新的一年。", "The capital of France is Paris.")


# Max |logit difference| allowed: absolute in float32; for half-precision output, the weights' own
# rounding moves logits, so the bound is relative to the largest logit.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2.5e-2}


def model_with_adapters(
    base_dir: str | Path,
    adapter_dirs: Sequence[str | Path],
    dtype: torch.dtype = torch.float32,
    attn: str = "sdpa",
    merge_last: bool = False,
    **load_kwargs,
):
    """Base + adapters applied through PEFT in order (see the module docstring); `merge_last` folds the last one
    in too (PEFT's merge_and_unload, the seed merge script's own path) instead of running it as a LoRA layer."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype, attn_implementation=attn, **load_kwargs)
    for position, folder in enumerate(adapter_dirs):
        adapter = load_adapter(folder)
        rows = model.get_input_embeddings().weight.shape[0]
        resize_embeddings(model, wanted_vocab(adapter, rows), init="mean")
        if touches_embeddings(adapter):
            untie_embeddings(model)  # as training did: embed_tokens and lm_head each get their own weights
        with _peft_loadable(adapter) as loadable:
            model = load_peft_adapter(model, str(loadable), "--lora_model", shown=str(folder))  # one-line errors
        if position < len(adapter_dirs) - 1 or merge_last:
            model = model.merge_and_unload()
    model.eval()
    return model


class _peft_loadable:
    """The adapter folder itself, or a temporary copy with PEFT's saved key names (old spellings)."""

    def __init__(self, adapter):
        self.adapter = adapter
        self.tmp: Optional[tempfile.TemporaryDirectory] = None

    def __enter__(self) -> Path:
        raw = read_weights(self.adapter.weight_file)
        canonical = canonical_peft_keys(raw)
        if set(canonical) == set(raw):
            return self.adapter.path
        from safetensors.torch import save_file

        self.tmp = tempfile.TemporaryDirectory(prefix="zhtrain-peft-")
        folder = Path(self.tmp.name)
        (folder / "adapter_config.json").write_bytes((self.adapter.path / "adapter_config.json").read_bytes())
        save_file({k: v.contiguous() for k, v in canonical.items()}, str(folder / "adapter_model.safetensors"))
        return folder

    def __exit__(self, *exc):
        if self.tmp is not None:
            self.tmp.cleanup()


def compare_with_peft(
    base_dir: Path, adapter_dirs, out: Path, output_type: str, config: dict, vocab: int, dtype
) -> tuple[float, float, int]:
    """(max |logit difference|, tolerance, number of inputs): the merged output against base + adapters via PEFT."""
    # PEFT's merge path for every adapter: a LoRA layer's unmerged forward rounds differently (x@W + x@A@B vs
    # x@(W + B@A)), ~2e-4 on the logits of a real 30-layer model, which would hide a real error under 1e-4.
    reference = model_with_adapters(base_dir, adapter_dirs, merge_last=True)
    merged = load_merged(out, output_type, config)
    inputs = verification_inputs(out if any(out.glob("tokenizer*")) else None, vocab)
    diff, scale = max_logit_difference(merged, reference, inputs)
    return diff, tolerance_for(dtype, scale), len(inputs)


def load_merged(out: Path, output_type: str, config: dict):
    """The merged folder in float32: HF as saved; Meta's pth read back into HF names (so it is verified too)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if output_type == "huggingface":
        model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    else:
        fields = {k: v for k, v in config.items() if k not in ("model_type", "dtype", "torch_dtype")}
        hf_config = AutoConfig.for_model(config["model_type"], **fields)
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
        state = read_meta(out, config)
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.eval()


def verification_inputs(tokenizer_dir: Optional[Path], vocab: int, seed: int = 0) -> list[torch.Tensor]:
    """A few real sentences (with the final tokenizer) and random ids that reach the newest rows."""
    batches = []
    if tokenizer_dir is not None:
        try:
            tokenizer = load_tokenizer(str(tokenizer_dir))
            for text in SAMPLE_TEXTS:
                ids = tokenizer(text, return_tensors="pt").input_ids
                if ids.shape[1] and int(ids.max()) < vocab:
                    batches.append(ids)
        except ZhtrainError as err:
            logger.warning("verification uses random ids only: %s", err)
    generator = torch.Generator().manual_seed(seed)
    random_ids = torch.randint(0, vocab, (1, 24), generator=generator)
    random_ids[0, -8:] = torch.arange(max(0, vocab - 8), vocab)[-8:]  # the last rows: new tokens, if any
    batches.append(random_ids)
    return batches


@torch.no_grad()
def max_logit_difference(model, reference, inputs: list[torch.Tensor]) -> tuple[float, float]:
    """(max |logits - reference logits|, max |reference logits|) over all inputs and positions."""
    worst, scale = 0.0, 0.0
    for ids in inputs:
        ours = model(input_ids=ids).logits.float()
        theirs = reference(input_ids=ids).logits.float()
        worst = max(worst, float((ours - theirs).abs().max()))
        scale = max(scale, float(theirs.abs().max()))
    return worst, scale


def tolerance_for(dtype: torch.dtype, scale: float) -> float:
    base = TOLERANCE.get(dtype, 5e-2)
    return base if dtype == torch.float32 else base * max(1.0, scale)


def fits_in_memory(fp32_bytes: int) -> tuple[bool, str]:
    """Verification holds the base, its PEFT copy of the trained modules and the merged model in fp32."""
    need = 3 * fp32_bytes + (1 << 30)
    available = _available_memory()
    if available is None:
        return True, "available memory unknown"
    return need <= available, f"needs ~{need / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available"


def _available_memory() -> Optional[int]:
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
