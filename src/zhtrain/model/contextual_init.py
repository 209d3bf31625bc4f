"""`--new_token_init contextual`: new embedding rows from what the base model computes, not only
from its embedding tables.

`subword_mean` starts "黄河" at the mean of the rows of its base pieces. A model that spells a Chinese
character as two or three byte tokens reads and predicts it across several positions, and one
averaged row does both badly. This init asks the model itself:

- input row: the hidden state after a quarter of the layers at the last piece of `[BOS] + pieces`,
  i.e. what the model has made of the spelling by then, given to the first layer in one position;
- output row: a mix of the output rows of the base tokens that the new vocabulary's own (non-ASCII)
  letters appear in (for Chinese: the base's CJK tokens), each weighted by softmax(cosine / 0.05) between
  its hidden state (read alone, same layer) and the new token's, over its 20 nearest.

It costs a quarter of a forward pass of the model (the layers up to the state read) per new token and
per candidate over a few positions (seconds for a small model on a CPU, a GPU for a 7B one). Measured in
`benchmarks/bench_new_token_init.py`; the settings were chosen on other lines than the ones reported.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

logger = logging.getLogger(__name__)


TOP = 20  # old tokens mixed per new output row


TEMPERATURE = 0.05  # of the softmax over cosine similarities


BATCH = 256


def hidden_layer(model) -> int:
    """Which hidden state (0 = embeddings): a quarter of the depth."""
    layers = int(getattr(model.config.get_text_config(), "num_hidden_layers", 4))
    return max(1, layers // 4)


class _Reached(Exception):
    """Raised by a forward hook once the wanted layer has run: the rest of the model is not needed."""


def _hidden_state(model, layer: int, **inputs) -> torch.Tensor:
    """`hidden_states[layer]` of a forward pass, without running the layers after it nor the lm_head
    (three quarters of the model at `hidden_layer`): a hook on decoder layer `layer - 1` takes its
    output and stops the pass. Models without `get_decoder().layers` run whole."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not 1 <= layer < len(layers):
        return model(**inputs, output_hidden_states=True, use_cache=False).hidden_states[layer]
    reached: list[torch.Tensor] = []

    def stop(module, args, output):
        reached.append(output[0] if isinstance(output, tuple) else output)
        raise _Reached

    handle = layers[layer - 1].register_forward_hook(stop)
    try:
        model(**inputs, use_cache=False)
    except _Reached:
        pass
    finally:
        handle.remove()
    if not reached:
        raise RuntimeError(f"{type(model).__name__}: decoder layer {layer - 1} did not run")
    return reached[0]


def last_hidden_states(model, bos: Optional[int], spellings: list[list[int]], layer: int) -> torch.Tensor:
    """Hidden state number `layer` at the last id of `[BOS] + spelling`, one fp32 row per spelling."""
    device = model.get_input_embeddings().weight.device
    prefix = [bos] if bos is not None else []
    rows = []
    for start in range(0, len(spellings), BATCH):
        seqs = [prefix + ids for ids in spellings[start : start + BATCH]]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs], device=device)  # right padding: masked
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
        hidden = _hidden_state(model, layer, input_ids=ids, attention_mask=mask)
        rows.append(hidden[torch.arange(len(seqs), device=device), mask.sum(1) - 1].float())
    return torch.cat(rows)


def candidate_old_tokens(tokenizer, base_tokenizer, old_size: int, new_size: int) -> list[int]:
    """Base tokens whose text holds a non-ASCII letter that the new tokens use (whole characters only:
    no byte pieces, no special tokens). Letters, not punctuation: mixing the rows of `“` or `。` into
    Chinese words undid the gain (SmolLM2: 1.17x instead of 1.08x the un-extended bits/char)."""
    new_chars = {c for i in range(old_size, new_size) for c in tokenizer.decode([i]) if ord(c) > 127 and c.isalpha()}
    special = set(base_tokenizer.all_special_ids)
    out = []
    for i in range(old_size):
        if i in special:
            continue
        text = base_tokenizer.decode([i])
        if "\ufffd" not in text and any(c in new_chars for c in text):
            out.append(i)
    return out


@torch.no_grad()
def contextual_rows(model, tokenizer, base_tokenizer, pieces: list[list[int]], old_size: int):
    """(new ids with a spelling, their input rows, their output rows or None) from the base model.

    Call before the embeddings grow (only old ids are fed). Output rows are None when the base has no
    candidate tokens (then the output side keeps subword_mean).
    """
    spelled = [k for k, ids in enumerate(pieces) if ids]
    if not spelled:
        return None
    layer = hidden_layer(model)
    bos = base_tokenizer.bos_token_id
    was_training = model.training
    model.eval()  # no dropout in the states that become rows
    try:
        new_states = last_hidden_states(model, bos, [pieces[k] for k in spelled], layer)
        candidates = candidate_old_tokens(tokenizer, base_tokenizer, old_size, old_size + len(pieces))
        outputs = None
        if candidates:
            old_states = last_hidden_states(model, bos, [[i] for i in candidates], layer)
            similarity = (
                torch.nn.functional.normalize(new_states, dim=1) @ torch.nn.functional.normalize(old_states, dim=1).T
            )
            nearest = similarity.topk(min(TOP, len(candidates)), dim=1)
            weights = torch.softmax(nearest.values / TEMPERATURE, dim=1)
            table = model.get_output_embeddings().weight.detach()
            rows = table[torch.tensor(candidates, device=table.device)].float()
            outputs = torch.einsum("nk,nkd->nd", weights.to(rows.device), rows[nearest.indices.to(rows.device)])
    finally:
        model.train(was_training)
    logger.info(
        "contextual init: %d new tokens read by the model (hidden state %d), output rows mixed from %d base tokens",
        len(spelled),
        layer,
        len(candidates),
    )
    return torch.tensor(spelled), new_states, outputs
