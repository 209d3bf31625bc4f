"""`zhtrain inspect`: before a run, what the model/tokenizer pair means and what training it costs.

    zhtrain inspect --model_name_or_path M --tokenizer_name_or_path T [--sample FILE]

prints which of the seed's vocabulary modes applies (or why none), both vocabulary sizes, whether
the tokenizer extends the model's own (same ids first), how the new rows would start, tokens per
character on the sample, and the trainable parameters and optimizer memory of a LoRA run (Stage 2,
the seed's run_pt.sh settings by default) and of Stage 1 (embeddings only). The model is built on
PyTorch's meta device: nothing is loaded, so a 70B model is inspected in seconds.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from zhtrain.errors import ZhtrainError, at_least, run_command
from zhtrain.model.lora import check_module_names
from zhtrain.model.vocab import check_vocab_pair, model_vocab_size, subword_pieces
from zhtrain.tokenizer.bpe import is_byte_level
from zhtrain.tokenizer.corpus import read_sample, tokens_per_character
from zhtrain.tokenizer.loading import load_tokenizer
from zhtrain.training.args import parse_args, split_names

GIB = 1024**3


ADAMW_BYTES = 8  # AdamW keeps two fp32 moments per trainable parameter


GRAD_BYTES = 4  # fp32 gradients (and master weights under mixed precision: 4 more)


@dataclass
class InspectArguments:
    model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Model folder (Hugging Face format); weights are not loaded."}
    )
    tokenizer_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Tokenizer to train with (default: the model's)."}
    )
    sample: Optional[str] = field(default=None, metadata={"help": "A text file to measure tokens per character on."})
    max_sample_lines: int = field(default=2000, metadata={"help": "Read at most this many lines of --sample."})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank of the run to cost (run_pt.sh: 8)."})
    trainable: str = field(
        default="q_proj,v_proj,k_proj,o_proj,gate_proj,down_proj,up_proj",
        metadata={"help": "LoRA target modules (run_pt.sh's)."},
    )
    modules_to_save: str = field(
        default="embed_tokens,lm_head", metadata={"help": "Modules trained in full (run_pt.sh's)."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the model folder."})

    def __post_init__(self):

        at_least(self.lora_rank, 1, "--lora_rank")
        at_least(self.max_sample_lines, 1, "--max_sample_lines")


def inspect(args: InspectArguments) -> dict:
    """The recipe: config -> tokenizers -> mode -> new rows -> sample -> cost. Returns the figures."""

    config = read_config(args)
    skeleton = meta_model(args, config)  # first: a config zhtrain cannot train, or a flag typo, stops before any output
    tokenizer_path = args.tokenizer_name_or_path or args.model_name_or_path
    tokenizer = load_tokenizer(tokenizer_path, trust_remote_code=args.trust_remote_code)
    own = own_tokenizer(args.model_name_or_path, tokenizer_path, tokenizer)
    rows, size = model_vocab_size(config), len(tokenizer)
    report = {"model_vocab": rows, "tokenizer_len": size}
    show(
        "model",
        f"{args.model_name_or_path}: {config.model_type}, {getattr(config, 'num_hidden_layers', '?')} layers, "
        f"hidden {getattr(config, 'hidden_size', '?')}, {rows:,} embedding rows",
    )
    show(
        "tokenizer",
        f"{tokenizer_path}: {size:,} tokens ({kind_of(tokenizer_path)})"
        + (f"; the model's own has {len(own):,}" if own else ""),
    )
    report["mode"] = describe_mode(rows, size)
    if own is not None and own is not tokenizer:
        report["first_different_id"] = first_different_id(own, tokenizer)
    if size > rows:
        report["new_rows"] = describe_new_rows(tokenizer, own, rows, size)
    if args.sample:
        report["tokens_per_character"] = describe_sample(args, tokenizer, own)
    report["cost"] = describe_cost(args, skeleton, size)
    return report


def read_config(args: InspectArguments):
    from transformers import AutoConfig

    if not args.model_name_or_path or not Path(args.model_name_or_path).is_dir():
        raise ZhtrainError(
            f"--model_name_or_path {args.model_name_or_path}: no such folder; pass a model in Hugging Face format"
        )
    try:
        return AutoConfig.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as err:
        raise ZhtrainError(f"{args.model_name_or_path}: cannot read config.json ({err})") from None


def own_tokenizer(model_dir: str, tokenizer_path: str, tokenizer):
    """The model folder's tokenizer (None if it has none; `tokenizer` itself if that is the model's)."""

    if Path(model_dir).resolve() == Path(tokenizer_path).resolve():
        return tokenizer
    if not any((Path(model_dir) / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        return None
    return load_tokenizer(model_dir)


def kind_of(path: str) -> str:
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    if (folder / "tokenizer.model").is_file():
        return "SentencePiece"
    if (folder / "tokenizer.json").is_file():
        import json

        spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))

        return f"{spec['model']['type']}{', byte-level' if is_byte_level(spec.get('pre_tokenizer')) else ''}"
    return "unknown"


def describe_mode(rows: int, size: int) -> str:
    """The seed's mode, or the custom-vocabulary case (saying when --custom_vocab is needed), or why none."""

    try:
        purpose = check_vocab_pair(rows, size)
    except ZhtrainError as refused:
        try:
            purpose = f"{check_vocab_pair(rows, size, custom_vocab=True)} (only with --custom_vocab: {refused})"
        except ZhtrainError as err:
            purpose = f"none: {err}"
    show("mode", purpose)
    return purpose


