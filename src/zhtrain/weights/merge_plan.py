"""The plan of a merge: every check made before anything is written.

`make_plan` reads the base's tensor names and shapes and each adapter's edits, follows the vocabulary
through the adapters in order (never shrinking it) and checks every edit against the shape it will
meet; `zhtrain merge` writes from the plan, `zhtrain generate` uses it to check adapters before loading.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

from zhtrain.errors import ZhtrainError
from zhtrain.model.vocab import describe_tokenizer
from zhtrain.weights.adapter_file import Adapter, touches_embeddings, wanted_vocab
from zhtrain.weights.hf_folder import Checkpoint

logger = logging.getLogger(__name__)


EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"


@dataclass
class MergePlan:
    checkpoint: Checkpoint
    adapters: list[Adapter]
    vocab_after: list[int]  # vocabulary once each adapter is applied
    tied_base: bool  # lm_head shares embed_tokens' weights (no lm_head in the files)
    untie: bool  # an adapter trains embed_tokens or lm_head of a tied base

    @property
    def final_vocab(self) -> int:
        return self.vocab_after[-1]

    @property
    def tied_output(self) -> bool:
        return self.tied_base and not self.untie


def make_plan(checkpoint: Checkpoint, adapters: list[Adapter]) -> MergePlan:
    if EMBED not in checkpoint.shapes:
        raise ZhtrainError(
            f"--base_model {checkpoint.folder}: no {EMBED}; zhtrain merge handles LLaMA-family causal LMs"
        )
    tied_base = LM_HEAD not in checkpoint.shapes
    running = checkpoint.shapes[EMBED][0]
    vocab_after = []
    for position, adapter in enumerate(adapters):
        wanted = wanted_vocab(adapter, running)
        if wanted < running:
            raise shrink_error(adapters, position, wanted, running, checkpoint)
        if wanted > running and not touches_embeddings(adapter):
            logger.warning(
                "%s grows the vocabulary %d -> %d but carries no embed_tokens/lm_head rows: the new rows "
                "start at the mean of the existing rows (untrained)",
                adapter.name,
                running,
                wanted,
            )
        running = wanted
        for key, edit in adapter.edits.items():
            check_edit(checkpoint, adapter, key, edit, running, tied_base)
        vocab_after.append(running)
    untie = tied_base and any(touches_embeddings(a) for a in adapters)
    plan = MergePlan(checkpoint, adapters, vocab_after, tied_base, untie)
    check_output_tokenizer(plan)
    return plan


def check_output_tokenizer(plan: MergePlan) -> None:
    """A merge that changes the vocabulary must ship a tokenizer of the new size (copy_tokenizer takes the
    last adapter's that has one): else the folder would pair, say, 49953 rows with LLaMA's 32000 tokens."""
    if plan.final_vocab == plan.checkpoint.shapes[EMBED][0]:
        return  # the base's own pairing (a padded vocabulary with more rows than tokens included)
    source = next((a for a in reversed(plan.adapters) if a.has_tokenizer), None)
    if source is not None and source.tokenizer_len == plan.final_vocab:
        return
    found = (
        f"the tokenizer in {source.name} has {source.tokenizer_len}"
        if source
        else "none of the adapter folders holds a tokenizer"
    )
    raise ZhtrainError(
        f"the merged model will have {plan.final_vocab} tokens but {found}; put the tokenizer the last adapter was "
        f"trained with into {plan.adapters[-1].name}"
    )


def shrink_error(
    adapters: list[Adapter], position: int, wanted: int, running: int, checkpoint: Checkpoint
) -> ZhtrainError:
    adapter = adapters[position]
    if position == 0:
        trained_for = adapter.config.get("base_model_name_or_path") or "another base"
        return ZhtrainError(
            f"adapter {adapter.name} needs {describe_tokenizer(wanted)} but base {checkpoint.folder} already has "
            f"{running} embedding rows; zhtrain never shrinks a vocabulary: the adapter was trained for another base "
            f"({trained_for})"
        )
    previous = adapters[position - 1]
    order = ",".join(str(a.path) for a in [adapter, previous])
    return ZhtrainError(
        f"adapters in this order would shrink the vocabulary: {previous.name} grows it to {running} tokens, then "
        f"{adapter.name} needs {describe_tokenizer(wanted)}; give them in training order, e.g. --lora_model {order}"
    )


def expected_shape(checkpoint: Checkpoint, key: str, vocab: int, tied_base: bool) -> Optional[tuple[int, ...]]:
    shape = checkpoint.shapes.get(key)
    if shape is None and key == LM_HEAD and tied_base:
        shape = checkpoint.shapes[EMBED]
    if shape is not None and key in (EMBED, LM_HEAD):
        shape = (vocab, *shape[1:])
    return shape


def check_edit(checkpoint: Checkpoint, adapter: Adapter, key: str, edit, vocab: int, tied_base: bool) -> None:
    expected = expected_shape(checkpoint, key, vocab, tied_base)
    trained_for = adapter.config.get("base_model_name_or_path") or "another base"
    if expected is None:
        raise ZhtrainError(
            f"adapter {adapter.name} changes {key}, which base {checkpoint.folder} does not have: it was trained for "
            f"another base model ({trained_for}); merge it into that one"
        )
    got = [("weights", tuple(edit.replace.shape))] if edit.replace is not None else []
    got += [("LoRA update", tuple(edit.low_rank.shape))] if edit.low_rank is not None else []
    got += [("LoRA bias", tuple(edit.bias_update.shape))] if edit.bias_update is not None else []
    for what, shape in got:
        if shape == tuple(expected):
            continue
        if key in (EMBED, LM_HEAD) and shape[1:] == tuple(expected[1:]):
            has = (
                f"its folder's tokenizer has {adapter.tokenizer_len} tokens"
                if adapter.has_tokenizer
                else f"the model has {expected[0]} rows here"
            )
            raise ZhtrainError(
                f"adapter {adapter.name}: {key} {what} are {list(shape)} but {has} ({list(expected)}); the adapter "
                f"needs {describe_tokenizer(shape[0])}, the one it was trained with: put that tokenizer's files into "
                f"{adapter.name}"
            )
        raise ZhtrainError(
            f"adapter {adapter.name}: {key} {what} are {list(shape)} but base {checkpoint.folder} has "
            f"{list(expected)}: the adapter was trained for another base model ({trained_for}); merge it into that one"
        )
