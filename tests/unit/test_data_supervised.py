"""Supervised samples: padding and its masks, the pad token, lazy encoding."""

from __future__ import annotations

import torch
from helpers import write_sharegpt

from zhtrain.data.supervised import IGNORE_INDEX, PadToLongest, choose_pad_token


def test_pad_to_longest_masks_padding_and_keeps_eos_that_equals_pad():
    collate = PadToLongest(pad_token_id=2)
    batch = collate(
        [
            {"input_ids": [1, 5, 6, 2], "labels": [IGNORE_INDEX, IGNORE_INDEX, 6, 2]},
            {"input_ids": [1, 7], "labels": [IGNORE_INDEX, 7]},
        ]
    )
    assert batch["input_ids"].tolist() == [[1, 5, 6, 2], [1, 7, 2, 2]]
    assert batch["labels"].tolist() == [[-100, -100, 6, 2], [-100, 7, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]  # the real eos (=pad id) is attended
    assert PadToLongest(0, pad_to_multiple_of=8)([{"input_ids": [1], "labels": [1]}])["input_ids"].shape == torch.Size(
        [1, 8]
    )


def test_pad_token_choice(sp_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(sp_tokenizer_dir))
    size = len(tokenizer)
    assert tokenizer.pad_token is None
    assert "unk" in choose_pad_token(tokenizer) and tokenizer.pad_token == tokenizer.unk_token
    assert len(tokenizer) == size  # never grows the vocabulary for padding
    assert "own" in choose_pad_token(tokenizer)


def test_lazy_dataset_tokenizes_only_in_getitem(tiny_model_dir, sp_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    from zhtrain.data.chat import load_conversations
    from zhtrain.data.supervised import LazySupervisedDataset, SupervisedDataset, encode_conversations
    from zhtrain.data.templates import get_template

    class CountingTokenizer:
        def __init__(self, inner):
            self.inner, self.calls = inner, 0

        def __call__(self, *args, **kwargs):
            self.calls += 1
            return self.inner(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    tokenizer = CountingTokenizer(AutoTokenizer.from_pretrained(str(sp_tokenizer_dir)))
    conversations = load_conversations([write_sharegpt(tmp_path / "c.json", copies=50)])
    template = get_template("vicuna_v1.1")
    lazy = LazySupervisedDataset(conversations, tokenizer, template, 256)
    assert tokenizer.calls == 0 and len(lazy) == 150
    eager = SupervisedDataset(encode_conversations(conversations, tokenizer.inner, template, 256))
    assert lazy[7] == eager[7] and tokenizer.calls == 1
