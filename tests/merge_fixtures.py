"""LoRA adapters made directly with PEFT on tiny models, with non-zero B so that a merge matters."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import torch

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)


def make_adapter(
    model,
    out: Path,
    tokenizer_dir: Optional[Path],
    targets=ALL_TARGETS,
    modules_to_save=("embed_tokens", "lm_head"),
    r: int = 4,
    alpha: float = 8,
    seed: int = 1,
    **lora_kwargs,
) -> Path:
    """Attach a LoRA to `model` (already resized/untied as training would), randomise it, save it."""
    from peft import LoraConfig, get_peft_model

    from zhtrain.model.vocab import resize_embeddings, untie_embeddings

    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        resize_embeddings(model, len(AutoTokenizer.from_pretrained(str(tokenizer_dir))), init="mean")
    if modules_to_save:
        untie_embeddings(model)
    config = LoraConfig(
        target_modules=list(targets),
        r=r,
        lora_alpha=alpha,
        modules_to_save=list(modules_to_save) or None,
        **lora_kwargs,
    )
    torch.manual_seed(seed)  # PEFT draws lora_A from the global generator
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
            elif "modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.2)
    peft_model.save_pretrained(str(out), save_embedding_layers=False)
    if tokenizer_dir is not None:
        copy_tokenizer(tokenizer_dir, out)
    return out


def copy_tokenizer(source: Path, dest: Path) -> None:
    for name in (
        "tokenizer.model",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
    ):
        if (Path(source) / name).is_file():
            shutil.copyfile(Path(source) / name, Path(dest) / name)


def extended_tokenizer(sp_tokenizer_dir: Path, dest: Path, words=("白日依山尽", "黄河入海流", "人民日报")) -> Path:
    """The tiny SentencePiece tokenizer plus added tokens (a larger vocabulary, as after extension)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(sp_tokenizer_dir))
    tokenizer.add_tokens(list(words))
    tokenizer.save_pretrained(str(dest))
    shutil.copyfile(Path(sp_tokenizer_dir) / "tokenizer.model", Path(dest) / "tokenizer.model")
    return dest


def peft_reference(base_dir: Path, adapters: list[Path], vocabs: list[int]):
    """Independent of zhtrain.verify: adapter 1 merged with PEFT, grown, adapter 2 attached, ..."""
    from peft import PeftModel

    from zhtrain.model.vocab import resize_embeddings, untie_embeddings

    model = load_model(base_dir)
    for position, (adapter, vocab) in enumerate(zip(adapters, vocabs)):
        resize_embeddings(model, vocab, init="mean")
        untie_embeddings(model)
        model = PeftModel.from_pretrained(model, str(adapter))
        if position < len(adapters) - 1:
            model = model.merge_and_unload()
    return model.eval()


@torch.no_grad()
def logits(model, ids) -> torch.Tensor:
    model.eval()
    return model(input_ids=ids).logits


def sample_ids(vocab: int) -> torch.Tensor:
    ids = torch.randint(0, vocab, (2, 20), generator=torch.Generator().manual_seed(3))
    ids[:, -3:] = torch.arange(vocab - 3, vocab)  # the newest rows
    return ids
