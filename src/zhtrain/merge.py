"""`zhtrain merge`: fold one or more LoRA adapters into a base model, shard by shard, and verify it.

The seed's `merge_llama_with_chinese_lora(_low_mem).py` job, with its flags:

    zhtrain merge --base_model path/to/llama --lora_model llama_plus_lora,alpaca_plus_lora \\
        --output_type huggingface --output_dir merged

The recipe, in the order things happen:
    read every adapter (config, weights, tokenizer) and the base's shard layout (headers only) ->
    plan: the vocabulary after each adapter and every shape checked, before anything is written ->
    stream the base one tensor at a time (never a whole shard): grow the embeddings to the adapter's
    tokenizer, replace modules_to_save weights, add B@A*scaling in float32, adapter after adapter ->
    write HF shards of --max_shard_size + index + config (or Meta's consolidated.NN.pth) into a
    temporary folder ->
    verify: logits vs base + adapters through PEFT -> rename the folder into place.
"""

from __future__ import annotations

import argparse
import errno
import logging
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

from zhtrain.cli import (
    CommandParser,  # config file first, --print_config, one-line errors
)
from zhtrain.data.templates import TEMPLATE_FILE
from zhtrain.errors import (
    ZhtrainError,
    check_distinct,
    check_not_an_input,
    check_writable,
    run_command,
)
from zhtrain.files import write_aside, write_json_atomic
from zhtrain.weights import meta, verify
from zhtrain.weights.adapter_file import load_adapter, tokenizer_files
from zhtrain.weights.hf_folder import ShardWriter, iter_shard, open_checkpoint
from zhtrain.weights.merge_plan import EMBED, LM_HEAD, MergePlan, make_plan

logger = logging.getLogger(__name__)


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class MergeOptions:
    base_model: Path
    lora_model: list[Path]
    output_dir: Path
    output_type: str = "huggingface"
    dtype: str = "auto"
    verify: Optional[bool] = None  # None: verify when the model fits in memory
    overwrite: bool = False
    num_shards: Optional[int] = None
    max_shard_size: str = "2GB"


def parse_merge_args(argv: Optional[list[str]] = None) -> MergeOptions:
    parser = CommandParser(prog="zhtrain merge", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base_model", required=True, help="Base model folder in Hugging Face format.")
    parser.add_argument("--lora_model", required=True, help="Adapter folders, comma-separated, applied in this order.")
    parser.add_argument(
        "--output_type",
        choices=["huggingface", "pth"],
        default="huggingface",
        help="huggingface (safetensors shards) or pth (Meta's consolidated.NN.pth). Default: %(default)s.",
    )
    parser.add_argument(
        "--output_dir", required=True, help="Where the merged model goes (must not exist, unless --overwrite)."
    )
    parser.add_argument(
        "--dtype",
        choices=["auto", *DTYPES],
        default="auto",
        help="Output dtype; auto keeps the base's. Default: %(default)s.",
    )
    parser.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Compare logits with base + adapters through PEFT (default: on when the model fits in memory).",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="Replace an existing --output_dir (only once the new one is complete)."
    )
    parser.add_argument(
        "--num_shards",
        type=int,
        default=None,
        help="pth only: model-parallel shards (default by size: 7B 1, 13B 2, 33B 4, 65B 8).",
    )
    parser.add_argument(
        "--max_shard_size",
        default="2GB",
        help="Largest output file (e.g. 2GB, 500MB): memory use is about this plus the adapters. Default: %(default)s.",
    )
    parser.add_argument(
        "--offload_dir", default=None, help="Accepted for the seed's command lines; unused (the merge streams shards)."
    )
    ns = parser.parse_args(argv)
    adapters = [Path(part.strip()) for part in ns.lora_model.split(",") if part.strip()]
    if not adapters:
        raise ZhtrainError("--lora_model is empty; pass one or more adapter folders, comma-separated")
    shard_size_bytes(ns.max_shard_size)  # a bad size fails here, before any work
    if ns.num_shards is not None and (ns.num_shards < 1 or ns.output_type != "pth"):
        raise ZhtrainError(f"--num_shards {ns.num_shards}: only for --output_type pth, and at least 1")
    return MergeOptions(
        Path(ns.base_model),
        adapters,
        Path(ns.output_dir),
        ns.output_type,
        ns.dtype,
        ns.verify,
        ns.overwrite,
        ns.num_shards,
        ns.max_shard_size,
    )


def main(argv: Optional[list[str]] = None) -> None:
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.INFO
    )
    merge(parse_merge_args(argv))


