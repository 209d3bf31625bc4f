"""`zhtrain generate`: the seed's inference_hf.py flags and defaults, templates, files, interactive, errors."""

from __future__ import annotations

import json

import pytest
from helpers import load_model, make_adapter

from zhtrain.errors import ZhtrainError
from zhtrain.generate import SAMPLING_DEFAULTS, generate, parse_generate_args
from zhtrain.merge import merge, parse_merge_args

GREEDY = ["--no-do_sample", "--max_new_tokens", "6", "--only_cpu"]


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model_dir, sp_tokenizer_dir):
    root = tmp_path_factory.mktemp("generate")
    adapter = make_adapter(load_model(tiny_model_dir), root / "pt_lora_model", sp_tokenizer_dir)
    merged = root / "merged"
    merge(
        parse_merge_args(
            [
                "--base_model",
                str(tiny_model_dir),
                "--lora_model",
                str(adapter),
                "--output_dir",
                str(merged),
                "--no-verify",
            ]
        )
    )
    data = root / "questions.txt"
    data.write_text("白日依山尽\n\n黄河入海流\n", encoding="utf-8")
    return {"root": root, "base": tiny_model_dir, "adapter": adapter, "merged": merged, "data": data}


def run(*argv):
    return generate(parse_generate_args([str(a) for a in argv]))


def test_flags_and_sampling_defaults_are_the_seeds():
    opts = parse_generate_args(["--base_model", "m"])
    assert opts.sampling == dict(
        temperature=0.2, top_k=40, top_p=0.9, do_sample=True, num_beams=1, repetition_penalty=1.1, max_new_tokens=400
    )
    assert opts.sampling == SAMPLING_DEFAULTS and opts.predictions_file == "./predictions.json" and opts.gpus is None
    opts = parse_generate_args(
        [
            "--base_model",
            "m",
            "--lora_model",
            "a,b",
            "--temperature",
            "0.7",
            "--no-do_sample",
            "--with_prompt",
            "--interactive",
            "--only_cpu",
            "--tokenizer_path",
            "t",
            "--data_file",
            "d",
            "--template",
            "alpaca",
        ]
    )
    assert opts.lora_model == ["a", "b"] and opts.sampling["temperature"] == 0.7 and opts.sampling["do_sample"] is False
    assert opts.with_prompt and opts.interactive and opts.only_cpu and opts.tokenizer_path == "t"


def test_predictions_file_is_the_seeds(models, tmp_path):
    results = run(
        "--base_model",
        models["merged"],
        "--data_file",
        models["data"],
        "--predictions_file",
        tmp_path / "a" / "p.json",
        *GREEDY,
    )
    assert len(results) == 2 and all(isinstance(r["Output"], str) for r in results)  # blank lines are skipped
    saved = json.loads((tmp_path / "a" / "p.json").read_text(encoding="utf-8"))
    assert saved == results and "白日依山尽" in saved[0]["Input"]
    settings = json.loads((tmp_path / "a" / "p.generation_config.json").read_text())
    assert settings["max_new_tokens"] == 6 and settings["repetition_penalty"] == 1.1


def test_lora_model_runs_the_base_with_the_adapter(models):
    """--lora_model gives the merged model's logits (greedy texts could differ on a near-tie, logits cannot)."""
    import torch

    from zhtrain.generate import load_model

    layered = load_model(
        parse_generate_args(["--base_model", str(models["base"]), "--lora_model", str(models["adapter"])]), 400, "cpu"
    )
    ids = torch.randint(0, 400, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = layered(input_ids=ids).logits
        merged = load_model_dir(models["merged"])(input_ids=ids).logits
        base = load_model_dir(models["base"])(input_ids=ids).logits
    assert (got - merged).abs().max() <= 1e-4 and (got - base).abs().max() > 1e-2


def load_model_dir(folder):
    return load_model(folder).eval()


def test_with_prompt_uses_the_template_table(models, tmp_path):
    from zhtrain.data.templates import get_template, save_template
    from zhtrain.tokenizer.loading import load_tokenizer

    tokenizer = load_tokenizer(str(models["merged"]))  # what generate uses: sentencepiece for a LLaMA folder
    out = run(
        "--base_model",
        models["merged"],
        "--data_file",
        models["data"],
        "--with_prompt",
        "--template",
        "alpaca",
        "--predictions_file",
        tmp_path / "p.json",
        *GREEDY,
    )
    expected = get_template("alpaca").encode_prompt(tokenizer, "白日依山尽")
    assert out[0]["Input"] == tokenizer.decode(expected) and "### Instruction:" in out[0]["Input"]
    # The template saved with the model (by zhtrain sft, carried over by zhtrain merge) is the default.
    save_template(models["merged"], "vicuna_v1.1")
    try:
        out = run(
            "--base_model",
            models["merged"],
            "--data_file",
            models["data"],
            "--with_prompt",
            "--predictions_file",
            tmp_path / "q.json",
            *GREEDY,
        )
    finally:
        (models["merged"] / "zhtrain_template.json").unlink()
    assert "USER: 白日依山尽 ASSISTANT:" in out[0]["Input"]


def test_interactive_reads_until_an_empty_line(models, capsys):
    lines = iter(["黄河", "入海流", ""])
    results = generate(
        parse_generate_args(
            [
                "--base_model",
                str(models["merged"]),
                "--interactive",
                "--seed",
                "0",
                "--max_new_tokens",
                "4",
                "--only_cpu",
            ]
        ),
        read_line=lambda prompt: next(lines),
    )
    assert len(results) == 2
    assert capsys.readouterr().out.count("Response:") == 2


def test_bad_inputs(models, tmp_path):
    with pytest.raises(ZhtrainError, match="--data_file .*missing.txt: no such file"):
        run("--base_model", models["merged"], "--data_file", tmp_path / "missing.txt", *GREEDY)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ZhtrainError, match="no instructions"):
        run("--base_model", models["merged"], "--data_file", empty, *GREEDY)
    with pytest.raises(ZhtrainError, match="--template nope: unknown template"):
        run(
            "--base_model",
            models["merged"],
            "--data_file",
            models["data"],
            "--with_prompt",
            "--template",
            "nope",
            *GREEDY,
        )
    with pytest.raises(ZhtrainError, match="LoRA adapter, not a model"):
        run("--base_model", models["adapter"], "--data_file", models["data"], *GREEDY)
    with pytest.raises(ZhtrainError, match="--max_new_tokens 0"):
        parse_generate_args(["--base_model", "m", "--max_new_tokens", "0"])