def first_different_id(own, tokenizer) -> Optional[int]:
    """The first id whose token differs between the model's tokenizer and this one (None: an extension)."""
    n = min(len(own), len(tokenizer))
    theirs, ours = own.convert_ids_to_tokens(list(range(n))), tokenizer.convert_ids_to_tokens(list(range(n)))
    for index, (a, b) in enumerate(zip(theirs, ours)):
        if a != b:
            show(
                "ids",
                f"WARNING: id {index} is {a!r} for the model but {b!r} here: the model's rows would be read as other "
                "tokens",
            )
            return index
    show("ids", f"the first {n:,} ids are the model tokenizer's: this tokenizer extends it")
    return None


def describe_new_rows(tokenizer, own, rows: int, size: int) -> dict:

    if own is None:
        show(
            "new rows",
            f"{size - rows:,}; the model folder has no tokenizer, so --new_token_init subword_mean falls back to the "
            "mean",
        )
        return {"count": size - rows, "spelled": 0}
    pieces = subword_pieces(tokenizer, own, rows, size)
    spelled = [p for p in pieces if p]
    average = sum(map(len, spelled)) / len(spelled) if spelled else 0.0
    show(
        "new rows",
        f"{size - rows:,}; --new_token_init subword_mean starts {len(spelled):,} from their base pieces "
        f"({average:.1f} each on average), {size - rows - len(spelled):,} at the mean",
    )
    return {"count": size - rows, "spelled": len(spelled), "pieces_per_token": average}


def describe_sample(args: InspectArguments, tokenizer, own) -> dict:

    lines = read_sample(args.sample, args.max_sample_lines)
    figures = {"this": tokens_per_character(tokenizer, lines)}
    text = f"{len(lines):,} lines of {args.sample}: {figures['this']:.3f} tokens per character"
    if own is not None and own is not tokenizer and len(own) != len(tokenizer):
        figures["model_own"] = tokens_per_character(own, lines)
        text += f" (the model's own tokenizer: {figures['model_own']:.3f})"
    show("sample", text)
    return figures


def meta_model(args: InspectArguments, config):
    """The model on PyTorch's meta device (no memory), with the run's module names checked on it."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=args.trust_remote_code)
        except ValueError as err:  # not a causal LM (t5, bert, ...): transformers' own sentence names the type
            raise ZhtrainError(
                f"--model_name_or_path {args.model_name_or_path}: not a causal language model ({err}); "
                "pass a decoder-only (LLaMA-family) model"
            ) from err
    # The names a run would refuse are refused here too, instead of costing a run that trains nothing.
    check_module_names(model, split_names(args.trainable), "--trainable")
    check_module_names(model, split_names(args.modules_to_save), "--modules_to_save")
    return model


def describe_cost(args: InspectArguments, model, size: int) -> dict:
    """Parameters counted on a meta-device model: exact, and free."""
    import torch

    hidden = model.get_input_embeddings().weight.shape[1]
    tied = (
        model.get_output_embeddings() is not None
        and model.get_output_embeddings().weight is model.get_input_embeddings().weight
    )
    total = sum(p.numel() for p in model.parameters()) + (
        size - model.get_input_embeddings().weight.shape[0]
    ) * hidden * (1 if tied else 2)
    targets, saved = split_names(args.trainable), split_names(args.modules_to_save)
    lora = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in targets and isinstance(module, torch.nn.Linear):
            lora += args.lora_rank * (module.in_features + module.out_features)
    in_full = 0
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("embed_tokens", "lm_head") and leaf in saved:
            in_full += size * hidden  # at the tokenizer's size
        elif leaf in saved:
            in_full += sum(p.numel() for p in module.parameters())
    stage2 = lora + in_full
    stage1 = 2 * size * hidden
    if tied and "lm_head" in saved:
        total += size * hidden  # training lm_head unties it: a second matrix
    show(
        "Stage 2",
        f"LoRA r={args.lora_rank} on {','.join(targets)} + {','.join(saved) or 'nothing'} in full: "
        f"{stage2:,} trainable of {total:,} parameters; {memory(stage2)}",
    )
    show("Stage 1", f"--training_stage embeddings (embed_tokens + lm_head): {stage1:,} trainable; {memory(stage1)}")
    show(
        "",
        "under --fp16/--bf16 add 4 bytes per trainable parameter (fp32 master weights); --train_new_rows_only "
        "trains fewer rows, but gradients and optimizer states still span the whole matrices",
    )
    return {"total": total, "stage2_trainable": stage2, "stage1_trainable": stage1, "lora": lora}


def memory(trainable: int) -> str:
    return (
        f"AdamW states {trainable * ADAMW_BYTES / GIB:.2f} GiB + fp32 gradients {trainable * GRAD_BYTES / GIB:.2f} GiB"
    )


def show(label: str, text: str) -> None:
    print(f"{label:>10}  {text}", flush=True)


def main(argv=None) -> None:

    (args,) = parse_args((InspectArguments,), argv, prog="zhtrain inspect")
    inspect(args)


if __name__ == "__main__":
    run_command(main, sys.argv[1:])
