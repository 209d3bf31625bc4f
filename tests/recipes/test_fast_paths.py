"""The fast paths give the same results as the plain ones: token ids, loss, gradients, a whole run."""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from zhtrain.data import text
from zhtrain.data.encoders import DocumentEncoder, SentencePieceEncoder, TokenizersEncoder, choose_encoder
from zhtrain.data.text import build_token_cache, find_text_files
from zhtrain.tokenizer.loading import load_tokenizer

SHARED_TOKENIZERS = Path(__file__).resolve().parents[3] / "shared" / "data" / "tokenizers"
SHARED_CORPUS = Path(__file__).resolve().parents[3] / "shared" / "data" / "corpora" / "peoples-daily-199801.txt"

VARIED_TEXT = (
    "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。\n"
    "\n"
    "   \n"
    "  two leading spaces and  two  inside\n"
    "trailing spaces   \n"
    "\ttabs\tand\u3000全角空格\n"
    "emoji 😀🎉👍🏽 rare CJK 𠀀𪚥 龘 (byte fallback)\n"
    "１９９８年１月１日，ＡＢＣ全角与半角 2024 混排\n"
    "mixed 中文 English 123 — “引号” 《书名》\n"
    "<s> and </s> written as text, <unk> too\n"
    "windows line end\r\n"
    "\n"
    "last line without a newline"
)


@pytest.fixture(scope="module")
def tokenizer(sp_tokenizer_dir):
    return load_tokenizer(str(sp_tokenizer_dir))


def hf_stream(tokenizer, path: Path) -> list[int]:
    """What the HF tokenizer gives, document by document: [BOS] ids [EOS] per non-blank line."""
    ids: list[int] = []
    for line in path.read_text(encoding="utf-8").split("\n"):
        line = line.rstrip("\r")
        if line.strip():
            ids += [
                tokenizer.bos_token_id,
                *tokenizer(line, add_special_tokens=False)["input_ids"],
                tokenizer.eos_token_id,
            ]
    return ids


def cached_stream(entries) -> list[int]:
    return np.concatenate([np.fromfile(e.tokens_path, dtype=e.dtype) for e in entries]).tolist()


def encoder_name(caplog) -> str:
    chosen = [r.getMessage() for r in caplog.records if r.getMessage().startswith("tokenizing with")]
    assert chosen, "the chosen tokenization path is logged"
    return chosen[-1]


def test_sentencepiece_path_gives_the_hf_ids_on_varied_text(tmp_path, tokenizer, caplog):
    data = tmp_path / "d"
    data.mkdir()
    (data / "a.txt").write_text(VARIED_TEXT, encoding="utf-8")
    with caplog.at_level(logging.INFO, logger="zhtrain"):
        entries, stats = build_token_cache(find_text_files(str(data)), tokenizer, tmp_path / "c", show_progress=False)
    assert "sentencepiece" in encoder_name(caplog)
    want = hf_stream(tokenizer, data / "a.txt")
    assert cached_stream(entries) == want and stats.lines == 10


