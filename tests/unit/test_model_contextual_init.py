"""--new_token_init contextual: new rows from the model's hidden states over their pieces."""

from __future__ import annotations

import torch

from zhtrain.model.vocab import resize_embeddings, subword_pieces


def tokenizers(base, new):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base)), AutoTokenizer.from_pretrained(str(new))


def load(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir))


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
