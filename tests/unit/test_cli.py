"""Config files and the command table: `zhtrain <cmd> config.yaml [--flag value ...]`, flags win, `--print_config`."""

from __future__ import annotations

import importlib
import json

import pytest
import yaml
from helpers import REPO, seed_script_args

from zhtrain.cli import COMMANDS, CommandParser
from zhtrain.errors import ZhtrainError
from zhtrain.pretrain import parse_pretrain_args


def printed_config(capsys, parse, argv) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        parse([*argv, "--print_config"])
    assert exit_info.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_example_pretrain_yaml_means_the_same_as_run_pt_sh():
    from_script = parse_pretrain_args(
        seed_script_args(REPO / "examples" / "run_pt.sh", "zhtrain.pretrain", {"RANDOM": "42"})
    )
    from_yaml = parse_pretrain_args([str(REPO / "examples" / "pretrain.yaml"), "--seed", "42"])
    from dataclasses import fields

    for script_group, yaml_group in zip(from_script, from_yaml):
        names = [f.name for f in fields(script_group) if f.init]
        script_values = {name: getattr(script_group, name) for name in names}
        yaml_values = {name: getattr(yaml_group, name) for name in names}
        differing = {k for k in script_values if script_values[k] != yaml_values[k]}
        # run_pt.sh always starts afresh; the YAML example resumes (documented in the file).
        assert differing <= {"overwrite_output_dir"}, {k: (script_values[k], yaml_values[k]) for k in differing}


def test_flags_after_the_config_win_and_lists_become_comma_flags(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        "max_steps: 100\nlearning_rate: 2.0e-4\ntrainable: [q_proj, v_proj]\ndo_train: true\noutput_dir: o\n"
    )
    _, _, lora, training = parse_pretrain_args([str(config), "--max_steps", "7"])
    assert training.max_steps == 7 and training.learning_rate == 2e-4 and training.do_train
    assert lora.target_modules == ["q_proj", "v_proj"]


def test_json_config(tmp_path):
    config = tmp_path / "run.json"
    config.write_text(
        json.dumps({"lora_rank": 16, "output_dir": "o", "deepspeed": {"zero_optimization": {"stage": 2}}})
    )
    _, _, lora, training = parse_pretrain_args([str(config)])
    assert lora.lora_rank == 16 and training.deepspeed == {"zero_optimization": {"stage": 2}}


def test_print_config_shows_every_field_merged_and_round_trips(tmp_path, capsys):
    from dataclasses import fields

    from zhtrain.pretrain import ARGUMENT_GROUPS

    config = tmp_path / "run.yaml"
    config.write_text("max_steps: 100\nlora_rank: 4\noutput_dir: o\n")
    merged = printed_config(capsys, parse_pretrain_args, [str(config), "--max_steps", "9"])
    assert merged["max_steps"] == 9 and merged["lora_rank"] == 4 and merged["output_dir"] == "o"
    assert merged["learning_rate"] == 5e-5  # a default
    every_field = {f.name for group in ARGUMENT_GROUPS for f in fields(group) if f.init}
    assert set(merged) == every_field
    # The printed settings are a config file that gives the same settings back.
    (tmp_path / "merged.yaml").write_text(yaml.safe_dump(merged))
    assert printed_config(capsys, parse_pretrain_args, [str(tmp_path / "merged.yaml")]) == merged


@pytest.mark.parametrize(
    "text, message",
    [
        ("max_step: 3\n", r"run.yaml: unknown setting 'max_step'; did you mean max_steps\?"),
        ("max_steps: [3\n", r"run.yaml: not valid YAML at line 2 column 1 \("),
        ("- max_steps\n- 3\n", r"run.yaml: a config file must be a mapping of flag names to values, not a list"),
        (
            "max_steps: three\n",
            r"zhtrain pretrain: argument --max_steps/--max-steps: invalid int value: 'three'; "
            r"see `zhtrain pretrain --help`",
        ),
    ],
    ids=["typo", "malformed", "not-a-mapping", "bad-value"],
)
def test_config_file_errors_name_the_file_and_the_fix(tmp_path, text, message):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    with pytest.raises(ZhtrainError, match=message):
        parse_pretrain_args([str(config), "--output_dir", "o"])


def test_unknown_flag_is_one_line():
    with pytest.raises(
        ZhtrainError,
        match=r"unknown flag\(s\) --lora_rnak 8 \(did you mean --lora_rank\?\); see `zhtrain pretrain --help`",
    ):
        parse_pretrain_args(["--output_dir", "o", "--lora_rnak", "8"])


