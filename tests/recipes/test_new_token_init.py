"""New embedding rows (--new_token_init) and Stage 1 (--training_stage embeddings, --train_new_rows_only)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fixtures import chinese_lines, make_bpe_tokenizer, make_tiny_llama, write_corpus

from zhtrain.build_tokenizer import main as tokenizer_main
from zhtrain.errors import ZhtrainError
from zhtrain.model.vocab import resize_embeddings, subword_pieces


@pytest.fixture(scope="module")
def merged_dir(sp_tokenizer_dir, tmp_path_factory) -> Path:
    """The 400-piece LLaMA-layout fixture tokenizer + Chinese pieces (as Chinese-LLaMA's merge)."""
    folder = tmp_path_factory.mktemp("merged")
    corpus = write_corpus(folder / "zh.txt", chinese_lines(1500))
    tokenizer_main(["train", "--corpus", str(corpus), "--vocab_size", "300", "--output_dir", str(folder / "zh")])
    tokenizer_main(
        [
            "merge",
            "--llama_tokenizer_dir",
            str(sp_tokenizer_dir),
            "--chinese_sp_model_file",
            str(folder / "zh" / "chinese_sp.model"),
            "--output_dir",
            str(folder / "out"),
            "--add_pad_token",
        ]
    )
    return folder / "out"


@pytest.fixture(scope="module")
def model_with_tokenizer(tiny_model_dir, sp_tokenizer_dir, tmp_path_factory) -> Path:
    """The tiny model's folder with its own tokenizer in it, as real model folders are."""
    import shutil

    folder = tmp_path_factory.mktemp("llama") / "tiny"
    shutil.copytree(tiny_model_dir, folder)
    for item in sp_tokenizer_dir.iterdir():
        shutil.copy(item, folder / item.name)
    return folder


@pytest.fixture(scope="module")
def byte_level(tmp_path_factory):
    """A byte-level BPE base, its extension, and a tiny tied model of the base's size (SmolLM2's layout)."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("bytes")
    base = make_bpe_tokenizer(folder / "base")
    corpus = write_corpus(folder / "zh.txt", chinese_lines(800))
    tokenizer_main(
        [
            "extend",
            "--tokenizer_name_or_path",
            str(base),
            "--corpus",
            str(corpus),
            "--num_new_tokens",
            "60",
            "--output_dir",
            str(folder / "ext"),
        ]
    )
    size = len(AutoTokenizer.from_pretrained(str(base)))
    model_dir = make_tiny_llama(folder / "model", vocab_size=size, tie=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model_dir / name).write_bytes((base / name).read_bytes())
    return base, folder / "ext", model_dir


def tokenizers(base: Path, new: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base)), AutoTokenizer.from_pretrained(str(new))


def load(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir))


def test_subword_pieces_spell_each_new_sentencepiece_token(sp_tokenizer_dir, merged_dir):
    base, new = tokenizers(sp_tokenizer_dir, merged_dir)
    pieces = subword_pieces(new, base, len(base), len(new))
    assert len(pieces) == len(new) - len(base)
    for offset, ids in enumerate(pieces[:-1]):  # all but [PAD]: base pieces (bytes included) spell the new piece
        token = new.convert_ids_to_tokens(len(base) + offset)
        assert ids and base.convert_tokens_to_string(base.convert_ids_to_tokens(ids)) == new.convert_tokens_to_string(
            [token]
        )
    assert pieces[-1] == []  # [PAD] is special: no spelling, it starts at the mean
    huanghe = new.convert_tokens_to_ids("黄河")
    assert huanghe >= len(base) and len(pieces[huanghe - len(base)]) >= 2


def test_subword_mean_sets_both_matrices_to_the_mean_of_the_pieces(sp_tokenizer_dir, merged_dir, tiny_model_dir):
    base, new = tokenizers(sp_tokenizer_dir, merged_dir)
    model = load(tiny_model_dir)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    added = resize_embeddings(model, len(new), init="subword_mean", tokenizer=new, base_tokenizer=base)
    assert added == len(new) - 400
    pieces = subword_pieces(new, base, 400, len(new))
    for matrix, old in ((model.get_input_embeddings().weight, old_in), (model.get_output_embeddings().weight, old_out)):
        assert torch.equal(matrix[:400], old)
        for offset, ids in enumerate(pieces):
            expected = old[ids].mean(0) if ids else old.mean(0)
            assert torch.allclose(matrix[400 + offset], expected, atol=1e-6)
    rows = model.get_input_embeddings().weight[400:-1]
    assert len({tuple(r.tolist()) for r in rows}) > 0.9 * len(rows)  # distinct rows, not one average


def test_subword_mean_on_a_tied_byte_level_model(byte_level):
    base_dir, ext_dir, model_dir = byte_level
    base, new = tokenizers(base_dir, ext_dir)
    model = load(model_dir)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    old = model.get_input_embeddings().weight.detach().clone()
    resize_embeddings(model, len(new), init="subword_mean", tokenizer=new, base_tokenizer=base)
    weight = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is weight  # still tied, written once
    for index in range(len(base), len(new)):
        ids = [p.id for p in base.backend_tokenizer.model.tokenize(new.convert_ids_to_tokens(index))]
        assert len(ids) >= 2 and torch.allclose(weight[index], old[ids].mean(0), atol=1e-6)


def test_mean_and_random_inits(tiny_model_dir):
    model = load(tiny_model_dir)
    old = model.get_input_embeddings().weight.detach().clone()
    resize_embeddings(model, 420, init="mean")
    assert torch.allclose(model.get_input_embeddings().weight[400:], old.mean(0).expand(20, -1))
    model = load(tiny_model_dir)
    resize_embeddings(model, 420, init="random")
    new = model.get_input_embeddings().weight[400:]
    assert not torch.allclose(new, old.mean(0).expand(20, -1)) and not torch.allclose(new[0], new[1])
    with pytest.raises(
        ZhtrainError, match="--new_token_init zeros: unknown; choose one of subword_mean, contextual, mean, random"
    ):
        resize_embeddings(model, 430, init="zeros")


def test_subword_mean_without_a_base_tokenizer_falls_back_to_the_mean(tiny_model_dir, caplog):
    model = load(tiny_model_dir)
    old = model.get_input_embeddings().weight.detach().clone()
    resize_embeddings(model, 410, init="subword_mean")
    assert torch.allclose(model.get_input_embeddings().weight[400:], old.mean(0).expand(10, -1))
    assert "needs the model's own tokenizer" in caplog.text


def hidden_state_of(model, ids: list[int], layer: int) -> torch.Tensor:
    """One sequence, no batching or padding: the reference for the batched code."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[layer][0, -1]


def test_contextual_rows_come_from_the_models_hidden_states(sp_tokenizer_dir, merged_dir, tiny_model_dir):
    from zhtrain.model.contextual_init import TEMPERATURE, TOP, candidate_old_tokens, hidden_layer

    base, new = tokenizers(sp_tokenizer_dir, merged_dir)
    model = load(tiny_model_dir).train()
    reference = load(tiny_model_dir).eval()
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    resize_embeddings(model, len(new), init="contextual", tokenizer=new, base_tokenizer=base)
    weight_in, weight_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert torch.equal(weight_in[:400], old_in) and torch.equal(weight_out[:400], old_out)
    assert model.training  # put in eval mode for the forwards, then given back
    pieces = subword_pieces(new, base, 400, len(new))
    layer = hidden_layer(model)
    candidates = candidate_old_tokens(new, base, 400, len(new))
    assert candidates and all(any(ord(c) > 127 and c.isalpha() for c in base.decode([i])) for i in candidates)
    old_states = torch.stack([hidden_state_of(reference, [base.bos_token_id, i], layer) for i in candidates])
    huanghe = new.convert_tokens_to_ids("黄河") - 400
    for offset in (0, huanghe, len(pieces) - 2):
        state = hidden_state_of(reference, [base.bos_token_id, *pieces[offset]], layer)
        assert torch.allclose(weight_in[400 + offset], state, atol=1e-5)
        cosine = torch.nn.functional.cosine_similarity(old_states, state.unsqueeze(0), dim=1)
        nearest = cosine.topk(min(TOP, len(candidates)))
        mix = (
            torch.softmax(nearest.values / TEMPERATURE, 0).unsqueeze(1)
            * old_out[[candidates[i] for i in nearest.indices]]
        ).sum(0)
        assert torch.allclose(weight_out[400 + offset], mix, atol=1e-5)
    assert pieces[-1] == [] and torch.allclose(weight_in[-1], old_in.mean(0), atol=1e-6)  # [PAD]: no spelling, the mean


def test_contextual_states_stop_at_their_layer(tiny_model_dir):
    from zhtrain.model.contextual_init import last_hidden_states

    model = load(tiny_model_dir).eval()
    layers = model.get_decoder().layers
    assert len(layers) >= 2
    ran_last = []
    handle = layers[-1].register_forward_hook(lambda *args: ran_last.append(1))
    spellings = [[5, 9, 7], [11], [4, 30]]
    with torch.no_grad():
        states = last_hidden_states(model, 1, spellings, 1)
    handle.remove()
    assert not ran_last, "the layers after the state read do not run"
    for row, ids in zip(states, spellings):
        assert torch.allclose(row, hidden_state_of(model, [1, *ids], 1), atol=1e-5)
    with torch.no_grad():  # the embeddings' state (0) and the last layer's: whole forwards
        assert torch.allclose(
            last_hidden_states(model, 1, spellings[:1], 0)[0], hidden_state_of(model, [1, 5, 9, 7], 0)
        )


def test_contextual_mixes_letters_not_punctuation(sp_tokenizer_dir, merged_dir):
    from zhtrain.model.contextual_init import candidate_old_tokens

    base, new = tokenizers(sp_tokenizer_dir, merged_dir)
    new.add_tokens(["黄河。"])
    texts = [base.decode([i]) for i in candidate_old_tokens(new, base, 400, len(new))]
    assert "黄" in texts and "河" in texts and "。" not in texts and not any(t.endswith("。") for t in texts)


def test_contextual_on_tied_embeddings_falls_back_to_subword_mean(byte_level, caplog):
    base_dir, ext_dir, model_dir = byte_level
    base, new = tokenizers(base_dir, ext_dir)
    model, expected = load(model_dir), load(model_dir)
    resize_embeddings(model, len(new), init="contextual", tokenizer=new, base_tokenizer=base)
    resize_embeddings(expected, len(new), init="subword_mean", tokenizer=new, base_tokenizer=base)
    assert "needs separate embed_tokens and lm_head" in caplog.text
    assert torch.equal(model.get_input_embeddings().weight, expected.get_input_embeddings().weight)


# ---------------------------------------------------------------------------------------------
# Through `zhtrain pretrain`: the default init, Stage 1, new rows only


def pretrain_argv(model_dir, tokenizer_dir, data_dir, out, *extra):
    return [
        "--model_name_or_path",
        str(model_dir),
        "--tokenizer_name_or_path",
        str(tokenizer_dir),
        "--custom_vocab",
        "--dataset_dir",
        str(data_dir),
        "--data_cache_dir",
        str(out.parent / "cache"),
        "--output_dir",
        str(out),
        "--block_size",
        "32",
        "--per_device_train_batch_size",
        "2",
        "--learning_rate",
        "1e-2",
        "--weight_decay",
        "0.01",
        "--do_train",
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--seed",
        "1",
        "--validation_split_percentage",
        "0",
        "--lora_rank",
        "4",
        "--lora_alpha",
        "8",
        "--trainable",
        "q_proj,v_proj",
        "--disable_tqdm",
        "True",
        *extra,
    ]


def run_pretrain(argv):
    from zhtrain.pretrain import parse_pretrain_args, pretrain

    return pretrain(*parse_pretrain_args(argv))


def adapter_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def embedding(weights: dict, name: str) -> torch.Tensor:
    return next(t for k, t in weights.items() if name in k)


@pytest.mark.slow
def test_stage1_trains_only_embeddings_and_saves_a_loadable_adapter(
    sp_tokenizer_dir, merged_dir, tiny_model_dir, text_dir, tmp_path
):
    from peft import PeftModel

    out = tmp_path / "stage1"
    result = run_pretrain(
        pretrain_argv(tiny_model_dir, merged_dir, text_dir, out, "--training_stage", "embeddings", "--max_steps", "3")
    )
    model = result.trainer.model
    # (by identity: PEFT's frozen originals may share the trained tensors, see model.share_trained_copies)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    copies = {
        id(p)
        for n, p in model.named_parameters(remove_duplicate=False)
        if "modules_to_save" in n and ("embed_tokens" in n or "lm_head" in n)
    }
    assert trainable and trainable == copies
    base = load(tiny_model_dir)
    base_state = base.state_dict()
    for name, param in model.get_base_model().named_parameters():  # the transformer is untouched
        if "layers." in name and "lora_" not in name:
            assert torch.equal(param, base_state[name.replace("base_layer.", "")])
        if "lora_B" in name:
            assert not param.any()  # the LoRA is exactly zero
    weights = adapter_weights(out / "pt_lora_model")
    trained_embed = embedding(weights, "embed_tokens")
    assert trained_embed.shape[0] == len(tokenizers(sp_tokenizer_dir, merged_dir)[1])
    assert not torch.equal(trained_embed[:400], base.get_input_embeddings().weight)  # all rows trained
    config = json.loads((out / "pt_lora_model" / "adapter_config.json").read_text())
    assert sorted(config["modules_to_save"]) == ["embed_tokens", "lm_head"]
    # Reloads on the resized base and gives the trained model's logits.
    fresh = load(tiny_model_dir)
    fresh.resize_token_embeddings(trained_embed.shape[0])
    reloaded = PeftModel.from_pretrained(fresh, str(out / "pt_lora_model")).eval()
    ids = torch.tensor([[1, 5, 420, 430, 7]])
    model.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, model(ids).logits, atol=1e-5)


