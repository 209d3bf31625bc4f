"""`zhtrain generate`: the seed's `inference_hf.py` — generate from a base model, with or without LoRA
adapters, on a file of instructions or interactively; runs on a CPU.

    zhtrain generate --base_model merged_model --with_prompt --interactive
    zhtrain generate --base_model llama --lora_model pt_lora_model --data_file questions.txt \\
        --predictions_file out/predictions.json

The recipe: choose the device -> load the tokenizer (adapter's, else the base's) -> load the model
(adapters applied through PEFT, embeddings grown to the tokenizer) -> for each instruction: build
the prompt (the template's, with --with_prompt) -> sample with the seed's settings -> print, and
write the predictions file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from zhtrain.cli import (
    CommandParser,  # config file first, --print_config, one-line errors
)
from zhtrain.data.templates import get_template, load_saved_template
from zhtrain.errors import ZhtrainError, check_distinct, check_output_file, run_command
from zhtrain.files import write_json_atomic
from zhtrain.model.vocab import resize_embeddings
from zhtrain.tokenizer.loading import load_tokenizer
from zhtrain.weights.adapter_file import load_adapter
from zhtrain.weights.hf_folder import open_checkpoint
from zhtrain.weights.merge_plan import make_plan
from zhtrain.weights.verify import model_with_adapters

logger = logging.getLogger(__name__)

# The seed's inference_hf.py defaults (its generation_config dict).
SAMPLING_DEFAULTS = dict(
    temperature=0.2, top_k=40, top_p=0.9, do_sample=True, num_beams=1, repetition_penalty=1.1, max_new_tokens=400
)
SAMPLE_DATA = ["为什么要减少污染，保护环境？"]  # the seed's sample instruction when no --data_file is given
DEFAULT_TEMPLATE = "alpaca"  # the seed's prompt (Chinese-Alpaca)


@dataclass
class GenerateOptions:
    base_model: str
    lora_model: list[str] = field(default_factory=list)
    tokenizer_path: Optional[str] = None
    data_file: Optional[str] = None
    with_prompt: bool = False
    template: Optional[str] = None
    system_prompt: Optional[str] = None
    interactive: bool = False
    predictions_file: str = "./predictions.json"
    gpus: Optional[str] = None
    only_cpu: bool = False
    seed: Optional[int] = None
    sampling: dict = field(default_factory=lambda: dict(SAMPLING_DEFAULTS))
    alpha: Optional[str] = None
    load_in_8bit: bool = False


def parse_generate_args(argv: Optional[list[str]] = None) -> GenerateOptions:
    p = CommandParser(prog="zhtrain generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--base_model", required=True, help="Model folder in Hugging Face format (e.g. a merged model).")
    p.add_argument(
        "--lora_model",
        default=None,
        help="Adapter folder(s), comma-separated, applied in order; none = the base alone.",
    )
    p.add_argument(
        "--tokenizer_path", default=None, help="Tokenizer folder (default: the last adapter's, else the base's)."
    )
    p.add_argument("--data_file", default=None, help="A file with one instruction per line.")
    p.add_argument("--with_prompt", action="store_true", help="Wrap each input in the prompt template.")
    p.add_argument(
        "--template",
        default=None,
        help="Template for --with_prompt (default: the one saved with the model, else alpaca).",
    )
    p.add_argument("--system_prompt", default=None, help="System prompt for --with_prompt (default: the template's).")
    p.add_argument(
        "--interactive", action="store_true", help="Read instructions from the terminal (an empty line ends)."
    )
    p.add_argument(
        "--predictions_file",
        default="./predictions.json",
        help="Where the outputs of --data_file go (default: %(default)s).",
    )
    p.add_argument("--gpus", default=None, help="CUDA_VISIBLE_DEVICES for the run, e.g. 0 or 0,1 (default: as set).")
    p.add_argument("--only_cpu", action="store_true", help="Run on the CPU even if a GPU is there.")
    p.add_argument("--seed", type=int, default=None, help="Random seed for sampling (default: not fixed).")
    p.add_argument(
        "--alpha",
        default=None,
        help="NTK scaling of RoPE for longer inputs: a number (rope base x alpha^(d/(d-2)), "
        "the seed's rule) or 'auto' (transformers' dynamic NTK). Default: none.",
    )
    p.add_argument("--load_in_8bit", action="store_true", help="Load the model in 8 bits (CUDA GPU with bitsandbytes).")
    for name, value in SAMPLING_DEFAULTS.items():
        if isinstance(value, bool):
            p.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=value, help=f"Default: {value}.")
        else:
            p.add_argument(f"--{name}", type=type(value), default=value, help=f"Default: {value}.")
    ns = p.parse_args(argv)
    sampling = {name: getattr(ns, name) for name in SAMPLING_DEFAULTS}
    check_sampling(sampling)
    adapters = [part.strip() for part in (ns.lora_model or "").split(",") if part.strip()]
    check_distinct(adapters, "--lora_model")  # an adapter applied twice
    if not ns.interactive:
        check_output_file(ns.predictions_file, "--predictions_file", [("--data_file", ns.data_file)])
    return GenerateOptions(
        ns.base_model,
        adapters,
        ns.tokenizer_path,
        ns.data_file,
        ns.with_prompt,
        ns.template,
        ns.system_prompt,
        ns.interactive,
        ns.predictions_file,
        ns.gpus,
        ns.only_cpu,
        ns.seed,
        sampling,
        ns.alpha,
        ns.load_in_8bit,
    )


def check_sampling(sampling: dict) -> None:
    """Ranges transformers would reject (or silently misuse) only after the model has loaded."""
    checks = [
        ("max_new_tokens", sampling["max_new_tokens"] >= 1, "must be at least 1"),
        ("num_beams", sampling["num_beams"] >= 1, "must be at least 1"),
        ("repetition_penalty", sampling["repetition_penalty"] > 0, "must be positive (1.0 = no penalty)"),
    ]
    if sampling["do_sample"]:
        checks += [
            ("temperature", sampling["temperature"] > 0, "must be positive; for greedy decoding pass --no-do_sample"),
            ("top_k", sampling["top_k"] >= 0, "must be 0 (no limit) or more"),
            ("top_p", 0 < sampling["top_p"] <= 1, "must be in (0, 1]"),
        ]
    for name, ok, rule in checks:
        if not ok:
            raise ZhtrainError(f"--{name} {sampling[name]}: {rule}")


def main(argv: Optional[list[str]] = None) -> None:
    generate(parse_generate_args(argv))


def generate(opts: GenerateOptions, read_line=input) -> list[dict]:
    """The recipe. Returns [{"Input", "Output"}] (also written to --predictions_file unless interactive)."""
    instructions = None if opts.interactive else read_instructions(opts.data_file)
    device = choose_device(opts)
    tokenizer = load_generation_tokenizer(opts)
    template, system = choose_template(opts)
    context = model_context(opts)
    for index, instruction in enumerate(instructions or []):  # all checked before the model loads
        problem = too_long(prompt_ids(tokenizer, template, system, instruction), context)
        if problem:
            where = (
                f"--data_file {opts.data_file}, instruction {index + 1} (non-blank line)"
                if opts.data_file
                else "the sample instruction"
            )
            raise ZhtrainError(f"{where}: {problem}")
    model = load_model(opts, len(tokenizer), device)
    generator = Generator(model, tokenizer, template, system, opts.sampling, device, opts.seed, context)
    if opts.interactive:
        return run_interactive(generator, read_line)
    results = []
    for index, instruction in enumerate(instructions):
        prompt, response = generator(instruction)
        print(f"======={index}=======\nInput: {instruction}\n\nOutput: {response}\n", flush=True)
        results.append({"Input": prompt, "Output": response})
    write_predictions(Path(opts.predictions_file), results, opts.sampling)
    return results


# ---------------------------------------------------------------------------------------------
# Steps


def read_instructions(data_file: Optional[str]) -> list[str]:
    if data_file is None:
        return list(SAMPLE_DATA)
    path = Path(data_file)
    if not path.is_file():
        raise ZhtrainError(f"--data_file {data_file}: no such file; pass a text file with one instruction per line")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as err:
        raise ZhtrainError(f"--data_file {data_file}: not UTF-8 text (byte {err.start}); save it as UTF-8") from err
    lines = [line for line in lines if line]
    if not lines:
        raise ZhtrainError(f"--data_file {data_file}: no instructions in it (one per line)")
    return lines


def choose_device(opts: GenerateOptions) -> str:
    if opts.only_cpu:
        return "cpu"
    if opts.gpus is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = opts.gpus  # before the first CUDA call, as the seed does
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_generation_tokenizer(opts: GenerateOptions):

    path = opts.tokenizer_path or next((a for a in reversed(opts.lora_model) if _has_tokenizer(a)), opts.base_model)
    return load_tokenizer(path)


def _has_tokenizer(folder: str) -> bool:
    return any(
        (Path(folder) / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    )


def choose_template(opts: GenerateOptions):
    """--template, else the one saved with the adapter/model by `zhtrain sft`, else the seed's alpaca."""
    if not opts.with_prompt:
        return None, None

    if opts.template:
        return get_template(opts.template), opts.system_prompt
    for folder in [*reversed(opts.lora_model), opts.base_model]:
        saved = load_saved_template(folder)
        if saved is not None:
            return saved[0], opts.system_prompt or saved[1]
    return get_template(DEFAULT_TEMPLATE), opts.system_prompt