def test_generation_stops_at_the_end_of_the_context(models, tmp_path, caplog):
    """A prompt a few positions short of the context: --max_new_tokens is cut to what fits (past the
    trained context the model's output is noise), with a warning; a prompt as long as the context is refused."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(models["merged"]))
    line = "黄河入海流" * 200
    ids = tokenizer(line).input_ids
    while len(ids) > 250:  # 250 tokens of a 256-position model
        line = line[:-1]
        ids = tokenizer(line).input_ids
    data = tmp_path / "long.txt"
    data.write_text(line + "\n", encoding="utf-8")
    with caplog.at_level("WARNING", logger="zhtrain.generate"):
        results = run(
            "--base_model",
            models["merged"],
            "--data_file",
            data,
            "--predictions_file",
            tmp_path / "p.json",
            "--no-do_sample",
            "--max_new_tokens",
            "40",
            "--repetition_penalty",
            "1.0",
            "--only_cpu",
        )
    import re

    found = re.search(r"prompt of (\d+) tokens: --max_new_tokens 40 cut to (\d+)", caplog.text)
    assert found and int(found.group(1)) >= 250 and int(found.group(2)) == 256 - int(found.group(1)), caplog.text
    assert (
        len(tokenizer(results[0]["Output"], add_special_tokens=False).input_ids) <= int(found.group(2)) + 2
    )  # re-tokenizing may merge/split
    data.write_text("黄河入海流" * 200 + "\n", encoding="utf-8")
    with pytest.raises(
        ZhtrainError, match=r"long.txt, instruction 1 .*the prompt is \d+ tokens, the model's context 256 positions"
    ):
        run("--base_model", models["merged"], "--data_file", data, "--predictions_file", tmp_path / "q.json", *GREEDY)
    assert not (tmp_path / "q.json").exists()


def test_sampling_flags_out_of_range_are_one_line_errors():
    for flags, message in [
        (["--temperature", "0"], "--temperature 0.0: must be positive"),
        (["--top_p", "2"], "--top_p 2.0: must be in"),
        (["--top_k", "-1"], "--top_k -1"),
        (["--num_beams", "0"], "--num_beams 0"),
        (["--repetition_penalty", "0"], "--repetition_penalty 0.0"),
        (["--lora_model", "a,./a"], "given twice"),
    ]:
        with pytest.raises(ZhtrainError, match=message):
            parse_generate_args(["--base_model", "m", *flags])
    assert (
        parse_generate_args(["--base_model", "m", "--temperature", "0", "--no-do_sample"]).sampling["temperature"] == 0
    )  # greedy: unused


def test_alpha_stretches_rope_as_the_seed_did(models, tmp_path):
    """--alpha N: rope base x N^(d/(d-2)) (the seed's NTK patch, here a config change); 'auto': dynamic NTK."""
    import torch

    from zhtrain.generate import AUTO_NTK_FACTOR, load_model

    def loaded(*extra):
        return load_model(
            parse_generate_args(["--base_model", str(models["merged"]), "--only_cpu", *extra]), 400, "cpu"
        )

    plain, stretched, auto = loaded(), loaded("--alpha", "2"), loaded("--alpha", "auto")
    config = plain.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    theta = config.rope_parameters["rope_theta"]
    assert stretched.config.rope_parameters["rope_theta"] == pytest.approx(theta * 2 ** (head_dim / (head_dim - 2)))
    assert (
        auto.config.rope_parameters["rope_type"] == "dynamic"
        and auto.config.rope_parameters["factor"] == AUTO_NTK_FACTOR
    )
    ids = torch.arange(1, 40)[None]
    with torch.no_grad():
        a, b = plain(input_ids=ids).logits, stretched(input_ids=ids).logits
    assert torch.equal(a[:, 0], b[:, 0]) and not torch.allclose(a[:, 5:], b[:, 5:])  # position 0 has no rotation
    results = run(
        "--base_model",
        models["merged"],
        "--data_file",
        models["data"],
        "--alpha",
        "auto",
        "--predictions_file",
        tmp_path / "p.json",
        *GREEDY,
    )
    assert len(results) == 2


def test_alpha_and_8bit_bad_values(models):
    for bad in ("0", "-1", "big"):
        with pytest.raises(ZhtrainError, match=f"--alpha {bad}: must be a positive number"):
            run("--base_model", models["merged"], "--data_file", models["data"], "--alpha", bad, *GREEDY)
    with pytest.raises(ZhtrainError, match="--load_in_8bit needs a CUDA GPU"):
        run("--base_model", models["merged"], "--data_file", models["data"], "--load_in_8bit", *GREEDY)
