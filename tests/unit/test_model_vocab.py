"""The seed's four vocabulary modes, resizing, and how new embedding rows start (--new_token_init)."""

from __future__ import annotations

import pytest
import torch

from zhtrain.errors import ZhtrainError
from zhtrain.model.vocab import VOCAB_MODES, check_vocab_pair, resize_embeddings, subword_pieces, untie_embeddings


def tokenizers(base, new):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base)), AutoTokenizer.from_pretrained(str(new))


def load(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir))


@pytest.mark.parametrize("model_vocab, tokenizer_len", list(VOCAB_MODES))
def test_the_four_modes_are_accepted(model_vocab, tokenizer_len):
    assert check_vocab_pair(model_vocab, tokenizer_len) == VOCAB_MODES[(model_vocab, tokenizer_len)]


@pytest.mark.parametrize(
    "pair", [(32000, 49954), (49953, 32000), (49953, 49954), (49954, 49953), (32000, 32001), (40000, 49953)]
)
def test_other_pairs_in_the_llama_family_are_refused_naming_both_sizes(pair):
    model_vocab, tokenizer_len = pair
    with pytest.raises(ZhtrainError) as info:
        check_vocab_pair(model_vocab, tokenizer_len)
    message = str(info.value)
    assert f"model vocabulary {model_vocab}" in message and f"tokenizer of {tokenizer_len}" in message
    assert "32000 + tokenizer 49953" in message and "--custom_vocab" in message and "\n" not in message


def test_models_outside_the_table():
    assert "resized from 49152 to 60000" in check_vocab_pair(49152, 60000)
    assert "unchanged" in check_vocab_pair(49152, 49152)
    with pytest.raises(ZhtrainError, match="never shrinks"):
        check_vocab_pair(49152, 40000)
    assert "resized" in check_vocab_pair(32000, 40000, custom_vocab=True)


def test_resize_initialises_new_rows_with_the_mean(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    assert resize_embeddings(model, 410) == 10
    new_in, new_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert new_in.shape[0] == 410 and new_out.shape[0] == 410 and model.config.vocab_size == 410
    assert torch.equal(new_in[:400], old_in) and torch.equal(new_out[:400], old_out)
    assert torch.allclose(new_in[400:], old_in.mean(0).expand(10, -1))
    assert torch.allclose(new_out[400:], old_out.mean(0).expand(10, -1))
    assert resize_embeddings(model, 405) == 0  # never shrinks


def test_untie_gives_lm_head_its_own_copy(tied_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tied_model_dir))
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert untie_embeddings(model)
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    assert torch.equal(model.get_output_embeddings().weight, model.get_input_embeddings().weight)
    assert model.config.tie_word_embeddings is False
    assert not untie_embeddings(model)


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