@pytest.mark.slow
def test_train_new_rows_only_keeps_the_model_rows_bit_identical(
    sp_tokenizer_dir, merged_dir, model_with_tokenizer, text_dir, tmp_path
):
    out = tmp_path / "new_rows"
    argv = pretrain_argv(
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


def test_stage_flags_are_checked(tiny_model_dir, sp_tokenizer_dir, text_dir, tmp_path):
    with pytest.raises(ZhtrainError, match="--train_new_rows_only applies to Stage 1"):
        run_pretrain(
            pretrain_argv(
                tiny_model_dir, sp_tokenizer_dir, text_dir, tmp_path / "a", "--train_new_rows_only", "--max_steps", "1"
            )
        )
    with pytest.raises(
        ZhtrainError, match=r"--train_new_rows_only: the tokenizer \(400 tokens\) adds no rows to the model \(400\)"
    ):
        run_pretrain(
            pretrain_argv(
                tiny_model_dir,
                sp_tokenizer_dir,
                text_dir,
                tmp_path / "b",
                "--training_stage",
                "embeddings",
                "--train_new_rows_only",
                "--max_steps",
                "1",
            )
        )


@pytest.mark.slow
def test_pretrain_starts_new_rows_from_their_pieces_by_default(byte_level, text_dir, tmp_path, capsys):
    base_dir, ext_dir, model_dir = byte_level
    out = tmp_path / "default"
    run_pretrain(
        pretrain_argv(
            model_dir, ext_dir, text_dir, out, "--modules_to_save", "embed_tokens,lm_head", "--max_steps", "1"
        )
    )
    assert "new rows: subword_mean init, 60 of 60 from base pieces" in capsys.readouterr().out


@pytest.mark.slow
def test_pretrain_unties_then_starts_new_rows_contextually(byte_level, text_dir, tmp_path, capsys):
    """SmolLM2's layout (tied): training both matrices unties them first, so contextual can run."""
    base_dir, ext_dir, model_dir = byte_level
    out = tmp_path / "contextual"
    result = run_pretrain(
        pretrain_argv(
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


@pytest.mark.slow
def test_subword_mean_under_deepspeed_zero3(sp_tokenizer_dir, merged_dir, tiny_model_dir):
    """Partitioned weights have 0 local rows: sizes come from ds_shape and rows are written gathered."""
    import socket
    import subprocess
    import sys

    pytest.importorskip("deepspeed")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    worker = Path(__file__).parents[1] / "workers" / "zero3_init_worker.py"
    result = subprocess.run(
        [sys.executable, str(worker), str(sp_tokenizer_dir), str(merged_dir), str(tiny_model_dir), str(port)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0 and "ZERO3_OK" in result.stdout, result.stdout[-2000:] + result.stderr[-3000:]


@pytest.mark.slow
def test_sft_grows_the_vocabulary_with_the_chosen_init(byte_level, tmp_path):
    """`zhtrain sft` with a larger tokenizer starts the new rows as --new_token_init says (default subword_mean)."""
    from sft_fixtures import write_alpaca

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