def merge(opts: MergeOptions) -> dict:
    """The recipe. Returns a summary (also written to <output_dir>/zhtrain_merge.json)."""
    start = time.perf_counter()
    check_output_dir(opts)
    checkpoint = open_checkpoint(opts.base_model)
    adapters = [load_adapter(folder) for folder in opts.lora_model]
    plan = make_plan(checkpoint, adapters)
    config = merged_config(plan, opts.dtype)
    if opts.output_type == "pth":
        meta.check_names(checkpoint.shapes)
        meta.check_config(config, checkpoint.folder)
    check_disk_space(plan, opts)

    with output_folder(opts.output_dir) as tmp:
        max_bytes = shard_size_bytes(opts.max_shard_size)
        if opts.output_type == "huggingface":
            write_huggingface(plan, tmp, opts.dtype, config, max_bytes)
        else:
            parts = opts.num_shards or meta.default_num_shards(config["hidden_size"])
            write_pth(plan, tmp, opts.dtype, config, parts, max_bytes)
        copy_tokenizer(plan, tmp)
        summary = {
            "base_model": str(opts.base_model),
            "lora_model": [str(a.path) for a in adapters],
            "output_type": opts.output_type,
            "vocab_size": plan.final_vocab,
            "tie_word_embeddings": plan.tied_output,
            "merge_seconds": round(time.perf_counter() - start, 2),
        }
        summary["verification"] = maybe_verify(plan, opts, tmp, config)
        write_json_atomic(tmp / "zhtrain_merge.json", summary)
    print(
        f"zhtrain merge: {len(adapters)} adapter(s) merged into {opts.output_dir} ({opts.output_type}, vocab "
        f"{plan.final_vocab}) in {time.perf_counter() - start:.1f}s",
        flush=True,
    )
    return summary


@contextmanager
def output_folder(dest: Path) -> Iterator[Path]:
    """A temporary folder beside `dest`, renamed to `dest` only when the block succeeds (the old `dest`, if any,
    stays until then); on any failure it is removed, so a half-written model never looks complete."""
    try:
        with write_aside(dest, folder=True) as tmp:
            yield tmp
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise ZhtrainError(
                f"--output_dir {dest}: the disk filled up while writing; free space and run again (nothing was left "
                "behind)"
            ) from err
        raise


def merged_tensor(plan: MergePlan, key: str, tensor: torch.Tensor) -> torch.Tensor:
    """The base tensor after every adapter, in float32 (lm_head of a tied base starts from embed_tokens)."""
    weight = tensor.float()
    for adapter, vocab in zip(plan.adapters, plan.vocab_after):
        if key in (EMBED, LM_HEAD):
            weight = grow_rows(weight, vocab)
        edit = adapter.edits.get(key)
        if edit is None:
            continue
        if edit.replace is not None:
            weight = edit.replace.float()
        if edit.low_rank is not None:
            weight = weight + edit.low_rank.delta()
        if edit.bias_update is not None:
            weight = weight + edit.bias_update
    return weight


def grow_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """New rows = the mean of the existing rows, exactly as zhtrain.model.vocab.resize_embeddings does."""
    if rows <= weight.shape[0]:
        return weight
    mean = weight.float().mean(dim=0, keepdim=True)
    return torch.cat([weight, mean.expand(rows - weight.shape[0], -1)])


def output_dtype(choice: str, stored: torch.dtype) -> torch.dtype:
    if not stored.is_floating_point or choice == "auto":
        return stored
    return DTYPES[choice]


def merged_tensors(plan: MergePlan, dtype_choice: str, with_lm_head: bool):
    """(name, merged tensor in the output dtype), base shard after base shard, one tensor at a time;
    the lm_head of a tied base follows embed_tokens when it is written out."""
    from tqdm.auto import tqdm

    total = sum(len(keys) for keys in plan.checkpoint.keys.values())
    with tqdm(total=total, desc="merging", unit="tensor", delay=1.0) as progress:  # shown once it takes over a second
        for shard in plan.checkpoint.shards:
            for key, tensor in iter_shard(shard, plan.checkpoint.keys[shard]):
                yield key, merged_tensor(plan, key, tensor).to(output_dtype(dtype_choice, tensor.dtype))
                if key == EMBED and with_lm_head:
                    yield LM_HEAD, merged_tensor(plan, LM_HEAD, tensor).to(output_dtype(dtype_choice, tensor.dtype))
                progress.update(1)


def shard_size_bytes(text: str) -> int:
    from transformers.utils.hub import convert_file_size_to_int

    try:
        size = int(text) if text.strip().isdigit() else convert_file_size_to_int(text)
    except ValueError as err:
        raise ZhtrainError(f"--max_shard_size {text}: not a size; write e.g. 2GB or 500MB") from err
    if size <= 0:
        raise ZhtrainError(f"--max_shard_size {text}: must be positive")
    return size


