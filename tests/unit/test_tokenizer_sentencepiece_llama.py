"""LLaMA SentencePiece folders load as the seed's slow tokenizer: sentencepiece's own ids everywhere."""

from __future__ import annotations

import json

from helpers import SHARED_CORPUS, SHARED_TOKENIZERS, needs_shared_tokenizers, sp

from zhtrain.data.encoders import AWKWARD_LINES, SentencePieceEncoder, choose_encoder
from zhtrain.tokenizer.loading import load_tokenizer
from zhtrain.tokenizer.sentencepiece_llama import SentencePieceLlamaTokenizer

LLAMA, CHINESE = SHARED_TOKENIZERS / "llama-32000.model", SHARED_TOKENIZERS / "chinese_sp-20000.model"
PEOPLES_DAILY = SHARED_CORPUS
needs_real = __import__("pytest").mark.skipif(not PEOPLES_DAILY.is_file(), reason=f"{PEOPLES_DAILY} not found")


def test_auto_loads_sentencepiece_with_the_seed_special_tokens(sp_tokenizer_dir):
    tokenizer = load_tokenizer(str(sp_tokenizer_dir))
    raw = sp(sp_tokenizer_dir / "tokenizer.model")
    assert isinstance(tokenizer, SentencePieceLlamaTokenizer) and len(tokenizer) == raw.get_piece_size()
    for line in AWKWARD_LINES[:14]:  # the last ones hold special-token text, handled below
        assert tokenizer(line, add_special_tokens=False)["input_ids"] == raw.encode(line), line
        assert tokenizer(line)["input_ids"] == [raw.bos_id()] + raw.encode(line)  # BOS, no EOS: the slow LlamaTokenizer
    text = "the quick brown fox jumps"
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == raw.decode(raw.encode(text))
    # Special-token text is a token (as in the slow tokenizer), the text around it is encoded on its own.
    ids = tokenizer("a</s>b", add_special_tokens=False)["input_ids"]
    assert ids == raw.encode("a") + [raw.eos_id()] + raw.encode("b")


def test_saved_folder_is_a_plain_llama_tokenizer_folder(sp_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = load_tokenizer(str(sp_tokenizer_dir))
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    out = tmp_path / "saved"
    tokenizer.save_pretrained(str(out))
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "LlamaTokenizer" and "backend" not in config
    again, other = load_tokenizer(str(out)), AutoTokenizer.from_pretrained(str(out))
    assert len(again) == len(other) == len(tokenizer) and again.pad_token_id == other.pad_token_id == len(tokenizer) - 1


@needs_shared_tokenizers
@needs_real
def test_chinese_merge_gives_sentencepiece_ids_where_the_fast_conversion_does_not(tmp_path):
    """The reason for the class: on the 49953 merge transformers' fast tokenizer differs from sentencepiece."""
    from zhtrain.build_tokenizer import main as tokenizer_main

    out = tmp_path / "chinese_llama"
    tokenizer_main(
        [
            "merge",
            "--llama_tokenizer_dir",
            str(LLAMA),
            "--chinese_sp_model_file",
            str(CHINESE),
            "--output_dir",
            str(out),
        ]
    )
    raw = sp(out / "tokenizer.model")
    lines = [line.strip() for line in PEOPLES_DAILY.open(encoding="utf-8") if line.strip()][:300]
    ours, fast = load_tokenizer(str(out)), load_tokenizer(str(out), backend="tokenizers")
    assert len(ours) == len(fast) == 49953
    assert ours(lines, add_special_tokens=False)["input_ids"] == [raw.encode(line) for line in lines]
    fast_ids = fast(lines, add_special_tokens=False)["input_ids"]
    assert sum(a != raw.encode(line) for a, line in zip(fast_ids, lines)) > 30  # ~1/3 of lines differ
    assert all(ours.decode(ours(line, add_special_tokens=False)["input_ids"]) == line for line in lines[:50])
    assert isinstance(choose_encoder(ours, lines), SentencePieceEncoder)


def test_tokens_only_in_tokenizer_json_are_kept(sp_tokenizer_dir, tmp_path):
    """A token that exists only in tokenizer.json (not the model, not tokenizer_config.json) must not vanish."""
    import shutil

    folder = tmp_path / "tok"
    shutil.copytree(sp_tokenizer_dir, folder)
    tokenizer_json = json.loads((folder / "tokenizer.json").read_text())
    tokenizer_json["added_tokens"].append(
        {
            "id": 400,
            "content": "黄河入海流",
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": True,
            "special": False,
        }
    )
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False))
    tokenizer = load_tokenizer(str(folder))
    assert isinstance(tokenizer, SentencePieceLlamaTokenizer) and len(tokenizer) == 401
    assert tokenizer("白日依山尽，黄河入海流。", add_special_tokens=False)["input_ids"].count(400) == 1
