"""New embedding rows (--new_token_init) and Stage 1 (--training_stage embeddings, --train_new_rows_only), through
`zhtrain pretrain` and `zhtrain sft`. ONE Stage-1 run serves the assertions on what it trained, kept and saved."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from helpers import adapter_weights, embedding, make_text_dir, new_rows_flags, run_pretrain, write_alpaca
from helpers import model_with_tokenizer as model_with_tokenizer_folder

from zhtrain.model.vocab import resize_embeddings


def tokenizers(base, new):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base)), AutoTokenizer.from_pretrained(str(new))


def load(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir))


@pytest.fixture(scope="module")
def model_with_tokenizer(tiny_model_dir, sp_tokenizer_dir, tmp_path_factory):
    """The tiny model's folder with its own tokenizer in it, as real model folders are."""
    return model_with_tokenizer_folder(tiny_model_dir, sp_tokenizer_dir, tmp_path_factory.mktemp("llama") / "tiny")


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, merged_dir, tiny_model_dir):
    root = tmp_path_factory.mktemp("stage1")
    data = make_text_dir(root / "corpus")
    out = root / "stage1"
    result = run_pretrain(
        new_rows_flags(tiny_model_dir, merged_dir, data, out, "--training_stage", "embeddings", "--max_steps", "3")
    )
    return SimpleNamespace(out=out, result=result, model=result.trainer.model)


def test_stage1_trains_only_the_embedding_matrices(stage1):
    model = stage1.model
    # (by identity: PEFT's frozen originals may share the trained tensors, see model.share_trained_copies)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    copies = {
        id(p)
        for n, p in model.named_parameters(remove_duplicate=False)
        if "modules_to_save" in n and ("embed_tokens" in n or "lm_head" in n)
    }
    assert trainable and trainable == copies


def test_stage1_leaves_the_transformer_untouched_and_the_lora_zero(stage1, tiny_model_dir):
    base_state = load(tiny_model_dir).state_dict()
    for name, param in stage1.model.get_base_model().named_parameters():  # the transformer is untouched
        if "layers." in name and "lora_" not in name:
            assert torch.equal(param, base_state[name.replace("base_layer.", "")])
        if "lora_B" in name:
            assert not param.any()  # the LoRA is exactly zero


def test_stage1_adapter_holds_every_row_trained(stage1, sp_tokenizer_dir, merged_dir, tiny_model_dir):
    weights = adapter_weights(stage1.out / "pt_lora_model")
    trained_embed = embedding(weights, "embed_tokens")
    assert trained_embed.shape[0] == len(tokenizers(sp_tokenizer_dir, merged_dir)[1])
    assert not torch.equal(trained_embed[:400], load(tiny_model_dir).get_input_embeddings().weight)  # all rows trained
    config = json.loads((stage1.out / "pt_lora_model" / "adapter_config.json").read_text())
    assert sorted(config["modules_to_save"]) == ["embed_tokens", "lm_head"]


def test_stage1_adapter_reloads_on_the_resized_base(stage1, tiny_model_dir):
    """Reloads on the resized base and gives the trained model's logits."""
    from peft import PeftModel

    model = stage1.model
    trained_embed = embedding(adapter_weights(stage1.out / "pt_lora_model"), "embed_tokens")
    fresh = load(tiny_model_dir)
    fresh.resize_token_embeddings(trained_embed.shape[0])
    reloaded = PeftModel.from_pretrained(fresh, str(stage1.out / "pt_lora_model")).eval()
    ids = torch.tensor([[1, 5, 420, 430, 7]])
    model.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, model(ids).logits, atol=1e-5)