def test_added_tokens_in_text_follow_the_hf_tokenizer(tmp_path, sp_tokenizer_dir):
    extended = load_tokenizer(str(sp_tokenizer_dir))
    extended.add_tokens(["黄河入海流", "[PAD]"])
    lines = ["白日依山尽，黄河入海流。", "[PAD] 在中间 [PAD]", "plain line"]
    encoder = choose_encoder(extended, lines)
    assert isinstance(encoder, SentencePieceEncoder)
    assert encoder(lines) == extended(lines, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("eos_matches", [True, False])
def test_document_ends_added_by_sentencepiece_equal_the_numpy_path(sp_tokenizer_dir, eos_matches):
    """BOS/EOS come from sentencepiece's own add_bos/add_eos when its ids are the tokenizer's (lines
    with added-token text included), else from the numpy pass; the documents are the same either way."""
    extended = load_tokenizer(str(sp_tokenizer_dir))
    extended.add_tokens(["黄河入海流"])
    lines = ["白日依山尽，黄河入海流。", "plain line", "x"]
    encoder = choose_encoder(extended, lines)
    bos, eos = extended.bos_token_id, extended.eos_token_id if eos_matches else extended.unk_token_id
    document = DocumentEncoder(encoder, bos, eos, np.dtype(np.uint32))
    assert (document.encode is not encoder) == eos_matches
    want = [t for ids in extended(lines, add_special_tokens=False)["input_ids"] for t in [bos, *ids, eos]]
    assert document(lines).tolist() == want


def test_a_mismatching_fast_path_is_not_used(tmp_path, sp_tokenizer_dir, caplog):
    """A tokenizer.model that does not give the HF tokenizer's ids (here: another model beside the fixture's
    tokenizer.json, loaded with --tokenizer_backend tokenizers) is detected and skipped."""
    import sentencepiece as spm
    from fixtures import make_lines

    folder = tmp_path / "tok"
    shutil.copytree(sp_tokenizer_dir, folder)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(make_lines(500, seed=5)),
        model_prefix=str(tmp_path / "other"),
        vocab_size=450,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        minloglevel=2,
    )
    shutil.copyfile(tmp_path / "other.model", folder / "tokenizer.model")
    mismatched = load_tokenizer(str(folder), backend="tokenizers")
    data = tmp_path / "d"
    data.mkdir()
    (data / "a.txt").write_text(VARIED_TEXT, encoding="utf-8")
    with caplog.at_level(logging.INFO, logger="zhtrain"):
        entries, _ = build_token_cache(find_text_files(str(data)), mismatched, tmp_path / "c", show_progress=False)
    assert "not tokenizing with sentencepiece: differs on" in caplog.text
    assert "tokenizing with tokenizers" in encoder_name(caplog)
    assert cached_stream(entries) == hf_stream(mismatched, data / "a.txt")


def test_fast_and_hf_paths_write_identical_caches_with_workers(tmp_path, tokenizer, monkeypatch):
    from fixtures import make_lines

    monkeypatch.setattr(text, "BATCH_BYTES", 4096)  # many blocks, so the worker pool is used
    data = tmp_path / "d"
    data.mkdir()
    (data / "a.txt").write_text("\n".join(make_lines(1500)) + "\n\n" + VARIED_TEXT, encoding="utf-8")
    files = find_text_files(str(data))
    fast, _ = build_token_cache(files, tokenizer, tmp_path / "c1", workers=2, show_progress=False)
    plain, _ = build_token_cache(
        files, tokenizer, tmp_path / "c2", workers=1, show_progress=False, fast_tokenization=False
    )
    assert cached_stream(fast) == cached_stream(plain) == hf_stream(tokenizer, data / "a.txt")
    # The content digest taken from the blocks while tokenizing is the one the cache lookup computes.
    again, stats = build_token_cache(files, tokenizer, tmp_path / "c1", workers=2, show_progress=False)
    assert [entry.from_cache for entry in again] == [True] and stats.tokenized_tokens == 0


def test_a_bad_byte_found_by_a_worker_names_file_byte_and_line(tmp_path, tokenizer, monkeypatch):
    from zhtrain.errors import ZhtrainError

    monkeypatch.setattr(text, "BATCH_BYTES", 1024)
    data = tmp_path / "d"
    data.mkdir()
    good = "白日依山尽，黄河入海流。\n" * 400
    (data / "a.txt").write_bytes(good.encode() + b"\xff bad\n")
    with pytest.raises(ZhtrainError, match=rf"a.txt: not valid UTF-8 at byte {len(good.encode())} \(line 401\)"):
        build_token_cache(find_text_files(str(data)), tokenizer, tmp_path / "c", workers=2, show_progress=False)
    assert not list((tmp_path / "c").glob("*.tmp-*"))