def load_model(opts: GenerateOptions, tokenizer_len: int, device: str):
    import torch
    from transformers import AutoModelForCausalLM

    checkpoint = open_checkpoint(opts.base_model)  # a clear error for a wrong folder before transformers' own
    if opts.lora_model:  # the merge's shape checks (adapter for another base...): one line, before any weights load
        make_plan(checkpoint, [load_adapter(folder) for folder in opts.lora_model])
    dtype = torch.float16 if device == "cuda" else torch.float32
    kwargs = load_options(opts, device)
    if opts.lora_model:
        model = model_with_adapters(opts.base_model, opts.lora_model, dtype=dtype, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(opts.base_model, dtype=dtype, **kwargs)
    rows = model.get_input_embeddings().weight.shape[0]
    if tokenizer_len > rows:  # as the seed: a larger tokenizer grows the model (new rows untrained)
        resize_embeddings(model, tokenizer_len, init="mean")
    return (model if opts.load_in_8bit else model.to(device)).eval()  # an 8-bit model is placed by device_map


# The seed's --alpha 'auto' rescales RoPE's base by ((seq_len / 1024 - 1) * 1.1) ^ (d / (d - 2)) beyond 2048 tokens;
# transformers' dynamic NTK with this factor gives (2.2 * seq_len / 2048 - 1.2) ^ (d / (d - 2)): the closest it offers.
AUTO_NTK_FACTOR = 2.2


def load_options(opts: GenerateOptions, device: str) -> dict:
    """from_pretrained keyword arguments for --alpha (a RoPE config change) and --load_in_8bit."""
    kwargs: dict = {}
    if opts.alpha is not None:
        kwargs["config"] = ntk_scaled_config(opts.base_model, opts.alpha)
    if opts.load_in_8bit:
        import importlib.util

        if device != "cuda":
            raise ZhtrainError(
                "--load_in_8bit needs a CUDA GPU (bitsandbytes quantizes on the GPU); drop it to run on the CPU"
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ZhtrainError("--load_in_8bit needs the bitsandbytes package: pip install bitsandbytes")
        from transformers import BitsAndBytesConfig

        kwargs.update(quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map={"": 0})
    return kwargs


def ntk_scaled_config(base_model: str, alpha: str):
    """The base's config with RoPE stretched as the seed's --alpha did (no patching of the rotary module)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_model)
    params = dict(
        getattr(config, "rope_parameters", None)
        or {"rope_type": "default", "rope_theta": getattr(config, "rope_theta", 10000.0)}
    )
    if params.get("rope_type", "default") != "default":
        raise ZhtrainError(
            f"--alpha {alpha}: {base_model} already scales RoPE ({params.get('rope_type')}); drop --alpha"
        )
    if alpha == "auto":
        params.update(rope_type="dynamic", factor=AUTO_NTK_FACTOR)
    else:
        try:
            value = float(alpha)
        except ValueError:
            value = 0.0
        if not value > 0:
            raise ZhtrainError(f"--alpha {alpha}: must be a positive number (e.g. 2) or 'auto'")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        params["rope_theta"] = params["rope_theta"] * value ** (head_dim / (head_dim - 2))
    config.rope_parameters = params
    return config


def prompt_ids(tokenizer, template, system, instruction: str) -> list[int]:
    if template is None:
        return tokenizer(instruction).input_ids
    return template.encode_prompt(tokenizer, instruction, system=system)


def model_context(opts: GenerateOptions) -> Optional[int]:
    """Positions the model was trained for; None with --alpha (NTK: longer inputs are the point)."""
    if opts.alpha is not None:
        return None
    try:
        config = json.loads((Path(opts.base_model) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # load_model names the problem
    return config.get("max_position_embeddings") if isinstance(config, dict) else None


def too_long(ids: list[int], context: Optional[int]) -> Optional[str]:
    """Why this prompt cannot be answered within the model's context, or None."""
    if context and len(ids) >= context:
        return (
            f"the prompt is {len(ids)} tokens, the model's context {context} positions; shorten it, or pass --alpha to "
            "stretch the context (NTK)"
        )
    return None


class Generator:
    """One instruction -> (prompt text, response), with the sampling settings."""

    def __init__(
        self,
        model,
        tokenizer,
        template,
        system,
        sampling: dict,
        device: str,
        seed: Optional[int],
        context: Optional[int] = None,
    ):
        self.model, self.tokenizer, self.template, self.system = model, tokenizer, template, system
        self.sampling, self.device, self.seed, self.context = dict(sampling), device, seed, context
        stops = template.stop_token_ids(tokenizer) if template is not None else []
        self.eos = stops or ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else None)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos[0] if self.eos else 0)

    def prompt_ids(self, instruction: str) -> list[int]:
        return prompt_ids(self.tokenizer, self.template, self.system, instruction)

    def __call__(self, instruction: str) -> tuple[str, str]:
        import torch

        ids = self.prompt_ids(instruction)
        if self.seed is not None:
            torch.manual_seed(self.seed)
        input_ids = torch.tensor([ids], device=self.device)
        settings = dict(self.sampling)
        if self.context and len(ids) + settings["max_new_tokens"] > self.context:
            # Tokens past the trained context would be noise: stop at its end instead.
            settings["max_new_tokens"] = self.context - len(ids)
            logger.warning(
                "prompt of %d tokens: --max_new_tokens %d cut to %d to stay within the model's context (%d)",
                len(ids),
                self.sampling["max_new_tokens"],
                settings["max_new_tokens"],
                self.context,
            )
        if not settings["do_sample"]:
            for name in ("temperature", "top_k", "top_p"):
                settings.pop(name)  # ignored without sampling; transformers warns about them
        with torch.no_grad():
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                eos_token_id=self.eos,
                pad_token_id=self.pad,
                **settings,
            )
        # rstrip U+FFFD: a byte-level token cut by max_new_tokens can leave half a character
        response = self.tokenizer.decode(output[0, len(ids) :], skip_special_tokens=True).strip().rstrip("\ufffd")
        return self.tokenizer.decode(ids, skip_special_tokens=False), response


def run_interactive(generator: Generator, read_line) -> list[dict]:
    results = []
    while True:
        try:
            text = read_line("Input:")
        except EOFError:
            break
        if not text.strip():
            break
        problem = too_long(generator.prompt_ids(text.strip()), generator.context)
        if problem:
            print(f"zhtrain: {problem}", flush=True)
            continue
        prompt, response = generator(text.strip())
        print(f"Response:  {response}\n", flush=True)
        results.append({"Input": prompt, "Output": response})
    return results


def write_predictions(path: Path, results: Iterable[dict], sampling: dict) -> None:
    """The seed's predictions JSON; the sampling settings beside it (not over a model's generation_config.json)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for target, data in ((path, list(results)), (path.with_name(f"{path.stem}.generation_config.json"), sampling)):
        write_json_atomic(target, data)
    print(f"zhtrain generate: predictions written to {path}", flush=True)


if __name__ == "__main__":
    run_command(main, sys.argv[1:])