def test_train_new_rows_only_keeps_the_model_rows_bit_identical(
    sp_tokenizer_dir, merged_dir, model_with_tokenizer, text_dir, tmp_path
):
    out = tmp_path / "new_rows"
    argv = new_rows_flags(
        model_with_tokenizer,
        merged_dir,
        text_dir,
        out,
        "--training_stage",
        "embeddings",
        "--train_new_rows_only",
        "--max_steps",
        "3",
    )
    result = run_pretrain(argv)
    assert result.trainer.args.weight_decay == 0  # decoupled decay would move the frozen rows
    base, new = tokenizers(sp_tokenizer_dir, merged_dir)
    fresh = load(model_with_tokenizer)
    resize_embeddings(fresh, len(new), init="subword_mean", tokenizer=new, base_tokenizer=base)
    weights = adapter_weights(out / "pt_lora_model")
    for name, start in (
        ("embed_tokens", fresh.get_input_embeddings().weight),
        ("lm_head", fresh.get_output_embeddings().weight),
    ):
        trained = embedding(weights, name)
        assert torch.equal(trained[:400], start[:400])  # the model's own rows: bit-identical
        assert not torch.allclose(trained[400:], start[400:])  # the new rows learned
    assert result.metrics["trainable_parameters"] > 0


def test_pretrain_starts_new_rows_from_their_pieces_by_default(byte_level, text_dir, tmp_path, capsys):
    base_dir, ext_dir, model_dir = byte_level
    out = tmp_path / "default"
    run_pretrain(
        new_rows_flags(
            model_dir, ext_dir, text_dir, out, "--modules_to_save", "embed_tokens,lm_head", "--max_steps", "1"
        )
    )
    assert "new rows: subword_mean init, 60 of 60 from base pieces" in capsys.readouterr().out


def test_pretrain_unties_then_starts_new_rows_contextually(byte_level, text_dir, tmp_path, capsys):
    """SmolLM2's layout (tied): training both matrices unties them first, so contextual can run."""
    base_dir, ext_dir, model_dir = byte_level
    out = tmp_path / "contextual"
    result = run_pretrain(
        new_rows_flags(
            model_dir,
            ext_dir,
            text_dir,
            out,
            "--modules_to_save",
            "embed_tokens,lm_head",
            "--max_steps",
            "1",
            "--learning_rate",
            "0",
            "--new_token_init",
            "contextual",
        )
    )
    assert "new rows: contextual init, 60 of 60 from base pieces" in capsys.readouterr().out
    model = result.trainer.model
    size = len(tokenizers(base_dir, ext_dir)[0])
    new_in = model.get_input_embeddings().weight[size:]
    new_out = model.get_output_embeddings().weight[size:]
    assert not torch.allclose(new_in, new_out)  # untied before the rows were written: each has its own


def test_sft_grows_the_vocabulary_with_the_chosen_init(byte_level, tmp_path):
    """`zhtrain sft` with a larger tokenizer starts the new rows as --new_token_init says (default subword_mean)."""
    from zhtrain.sft import parse_sft_args, sft

    base_dir, ext_dir, model_dir = byte_level
    data = write_alpaca(tmp_path / "a.json", n=4)

    def rows_after_sft(*extra):
        out = tmp_path / f"out{len(extra)}"
        result = sft(
            *parse_sft_args(
                [
                    "--model_name_or_path",
                    str(model_dir),
                    "--tokenizer_name_or_path",
                    str(ext_dir),
                    "--output_dir",
                    str(out),
                    "--data_path",
                    str(data),
                    "--template",
                    "alpaca",
                    "--max_steps",
                    "1",
                    "--learning_rate",
                    "0",
                    "--do_train",
                    "--per_device_train_batch_size",
                    "1",
                    "--save_strategy",
                    "no",
                    "--report_to",
                    "none",
                    "--disable_tqdm",
                    "True",
                    "--lora_rank",
                    "4",
                    "--lora_alpha",
                    "8",
                    "--trainable",
                    "q_proj,v_proj",
                    "--modules_to_save",
                    "embed_tokens,lm_head",
                    "--model_max_length",
                    "256",
                    *extra,
                ]
            )
        )
        return result.trainer.model.get_input_embeddings().weight.detach().clone()

    expected = load(model_dir)
    base, new = tokenizers(base_dir, ext_dir)
    resize_embeddings(expected, len(new), init="subword_mean", tokenizer=new, base_tokenizer=base)
    size = len(base)
    assert torch.allclose(rows_after_sft()[size:], expected.get_input_embeddings().weight[size:], atol=1e-6)
    mean_rows = rows_after_sft("--new_token_init", "mean")[size:]
    assert torch.allclose(
        mean_rows, load(model_dir).get_input_embeddings().weight.mean(0).expand_as(mean_rows), atol=1e-6
    )