def test_command_parser_config_positionals_booleans_and_print_config(tmp_path, capsys):
    parser = CommandParser(prog="zhtrain demo-cmd")
    parser.add_argument("model_dir")
    parser.add_argument("--outtype", choices=["f16", "q8_0"], default="f16")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--verify", action=__import__("argparse").BooleanOptionalAction, default=None)
    config = tmp_path / "c.yaml"
    config.write_text("model_dir: merged\nouttype: q8_0\noverwrite: true\nverify: false\n")
    ns = parser.parse_args([str(config)])
    assert (ns.model_dir, ns.outtype, ns.overwrite, ns.verify) == ("merged", "q8_0", True, False)
    assert parser.parse_args([str(config), "--outtype", "f16", "--verify"]).outtype == "f16"
    assert printed_config(capsys, parser.parse_args, [str(config)]) == {
        "model_dir": "merged",
        "outtype": "q8_0",
        "overwrite": True,
        "verify": False,
    }
    with pytest.raises(ZhtrainError, match="zhtrain demo-cmd: argument --outtype: invalid choice"):
        parser.parse_args(["m", "--outtype", "q3"])


COMMAND_CONFIGS = {
    "pretrain": ("zhtrain.pretrain", [], {"output_dir": "o", "lora_rank": 4}, ["--lora_rank", "16"]),
    "sft": ("zhtrain.sft", [], {"output_dir": "o", "data_path": "train.json"}, ["--template", "alpaca"]),
    "merge": ("zhtrain.merge", [], {"base_model": "b", "lora_model": "a", "output_dir": "o"}, ["--output_type", "pth"]),
    "export": ("zhtrain.export", ["gguf"], {"model_dir": "m", "outtype": "q8_0"}, ["--overwrite"]),
    "generate": ("zhtrain.generate", [], {"base_model": "b", "with_prompt": True}, ["--max_new_tokens", "7"]),
    "tokenizer": (
        "zhtrain.build_tokenizer",
        ["train"],
        {"corpus": ["a.txt", "b.txt"], "output_dir": "o"},
        ["--vocab_size", "900"],
    ),
}


def test_the_config_table_covers_every_command():
    config_free = {"demo", "inspect", "launch"}  # the demo has no settings; inspect/launch wrap other commands
    aliases = {"run_clm_pt_with_peft", "train_mem"}
    assert set(COMMANDS) - config_free - aliases == set(COMMAND_CONFIGS)


@pytest.mark.parametrize("command", list(COMMAND_CONFIGS))
def test_every_command_takes_a_config_file_and_prints_it(tmp_path, capsys, command):
    """`zhtrain <cmd> [subcommand] config.yaml --flag v --print_config`: the file's settings, the flag on top."""
    module_name, prefix, settings, override = COMMAND_CONFIGS[command]
    module = importlib.import_module(module_name)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(settings))
    merged = printed_config(capsys, lambda argv: module.main([*prefix, *argv]), [str(config), *override])
    for key, value in settings.items():
        if key != override[0][2:]:
            assert merged[key] == value, (key, merged[key])
    flag_value = True if len(override) == 1 else yaml.safe_load(override[1])
    assert merged[override[0][2:]] == flag_value


EXAMPLES = {  # examples/<name>.yaml -> the command (and subcommand) that reads it
    "pretrain": ("zhtrain.pretrain", []),
    "sft": ("zhtrain.sft", []),
    "merge": ("zhtrain.merge", []),
    "export": ("zhtrain.export", ["gguf"]),
    "generate": ("zhtrain.generate", []),
    "tokenizer": ("zhtrain.build_tokenizer", ["merge"]),
}


def test_every_example_config_is_listed():
    assert {p.stem for p in (REPO / "examples").glob("*.yaml")} == set(EXAMPLES)


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_example_configs_are_valid(capsys, name):
    module_name, prefix = EXAMPLES[name]
    module = importlib.import_module(module_name)
    path = REPO / "examples" / f"{name}.yaml"
    merged = printed_config(capsys, lambda argv: module.main([*prefix, *argv]), [str(path)])
    for key, value in yaml.safe_load(path.read_text()).items():
        expected = ",".join(value) if isinstance(value, list) else value
        assert merged[key] == expected or str(merged[key]) == str(expected), (key, merged[key], expected)


def test_example_sft_yaml_means_the_same_as_run_sft_sh():
    import re
    import shlex
    from dataclasses import fields

    from zhtrain.sft import parse_sft_args

    text = (REPO / "examples" / "run_sft.sh").read_text()
    variables = dict(re.findall(r"^(\w+)=(\S+)$", text, flags=re.M), RANDOM="42")
    command = re.sub(
        r"\$\{?(\w+)\}?", lambda m: variables[m.group(1)], text[text.index("torchrun") :].replace("\\\n", " ")
    )
    argv = shlex.split(command)
    from_script = parse_sft_args(argv[argv.index("zhtrain.sft") + 1 :])
    from_yaml = parse_sft_args([str(REPO / "examples" / "sft.yaml"), "--seed", "42"])
    for script_group, yaml_group in zip(from_script, from_yaml):
        differing = {
            f.name
            for f in fields(script_group)
            if f.init and getattr(script_group, f.name) != getattr(yaml_group, f.name)
        }
        assert differing <= {"overwrite_output_dir"}, differing