def write_huggingface(plan: MergePlan, out: Path, dtype_choice: str, config: dict, max_bytes: int) -> None:
    """Safetensors shards of at most max_bytes, written while the base streams through."""
    writer = ShardWriter(out, max_bytes)
    for key, tensor in merged_tensors(plan, dtype_choice, with_lm_head=plan.tied_base and plan.untie):
        writer.add(key, tensor)
    names = writer.finish()
    logger.info("%d shard(s) written", len(names))
    write_json_atomic(out / "config.json", config)
    write_json_atomic(out / "generation_config.json", generation_config(plan, config))


def write_pth(plan: MergePlan, out: Path, dtype_choice: str, config: dict, parts: int, max_bytes: int) -> None:
    tensors = merged_tensors(plan, dtype_choice, with_lm_head=plan.tied_base)  # Meta's layout always has output.weight
    meta.write_consolidated(tensors, out, config, parts, max_bytes)


def merged_config(plan: MergePlan, dtype_choice: str) -> dict:
    config = dict(plan.checkpoint.config)
    config["vocab_size"] = plan.final_vocab
    if plan.untie:
        config["tie_word_embeddings"] = False  # lm_head was trained on its own: it is a separate matrix now
    if dtype_choice != "auto":
        for key in ("dtype", "torch_dtype"):
            if key in config:
                config[key] = dtype_choice
        config.setdefault("dtype", dtype_choice)
    return config


def generation_config(plan: MergePlan, config: dict) -> dict:
    import json

    path = plan.checkpoint.folder / "generation_config.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    return {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(key) is not None}


def copy_tokenizer(plan: MergePlan, out: Path) -> None:
    """The last adapter's tokenizer (and saved chat template), as the seed's merge does; else the base's."""

    source = next((a.path for a in reversed(plan.adapters) if a.has_tokenizer), plan.checkpoint.folder)
    for path in tokenizer_files(source):
        shutil.copyfile(path, out / path.name)
    template = next(
        (a.path / TEMPLATE_FILE for a in reversed(plan.adapters) if (a.path / TEMPLATE_FILE).is_file()), None
    )
    if template is not None:
        shutil.copyfile(template, out / TEMPLATE_FILE)


def check_output_dir(opts: MergeOptions) -> None:
    out = opts.output_dir.resolve()
    check_distinct(opts.lora_model, "--lora_model")  # an adapter applied twice
    # --overwrite replaces the whole folder: an input anywhere inside it would go with it.
    check_not_an_input(
        opts.output_dir,
        "--output_dir",
        [("--base_model", opts.base_model), *[("--lora_model", a) for a in opts.lora_model]],
    )
    if out.exists() and not opts.overwrite:
        raise ZhtrainError(
            f"--output_dir {opts.output_dir} exists; pass --overwrite to replace it (the old folder stays until the "
            "new one is complete) or choose another folder"
        )
    check_writable(opts.output_dir, "--output_dir")  # a path under a file / read-only: one line, not a traceback
    out.parent.mkdir(parents=True, exist_ok=True)


def check_disk_space(plan: MergePlan, opts: MergeOptions) -> None:
    dtype = DTYPES.get(opts.dtype)
    need = plan.checkpoint.nbytes(dtype)
    free = shutil.disk_usage(opts.output_dir.resolve().parent).free
    if need > free:
        raise ZhtrainError(
            f"--output_dir {opts.output_dir}: the merged model needs ~{need / 2**30:.1f} GiB but only "
            f"{free / 2**30:.1f} GiB are free there; free space or choose another disk"
        )


def maybe_verify(plan: MergePlan, opts: MergeOptions, out: Path, config: dict) -> dict:

    fits, why = verify.fits_in_memory(plan.checkpoint.nbytes(torch.float32))
    if opts.verify is False or (opts.verify is None and not fits):
        reason = (
            "--no-verify"
            if opts.verify is False
            else f"the model is too large to verify in memory ({why}); pass --verify to force"
        )
        print(f"zhtrain merge: verification skipped: {reason}", flush=True)
        return {"skipped": reason}
    dtype = DTYPES.get(opts.dtype) or plan.checkpoint.dtypes[EMBED]
    diff, tolerance, inputs = verify.compare_with_peft(
        plan.checkpoint.folder, [a.path for a in plan.adapters], out, opts.output_type, config, plan.final_vocab, dtype
    )
    print(
        f"zhtrain merge: verified against base + adapters through PEFT on {inputs} inputs: max |logit difference| "
        f"{diff:.3g} (tolerance {tolerance:.3g})",
        flush=True,
    )
    if not diff <= tolerance:
        raise ZhtrainError(
            f"verification failed: max |logit difference| {diff:.3g} exceeds {tolerance:.3g} between the merged model "
            f"and base + adapters through PEFT; nothing was written to {opts.output_dir} (report this with the "
            "adapters' configs)"
        )
    return {"max_abs_logit_diff": diff, "tolerance": tolerance, "inputs": inputs}


if __name__ == "__main__":
    run_command(main, sys.argv[1:])
