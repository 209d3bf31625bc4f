"""`zhtrain demo`'s own logic (no model): flags, data slices, the report, its conversations and tokenizer step."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import chinese_lines, write_corpus

from zhtrain import demo
from zhtrain.errors import ZhtrainError
from zhtrain.sft import parse_sft_args


def test_demo_flags_defaults_and_mistakes():
    opts = demo.parse_demo_args([])
    assert (opts.output_dir, opts.max_steps) == (Path("runs/demo"), 40)
    opts = demo.parse_demo_args(["--max_steps", "3", "--train_lines", "50", "--output_dir", "x"])
    assert (opts.max_steps, opts.train_lines, opts.output_dir) == (3, 50, Path("x"))
    with pytest.raises(ZhtrainError, match="--max_steps 0: must be at least 1"):
        demo.parse_demo_args(["--max_steps", "0"])
    with pytest.raises(ZhtrainError, match="--learning_rate"):
        demo.parse_demo_args(["--learning_rate", "3"])


def test_demo_pretrain_flags_parse_as_run_pt_sh(tmp_path):
    from zhtrain.pretrain import parse_pretrain_args

    opts = demo.parse_demo_args(["--output_dir", str(tmp_path / "run"), "--max_steps", "7"])
    model_args, data_args, lora_args, training_args = parse_pretrain_args(demo.pretrain_flags(tmp_path, tmp_path, opts))
    assert lora_args.target_modules == ["q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]
    assert lora_args.modules_to_save_list == ["embed_tokens", "lm_head"]
    assert (lora_args.lora_rank, lora_args.lora_alpha, lora_args.lora_dropout) == (8, 32.0, 0.05)
    assert (training_args.max_steps, data_args.block_size) == (7, demo.BLOCK_SIZE)
    assert training_args.eval_on_start and training_args.do_eval and training_args.do_train


def test_write_train_text_takes_the_first_lines_and_replaces_an_old_slice(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("一\n\n二\n三\n四\n", encoding="utf-8")
    data = tmp_path / "data"
    demo.write_train_text(corpus, data, 2)
    demo.write_train_text(corpus, data, 3)
    files = sorted(data.glob("*.txt"))
    assert [f.name for f in files] == [f"{demo.TEXT_PREFIX}3.txt"]
    assert files[0].read_text(encoding="utf-8") == "一\n二\n三\n"
    demo.write_train_text(corpus, data, 100)  # more than there is: all of it, with a note
    assert sorted(data.glob("*.txt"))[0].name == f"{demo.TEXT_PREFIX}4.txt"


def test_first_eval_perplexity_reads_step_zero():
    history = [{"eval_perplexity": 24.0, "step": 0}, {"loss": 3.0, "step": 1}, {"eval_perplexity": 16.0, "step": 40}]
    assert demo.first_eval_perplexity(history) == 24.0
    with pytest.raises(ZhtrainError, match="before the first step"):
        demo.first_eval_perplexity(history[1:])


def test_report_prints_the_drop(capsys, tmp_path):
    demo.report(demo.DemoResult(40, 24.0, 16.0, 125.0, tmp_path / "pt_lora_model"))
    out = capsys.readouterr().out
    assert "24.00 before -> 16.00 after 40 steps (-8.00, -33.3%)" in out
    assert "2m05s" in out and "pt_lora_model/" in out


def test_demo_conversation_set_is_valid_chinese_and_its_sft_flags_parse(tmp_path):
    from zhtrain import demo
    from zhtrain.data.chat import load_conversations

    train, valid = demo.write_conversations(tmp_path / "data")
    train_convs, valid_convs = load_conversations([train]), load_conversations([valid])
    assert 20 <= len(train_convs) + len(valid_convs) <= 50 and len(valid_convs) >= 5
    assert {c.id for c in train_convs}.isdisjoint(c.id for c in valid_convs)
    assert any(len(c.messages) > 3 for c in train_convs)  # multi-turn and system prompts are in it
    replies = [m["content"] for c in train_convs for m in c.messages if m["role"] == "assistant"]
    assert all(re.search(r"[\u4e00-\u9fff]", r) for r in replies)
    opts = demo.parse_demo_args(["--output_dir", str(tmp_path / "run"), "--sft_steps", "5"])
    model_args, data_args, lora_args, training_args = parse_sft_args(demo.sft_flags(tmp_path, train, valid, opts))
    assert lora_args.use_lora and lora_args.peft_path == str(tmp_path / "run" / "pt_lora_model")
    assert data_args.template == "tokenizer" and training_args.max_steps == 5 and training_args.eval_on_start
    with pytest.raises(ZhtrainError, match="--sft_steps -1"):
        demo.parse_demo_args(["--sft_steps", "-1"])


def test_demo_extension_step_reports_tokens_per_character(bpe_dir, tmp_path):
    from zhtrain import demo

    data = tmp_path / "data"
    write_corpus(data / "news.txt", chinese_lines(600))
    opts = demo.DemoOptions(
        output_dir=tmp_path / "run", max_steps=1, train_lines=600, learning_rate=1e-3, eval_blocks=1, new_tokens=50
    )
    folder, measured = demo.extend_tokenizer(bpe_dir, data, opts)
    assert folder == tmp_path / "run" / "tokenizer" and (folder / "tokenizer.json").is_file()
    assert measured["lines"] == 12 and measured["extended"] < measured["base"]
    assert "--new_token_init" in demo.pretrain_flags(bpe_dir, data, opts, folder)
    assert demo.pretrain_flags(bpe_dir, data, opts, folder)[3] == str(folder)
