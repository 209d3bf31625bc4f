"""`zhtrain inspect`: the vocabulary mode, new rows, a sample's tokens per character and a LoRA run's cost."""

from __future__ import annotations

from helpers import chinese_lines, write_corpus

from zhtrain.build_tokenizer import main as tokenizer_main


def test_inspect_reports_mode_new_rows_sample_and_a_cost_that_peft_agrees_with(
    sp_tokenizer_dir, chinese_sp_model, tiny_model_dir, tmp_path, capsys
):
    import shutil

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from zhtrain.inspect import main as inspect_main

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    for item in sp_tokenizer_dir.iterdir():
        shutil.copy(item, model_dir / item.name)
    merged = tmp_path / "merged"
    tokenizer_main(
        [
            "merge",
            "--llama_tokenizer_dir",
            str(sp_tokenizer_dir),
            "--chinese_sp_model_file",
            str(chinese_sp_model),
            "--output_dir",
            str(merged),
        ]
    )
    sample = write_corpus(tmp_path / "sample.txt", chinese_lines(100, seed=9))
    capsys.readouterr()
    inspect_main(
        ["--model_name_or_path", str(model_dir), "--tokenizer_name_or_path", str(merged), "--sample", str(sample)]
    )
    out = capsys.readouterr().out
    from transformers import AutoTokenizer

    size = len(AutoTokenizer.from_pretrained(str(merged)))
    assert f"custom vocabulary: model resized from 400 to {size} tokens" in out
    assert "the first 400 ids are the model tokenizer's: this tokenizer extends it" in out
    assert (
        f"new rows  {size - 400:,}; --new_token_init subword_mean starts {size - 400:,} from their base pieces" in out
    )
    assert "100 lines of" in out and "tokens per character (the model's own tokenizer:" in out
    # The Stage-2 figure is what PEFT counts on the real (resized) model.
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    model.resize_token_embeddings(size)
    peft = get_peft_model(
        model,
        LoraConfig(
            r=8,
            target_modules=["q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "down_proj", "up_proj"],
            modules_to_save=["embed_tokens", "lm_head"],
        ),
    )
    trainable = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    assert f"{trainable:,} trainable of" in out


def test_inspect_says_why_no_mode_applies(sp_tokenizer_dir, tmp_path, capsys):
    from helpers import make_tiny_llama

    from zhtrain.inspect import main as inspect_main

    model_dir = make_tiny_llama(tmp_path / "big", vocab_size=500)
    inspect_main(["--model_name_or_path", str(model_dir), "--tokenizer_name_or_path", str(sp_tokenizer_dir)])
    assert "mode  none: tokenizer has 400 tokens but the model has 500 embedding rows" in capsys.readouterr().out