@pytest.mark.skipif(
    not (SHARED_TOKENIZERS / "llama-32000.model").is_file() or not SHARED_CORPUS.is_file(),
    reason="real LLaMA tokenizer / People's Daily not present (../shared/data)",
)
def test_real_llama_tokenizer_fast_path_on_real_chinese(tmp_path, caplog):
    from transformers import AutoTokenizer

    folder = tmp_path / "llama"
    folder.mkdir()
    shutil.copyfile(SHARED_TOKENIZERS / "llama-32000.model", folder / "tokenizer.model")
    llama = AutoTokenizer.from_pretrained(str(folder))
    lines = [line for line in SHARED_CORPUS.read_text(encoding="utf-8").split("\n") if line.strip()][:2000]
    with caplog.at_level(logging.INFO, logger="zhtrain"):
        encoder = choose_encoder(llama, lines)
    assert isinstance(encoder, SentencePieceEncoder)
    assert encoder(lines) == llama(lines, add_special_tokens=False)["input_ids"]


def test_tokenizers_path_equals_hf_call(sp_tokenizer_dir):
    from fixtures import make_lines

    tokenizer = load_tokenizer(str(sp_tokenizer_dir), backend="tokenizers")
    lines = make_lines(50) + ["  spaced  out ", "😀 𠀀"]
    assert (
        TokenizersEncoder(tokenizer.backend_tokenizer)(lines) == tokenizer(lines, add_special_tokens=False)["input_ids"]
    )


# ---------------------------------------------------------------------------------------------
# Chunked lm_head + cross-entropy


def tiny_peft_model(
    tiny_model_dir, modules_to_save=("embed_tokens", "lm_head"), targets=("q_proj", "v_proj"), dropout=0.0
):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=dropout,
        target_modules=list(targets),
        modules_to_save=list(modules_to_save) or None,
    )
    model = get_peft_model(model, config)
    for name, param in model.named_parameters():  # LoRA B starts at zero: make it count
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    return model


def trainer_for(model, chunked: bool, tmp_path):
    from transformers import TrainingArguments

    from zhtrain.training.trainer import NonFiniteLossGuard, ZhtrainTrainer

    args = TrainingArguments(
        output_dir=str(tmp_path / "t"), report_to="none", use_cpu=True, per_device_train_batch_size=2
    )
    return ZhtrainTrainer(model=model, args=args, loss_guard=NonFiniteLossGuard(), chunked_loss=chunked)


def loss_and_grads(trainer, model, inputs, num_items):
    model.train()
    model.zero_grad()
    loss = trainer.compute_loss(model, dict(inputs), num_items_in_batch=num_items)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("modules_to_save", [("embed_tokens", "lm_head"), ()], ids=["trained-head", "frozen-head"])
@pytest.mark.parametrize("num_items", [None, 37], ids=["mean", "num_items_in_batch"])
def test_chunked_loss_equals_the_models_loss_and_gradients(
    tmp_path, tiny_model_dir, modules_to_save, num_items, monkeypatch
):
    import zhtrain.training.loss as loss_module
    from zhtrain.training.loss import plain_output_layers

    model = tiny_peft_model(tiny_model_dir, modules_to_save)
    assert plain_output_layers(model) is not None
    ids = torch.randint(3, 400, (2, 48), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :7] = -100  # masked prompt, as in SFT
    labels[1, -5:] = -100
    inputs = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    plain_loss, plain_grads = loss_and_grads(trainer_for(model, False, tmp_path), model, inputs, num_items)
    chunked = trainer_for(model, True, tmp_path)
    chunked_loss, chunked_grads = loss_and_grads(chunked, model, inputs, num_items)
    assert torch.allclose(plain_loss, chunked_loss, rtol=1e-6, atol=1e-6), (plain_loss, chunked_loss)
    assert plain_grads.keys() == chunked_grads.keys() and len(plain_grads) > 0
    if modules_to_save:
        assert any("lm_head" in name for name in chunked_grads), "the trained head gets its gradient"
    for name in plain_grads:
        torch.testing.assert_close(chunked_grads[name], plain_grads[name], rtol=1e-4, atol=1e-7, msg=name)
    # Several chunks (of 16 rows) per batch: the default chunk holds all 96 rows of this tiny vocabulary.
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 400 * 16)
    small_loss, small_grads = loss_and_grads(chunked, model, inputs, num_items)
    assert torch.allclose(plain_loss, small_loss, rtol=1e-6, atol=1e-6)
    for name in plain_grads:
        torch.testing.assert_close(small_grads[name], plain_grads[name], rtol=1e-4, atol=1e-7, msg=name)


