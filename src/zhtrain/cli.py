"""`zhtrain <command> [flags]`: parsing of the command name only; each command owns its flags."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from zhtrain import __version__
from zhtrain.errors import ZhtrainError, run_command

# command -> (module, one-line help). Modules are imported lazily so `zhtrain --help` is instant.
COMMANDS: dict[str, tuple[str, str]] = {
    "pretrain": (
        "zhtrain.pretrain",
        "continued pre-training with LoRA (+ trained embeddings): run_clm_pt_with_peft.py",
    ),
    "run_clm_pt_with_peft": ("zhtrain.pretrain", "alias of pretrain (the seed's script name)"),
    "sft": ("zhtrain.sft", "supervised fine-tuning, LoRA or full (FSDP): run_clm_sft_with_peft.py / FastChat train.py"),
    "train_mem": ("zhtrain.sft", "alias of sft (FastChat's train_mem.py; attention via --attn_implementation)"),
    "merge": (
        "zhtrain.merge",
        "fold LoRA adapters into the base, shard by shard, verified: merge_llama_with_chinese_lora.py",
    ),
    "export": ("zhtrain.export", "export a merged model: `zhtrain export gguf` (llama.cpp's converter)"),
    "generate": ("zhtrain.generate", "generate from a model (+ adapters), file or interactive: inference_hf.py"),
    "tokenizer": (
        "zhtrain.build_tokenizer",
        "train a Chinese SentencePiece model, merge it into LLaMA's, or extend a BPE tokenizer",
    ),
    "inspect": ("zhtrain.inspect", "which vocabulary mode applies, tokens per character, what a LoRA run would train"),
    "launch": (
        "zhtrain.launch",
        "torchrun with fail-fast rendezvous checks and a one-line failure summary: zhtrain launch [torchrun flags] "
        "<command> ...",
    ),
    "demo": ("zhtrain.demo", "the main job on a real model and real Chinese text, end to end"),
}


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: zhtrain <command> [config.yaml] [--flag value ...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "`zhtrain <command> --help` lists a command's flags."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    if argv[0] in ("-V", "--version"):
        print(__version__)
        return
    name = argv.pop(0)
    if name not in COMMANDS:
        print(f"zhtrain: error: unknown command {name!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(2)
    module = importlib.import_module(COMMANDS[name][0])
    run_command(module.main, argv)


CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def read_config_file(path: Path) -> dict:
    """A YAML/JSON mapping of flag names to values, or a one-line error naming the file and line."""
    if not path.is_file():
        raise ZhtrainError(f"{path}: config file not found; check the path")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            config = json.loads(text)
        else:
            import yaml

            config = yaml.safe_load(text)
    except UnicodeDecodeError as err:
        raise ZhtrainError(f"{path}: not UTF-8 text (byte {err.start}); save the config file as UTF-8") from None
    except json.JSONDecodeError as err:
        raise ZhtrainError(
            f"{path}: not valid JSON at line {err.lineno} column {err.colno} ({err.msg}); fix the file"
        ) from None
    except Exception as err:  # yaml's errors: report where, not the multi-line dump
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ZhtrainError(f"{path}: not valid YAML{where} ({problem}); fix the file") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise ZhtrainError(
            f"{path}: a config file must be a mapping of flag names to values, not a {type(config).__name__}"
        )
    return config


def expand_config_file(argv: list[str], parser=None) -> list[str]:
    """`cmd config.yaml --flag v` -> the config's keys as flags, then the CLI flags (which win).

    With `parser`, every key must be one of its flags (a typo is an error naming the file and
    key, not a silently ignored setting); a list goes in as repeated values for a multi-value
    flag, and comma-joined for the seed's comma-separated flags (`trainable: [q_proj, v_proj]`).
    """
    if not argv or not argv[0].endswith(CONFIG_SUFFIXES):
        return argv
    path = Path(argv[0])
    config = read_config_file(path)
    actions = parser._option_string_actions if parser is not None else {}
    positionals = {a.dest: a for a in parser._actions if not a.option_strings} if parser is not None else {}
    flags: list[str] = []
    leading: list[str] = []  # values of positional arguments (e.g. export's MODEL_DIR)
    for key, value in config.items():
        flag = "--" + str(key).lstrip("-")
        action = actions.get(flag)
        if str(key) in positionals and value is not None:
            leading.extend(map(str, value) if isinstance(value, (list, tuple)) else [str(value)])
            continue
        if parser is not None and action is None:
            import difflib

            close = difflib.get_close_matches(flag, [a for a in actions if a.startswith("--")], n=1)
            hint = f"did you mean {close[0][2:]}?" if close else f"see `{parser.prog} --help` for the flags"
            raise ZhtrainError(f"{path}: unknown setting {key!r}; {hint}")
        if value is None or value == []:
            continue  # the default; argparse cannot even say "an empty list"
        if action is not None and action.nargs == 0:  # store_true / --flag/--no-flag: no value on the line
            if isinstance(action, argparse.BooleanOptionalAction):
                flags.append(flag if value else "--no-" + flag[2:])
            elif bool(value) == isinstance(action, argparse._StoreTrueAction):
                flags.append(flag)
            continue
        flags.append(flag)
        if isinstance(value, (list, tuple)):
            if action is None or action.nargs in ("+", "*"):
                flags.extend(str(item) for item in value)
            else:
                flags.append(",".join(map(str, value)))
        elif isinstance(value, dict):
            flags.append(json.dumps(value))
        else:
            flags.append(str(value))
    return leading + flags + argv[1:]


CONFIG_EPILOG = (
    "A YAML/JSON config file may come first: its keys are flags, flags after it win. "
    "--print_config prints the merged settings and exits."
)


class CommandParser(argparse.ArgumentParser):
    """argparse for commands without dataclass groups, with the training commands' conventions:
    a YAML/JSON config file first (flags after it win), `--print_config`, one-line errors."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("epilog", CONFIG_EPILOG)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise ZhtrainError(f"{self.prog}: {message}; see `{self.prog} --help`")

    def parse_args(self, args=None, namespace=None):
        import sys

        args = list(sys.argv[1:] if args is None else args)
        print_config = "--print_config" in args
        args = expand_config_file([arg for arg in args if arg != "--print_config"], self)
        parsed = super().parse_args(args, namespace)
        if print_config:
            import yaml

            values = {key: yaml_value(value) for key, value in vars(parsed).items()}
            header = f"# {self.prog}: merged settings (defaults < config file < flags); usable as a config file\n"
            print(header + yaml.safe_dump(values, sort_keys=False, allow_unicode=True), end="", flush=True)
            raise SystemExit(0)
        return parsed


def yaml_value(value):
    """A parsed value as YAML can write it (enums by value, paths and the rest as text)."""
    import enum

    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [yaml_value(item) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
