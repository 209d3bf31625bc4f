"""The seed's four vocabulary modes, the errors outside them, and resizing."""

from __future__ import annotations

import pytest
import torch

from zhtrain.errors import ZhtrainError
from zhtrain.model.vocab import VOCAB_MODES, check_vocab_pair, resize_embeddings, untie_embeddings


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
