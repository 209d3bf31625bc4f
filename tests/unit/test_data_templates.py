"""Masks by construction: for every template, the trained tokens are exactly the replies + end token.

The same on SmolLM2's real tokenizer: tests/recipes/test_real_assets.py."""

from __future__ import annotations

import pytest
from helpers import CONVERSATIONS, as_messages, check_labels_are_exactly_the_replies, encode_all, make_chat_tokenizer
from transformers import AutoTokenizer

from zhtrain.data.chat import Conversation
from zhtrain.data.supervised import IGNORE_INDEX, encode_conversations
from zhtrain.data.templates import TEMPLATES, get_template, load_saved_template, save_template
from zhtrain.errors import ZhtrainError


@pytest.fixture(scope="module")
def sp_tokenizer(sp_tokenizer_dir):
    return AutoTokenizer.from_pretrained(str(sp_tokenizer_dir))


@pytest.fixture(scope="module")
def chat_tokenizer(sp_tokenizer_dir, tmp_path_factory):
    return AutoTokenizer.from_pretrained(
        str(make_chat_tokenizer(sp_tokenizer_dir, tmp_path_factory.mktemp("chat") / "tok"))
    )


@pytest.mark.parametrize("name", ["vicuna_v1.1", "alpaca", "llama2_chat"])
def test_builtin_templates_train_exactly_the_replies_and_eos(sp_tokenizer, name):
    check_labels_are_exactly_the_replies(sp_tokenizer, name, sp_tokenizer.eos_token)


def test_tokenizer_template_trains_exactly_the_replies_and_im_end(chat_tokenizer):
    check_labels_are_exactly_the_replies(chat_tokenizer, "tokenizer", "<|im_end|>")


def test_prompt_parts_are_the_templates_text(sp_tokenizer):
    """What is masked is the template's prompt: FastChat's system prompt and role tags, in order."""
    _, samples = encode_all(sp_tokenizer, "vicuna_v1.1")
    sample = samples[0]
    prompt = [t for t, label in zip(sample.input_ids, sample.labels) if label == IGNORE_INDEX]
    assert prompt[0] == sp_tokenizer.bos_token_id
    text = sp_tokenizer.decode(prompt[1:])
    assert text == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: 白日依山尽 ASSISTANT:"
    )


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_generation_prompt_is_the_training_prefix(sp_tokenizer, chat_tokenizer, name):
    """encode_prompt(history + question) == the training ids up to the reply: generation sees what training saw."""
    tokenizer = chat_tokenizer if name == "tokenizer" else sp_tokenizer
    template = get_template(name)
    conversations, samples = encode_all(tokenizer, name)
    conversation, sample = conversations[2], samples[2]
    prompt = template.encode_prompt(tokenizer, conversation.messages[:-1])
    assert prompt == sample.input_ids[: len(prompt)]
    assert sample.labels[len(prompt) - 1] == IGNORE_INDEX and sample.labels[len(prompt)] != IGNORE_INDEX
    last_trained = max(i for i, label in enumerate(sample.labels) if label != IGNORE_INDEX)
    assert sample.input_ids[last_trained] in template.stop_token_ids(tokenizer)


def test_render_prompt_is_fastchats_text():
    text = get_template("vicuna_v1.1").render_prompt(
        [
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "q2"},
        ]
    )
    system = TEMPLATES["vicuna_v1.1"].default_system
    assert text == f"<s>{system} USER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT:"
    assert (
        get_template("alpaca").render_prompt("做什么", system="S")
        == "<s>S\n\n### Instruction:\n做什么\n\n### Response: "
    )
    assert get_template("llama2_chat").render_prompt("问") == (
        "<s>[INST] <<SYS>>\nYou are a helpful assistant. 你是一个乐于助人的助手。\n<</SYS>>\n\n问 [/INST]"
    )


def test_unknown_template_and_missing_chat_template(sp_tokenizer):
    with pytest.raises(
        ZhtrainError,
        match="--template chatml: unknown template; choose one of vicuna_v1.1, alpaca, llama2_chat, tokenizer",
    ):
        get_template("chatml")
    with pytest.raises(ZhtrainError, match="has no chat_template"):
        get_template("tokenizer").encode_prompt(sp_tokenizer, "hi")


def test_template_is_saved_and_loaded(tmp_path):
    save_template(tmp_path, "llama2", system="S")
    template, system = load_saved_template(tmp_path)
    assert template.name == "llama2_chat" and system == "S"
    assert load_saved_template(tmp_path / "none") is None


def test_truncation_is_reported_and_a_too_long_prompt_is_dropped(sp_tokenizer):
    conversations = [Conversation(f"c{k}", as_messages(c), f"c{k}") for k, c in enumerate(CONVERSATIONS)]
    template = get_template("llama2_chat")
    full = encode_conversations(conversations, sp_tokenizer, template, 4096)
    first_reply = [s.labels.index(next(l for l in s.labels if l != IGNORE_INDEX)) for s in full]
    limit = first_reply[2] + 3  # sample 2 keeps 3 reply tokens; sample 1 (long system prompt) may not fit
    cut = encode_conversations(conversations, sp_tokenizer, template, limit)
    for original, sample, start in zip(full, cut, first_reply):
        assert len(sample.input_ids) == min(len(original.input_ids), limit)
        assert sample.truncated == max(0, len(original.input_ids) - limit)
        assert sample.input_ids == original.input_ids[:limit] and sample.labels == original.labels[:limit]
        if start >= limit:
            assert (
                sample.dropped and f"is {start} tokens" in sample.dropped and "nothing left to train" in sample.dropped
            )
        else:
            assert sample.dropped is None
    assert cut[2].truncated > 0 and cut[2].dropped is None
