"""Conversation fixtures for the SFT tests: data files in each format and a tokenizer with a chat_template."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

# SmolLM2's chat template (ChatML with a default system prompt), as shipped in its tokenizer_config.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Replies avoid full-width punctuation: the fixture SentencePiece model normalises it (NFKC).
CONVERSATIONS = [
    [("user", "白日依山尽"), ("assistant", "黄河入海流")],
    [("system", "你是一个乐于助人的助手"), ("user", "the number 12 is"), ("assistant", "它是 twelve 的意思")],
    [
        ("user", "你好"),
        ("assistant", "你好 有什么可以帮你"),
        ("user", "USER: 这是一个 ASSISTANT: 测试"),  # template markers inside the text must not confuse masks
        ("assistant", "ASSISTANT: 没有问题 </s> USER:"),
        ("user", "再说一次"),
        ("assistant", "好的 the number 7"),
    ],
]


def as_messages(conversation) -> list[dict]:
    return [{"role": role, "content": text} for role, text in conversation]


def sharegpt_records(conversations=CONVERSATIONS) -> list[dict]:
    names = {"user": "human", "assistant": "gpt", "system": "system"}
    return [
        {"id": f"conv_{k}", "conversations": [{"from": names[role], "value": text} for role, text in conv]}
        for k, conv in enumerate(conversations)
    ]


def write_sharegpt(path: Path, copies: int = 1, conversations=CONVERSATIONS) -> Path:
    records = []
    for copy in range(copies):
        for record in sharegpt_records(conversations):
            records.append(dict(record, id=f"{record['id']}_{copy}"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def write_alpaca(path: Path, n: int = 8) -> Path:
    records = [
        {
            "instruction": f"把数字 {k} 写成中文",
            "input": "" if k % 2 else "用一个字",
            "output": "一二三四五六七八"[k % 8],
        }
        for k in range(n)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def make_chat_tokenizer(sp_tokenizer_dir: Path, folder: Path) -> Path:
    """The SentencePiece fixture plus ChatML special tokens and SmolLM2's chat_template."""
    from transformers import AutoTokenizer

    if folder.exists():
        return folder
    shutil.copytree(sp_tokenizer_dir, folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(str(folder))
    return folder