def test_lora_on_lm_head_keeps_the_plain_loss(tiny_model_dir):
    from zhtrain.training.loss import plain_output_layers

    model = tiny_peft_model(tiny_model_dir, (), targets=("q_proj", "lm_head"))
    assert plain_output_layers(model) is None


# ---------------------------------------------------------------------------------------------
# LoRA dropout masks kept through gradient checkpointing


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def mask_draws(self) -> int:
        return sum(n for name, n in self.counts.items() if name.startswith("bernoulli"))


def checkpointed_step(tiny_model_dir, keep_masks: bool):
    """Loss, gradients and the dropout masks drawn in forward and in backward (the recompute)."""
    from zhtrain.training.activation_checkpointing import keep_lora_dropout_masks

    model = tiny_peft_model(tiny_model_dir, (), targets=("q_proj", "v_proj", "down_proj"), dropout=0.3)
    if keep_masks:
        assert keep_lora_dropout_masks(model) == 3 * model.config.num_hidden_layers
    model.base_model.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(3, 400, (2, 32), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(9)
    with _CountOps() as forward:
        loss = model(input_ids=ids, labels=ids).loss
    with _CountOps() as backward:
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, forward.mask_draws, backward.mask_draws, torch.get_rng_state()


def test_kept_dropout_masks_give_the_same_gradients_from_one_draw(tiny_model_dir):
    plain_loss, plain_grads, plain_forward, plain_backward, plain_rng = checkpointed_step(
        tiny_model_dir, keep_masks=False
    )
    kept_loss, kept_grads, kept_forward, kept_backward, kept_rng = checkpointed_step(tiny_model_dir, keep_masks=True)
    layers_times_targets = 2 * 3
    assert plain_forward == plain_backward == layers_times_targets, "PyTorch draws each mask again in the recompute"
    assert (kept_forward, kept_backward) == (layers_times_targets, 0)
    assert torch.equal(plain_loss, kept_loss)
    assert plain_grads.keys() == kept_grads.keys() and any("lora_A" in n for n in plain_grads)
    for name in plain_grads:  # bit for bit: the same masks and the same arithmetic
        assert torch.equal(plain_grads[name], kept_grads[name]), name
    assert torch.equal(plain_rng, kept_rng), "the generator ends where the plain run leaves it"


def test_kept_mask_dropout_is_plain_dropout_in_values():
    from zhtrain.training.activation_checkpointing import KeptMaskDropout

    x = torch.randn(3, 17, 40)
    for p in (0.05, 0.5):
        dropout = KeptMaskDropout(p)
        torch.manual_seed(4)
        plain = torch.nn.Dropout(p)
        first, second = plain(x), plain(x)
        torch.manual_seed(4)
        assert torch.equal(dropout(x), first)
        assert torch.equal(dropout(x), second), "the generator moved on: a new mask, as nn.Dropout draws"
        torch.manual_seed(4)
        assert torch.equal(dropout(x), first), "the kept mask is another state's: drawn"
        torch.manual_seed(4)
        assert torch.equal(dropout(x), first), "drawn again from the same state: the kept mask"
        assert torch.equal(dropout(x), second)
        torch.manual_seed(4)
        part = torch.nn.Dropout(p)(x[:, :5])
        after_part = torch.get_rng_state()
        torch.manual_seed(4)
        dropout(x)
        torch.manual_seed(4)
        assert torch.equal(dropout(x[:, :5]), part), "another shape from the same state: drawn, not the kept mask"
        assert torch.equal(torch.get_rng_state(), after_part), "and the generator moved as far as that draw"
    assert KeptMaskDropout(0.5).eval()(x) is x


def test_checkpointing_kwargs_reach_the_trainer(tmp_path, tiny_model_dir):
    from zhtrain.training.activation_checkpointing import KeptMaskDropout, set_checkpointing_kwargs
    from zhtrain.training.args import ZhtrainTrainingArguments

    def args(**extra):
        return ZhtrainTrainingArguments(
            output_dir=str(tmp_path), report_to="none", use_cpu=True, gradient_checkpointing=True, **extra
        )

    def kept(model) -> int:
        return sum(isinstance(m, KeptMaskDropout) for m in model.modules())

    model = tiny_peft_model(tiny_model_dir, (), dropout=0.1)
    training_args = args()
    set_checkpointing_kwargs(model, training_args)
    # The field the Trainer reads (transformers 5.x renamed it; the old name is only copied at init).
    assert training_args.activation_checkpointing_kwargs == {"use_reentrant": False}
    assert kept(model) == 2 * model.config.num_hidden_layers
    off = args(keep_dropout_masks=False)
    model = tiny_peft_model(tiny_model_dir, (), dropout=0.1)
    set_checkpointing_kwargs(model, off)
    assert kept(model) == 0
    given = args(activation_checkpointing_kwargs={"use_reentrant": True})
    set_checkpointing_kwargs(model, given)
    assert given.activation_checkpointing_kwargs == {"use_reentrant": True}, "the user's own kwargs are kept"


# ---------------------------------------------------------------------------------------------
# A whole run


@pytest.mark.slow
def test_pretrain_with_fast_paths_equals_pretrain_without(tmp_path, tiny_model_dir, sp_tokenizer_dir, text_dir):
    from zhtrain.pretrain import parse_pretrain_args, pretrain

    def run(name, *extra):
        argv = [
            "--model_name_or_path",
            str(tiny_model_dir),
            "--tokenizer_name_or_path",
            str(sp_tokenizer_dir),
            "--dataset_dir",
            str(text_dir),
            "--data_cache_dir",
            str(tmp_path / name / "cache"),
            "--output_dir",
            str(tmp_path / name / "out"),
            "--block_size",
            "64",
            "--per_device_train_batch_size",
            "2",
            "--max_steps",
            "6",
            "--learning_rate",
            "1e-3",
            "--do_train",
            "--seed",
            "3",
            "--report_to",
            "none",
            "--logging_steps",
            "1",
            "--save_strategy",
            "no",
            "--validation_split_percentage",
            "0.05",
            "--disable_tqdm",
            "True",
            "--trainable",
            "q_proj,v_proj,k_proj,o_proj,gate_proj,down_proj,up_proj",
            "--modules_to_save",
            "embed_tokens,lm_head",
            "--lora_rank",
            "8",
            "--lora_alpha",
            "32",
            "--lora_dropout",
            "0.05",
            "--gradient_checkpointing",
            *extra,
        ]
        result = pretrain(*parse_pretrain_args(argv))
        losses = [entry["loss"] for entry in result.trainer.state.log_history if "loss" in entry]
        cache = sorted((tmp_path / name / "cache").glob("*.tokens"))
        return losses, [np.fromfile(p, dtype=np.uint16).tolist() for p in cache], result.trainer.chunked_loss_active

    fast_losses, fast_tokens, fast_trainer = run("fast")
    plain_losses, plain_tokens, plain_trainer = run(
        "plain", "--fast_tokenization", "False", "--chunked_loss", "False", "--keep_dropout_masks", "False"
    )
    assert (fast_trainer, plain_trainer) == (True, False)
    assert fast_tokens == plain_tokens and len(fast_tokens) == 2
    assert len(fast_losses) == len(plain_losses) == 6
    np.testing.assert_allclose(fast_losses, plain_losses, rtol=0, atol=1e-5)
