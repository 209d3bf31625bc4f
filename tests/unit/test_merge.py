"""`zhtrain merge`: equal to PEFT's own result, shard by shard, HF and Meta pth, legacy adapters, bad input."""

from __future__ import annotations

import errno
import gc
import json
import shutil
import weakref
from pathlib import Path

import pytest
import torch
from helpers import ALL_TARGETS, extended_tokenizer, load_model, make_adapter, peft_reference, sample_ids
from helpers import copy_tokenizer as copy_tokenizer_files
from helpers import logits_of as logits

from zhtrain import merge as merge_module
from zhtrain.errors import ZhtrainError
from zhtrain.merge import merge, parse_merge_args
from zhtrain.weights import meta

TOL = 1e-4


def all_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v for shard in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(shard)).items()}


def run_merge(base, adapters, out, *extra):
    return merge(
        parse_merge_args(
            ["--base_model", str(base), "--lora_model", ",".join(map(str, adapters)), "--output_dir", str(out), *extra]
        )
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir, sp_tokenizer_dir):
    """A base saved in several shards, a 400-token adapter, and a second adapter on a 403-token tokenizer."""
    root = tmp_path_factory.mktemp("merge")
    sharded = root / "base_sharded"
    load_model(tiny_model_dir).save_pretrained(str(sharded), max_shard_size="40KB")
    shutil.copyfile(sp_tokenizer_dir / "tokenizer.model", sharded / "tokenizer.model")
    first = make_adapter(load_model(sharded), root / "plus_lora", sp_tokenizer_dir, seed=1)
    tok403 = extended_tokenizer(sp_tokenizer_dir, root / "tok403")
    # The second adapter is trained on base + first merged, grown to 403 tokens (LLaMA-Plus then Alpaca-Plus).
    stage1 = peft_reference(sharded, [first], [400]).merge_and_unload()
    second = make_adapter(
        stage1,
        root / "alpaca_lora",
        tok403,
        seed=2,
        r=8,
        alpha=16,
        use_rslora=True,
        rank_pattern={"q_proj": 2},
        alpha_pattern={"down_proj": 4},
    )
    return {"root": root, "base": sharded, "first": first, "second": second, "tok403": tok403}


def test_base_fixture_has_several_shards(world):
    assert len(list(world["base"].glob("model-*.safetensors"))) >= 3


def test_single_merge_equals_peft(world, tmp_path):
    summary = run_merge(world["base"], [world["first"]], tmp_path / "merged", "--max_shard_size", "40KB")
    out = tmp_path / "merged"
    # Shards of --max_shard_size with an index, the adapter's tokenizer, the final config.
    assert len(list(out.glob("model-*.safetensors"))) >= 3
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" in index["weight_map"] and index["metadata"]["total_size"] > 0
    assert {"tokenizer.model", "tokenizer.json", "config.json", "generation_config.json", "zhtrain_merge.json"} <= {
        p.name for p in out.iterdir()
    }
    assert summary["verification"]["max_abs_logit_diff"] <= TOL
    # The shards have the mode every other file gets (safetensors itself writes 0600 whatever the umask).
    assert {p.stat().st_mode & 0o777 for p in out.glob("*.safetensors")} == {
        (out / "config.json").stat().st_mode & 0o777
    }
    ids = sample_ids(400)
    merged, reference = (
        logits(load_model(out), ids),
        logits(peft_reference(world["base"], [world["first"]], [400]), ids),
    )
    assert (merged - reference).abs().max() <= TOL
    assert (merged - logits(load_model(world["base"]), ids)).abs().max() > 1e-2  # the merge changed something


def test_stacked_merge_with_vocab_growth_equals_peft(world, tmp_path):
    """LLaMA + Plus LoRA (400) + Alpaca LoRA (403, rslora, rank/alpha patterns): grown, replaced, added."""
    out = tmp_path / "merged"
    summary = run_merge(world["base"], [world["first"], world["second"]], out)
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 403 and summary["vocab_size"] == 403
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(str(out))) == 403  # the last adapter's tokenizer
    ids = sample_ids(403)
    reference = peft_reference(world["base"], [world["first"], world["second"]], [400, 403])
    assert (logits(load_model(out), ids) - logits(reference, ids)).abs().max() <= TOL


def test_merge_holds_one_output_shard_and_one_tensor_at_most(world, tmp_path, monkeypatch):
    """Low memory by construction: live merged tensors never exceed --max_shard_size plus the tensor at hand."""
    from zhtrain.weights import hf_folder as weights

    real_add, live, peaks = weights.ShardWriter.add, [], []

    def tracking_add(self, name, tensor):
        gc.collect()
        held = sum(t.numel() * t.element_size() for t in (ref() for ref in live) if t is not None)
        peaks.append(held)
        if name not in ("model.embed_tokens.weight", "lm_head.weight"):  # those are the adapter's own tensors
            live.append(weakref.ref(tensor))
        return real_add(self, name, tensor)

    monkeypatch.setattr(weights.ShardWriter, "add", tracking_add)
    limit = 20_000
    run_merge(world["base"], [world["first"]], tmp_path / "merged", "--no-verify", "--max_shard_size", str(limit))
    largest = max(t.numel() * 4 for t in load_model(world["base"]).parameters())
    assert max(peaks) <= limit + largest
    assert sum(peaks) > 0 and len(list((tmp_path / "merged").glob("model-*.safetensors"))) > 4
    merged = load_model(tmp_path / "merged")  # many small shards load as one model
    assert merged.model.embed_tokens.weight.shape[0] == 400


def test_tied_base_is_untied_when_embeddings_were_trained(tmp_path, tied_model_dir, sp_tokenizer_dir):
    trained = make_adapter(load_model(tied_model_dir), tmp_path / "trained", sp_tokenizer_dir)
    run_merge(tied_model_dir, [trained], tmp_path / "untied")
    assert json.loads((tmp_path / "untied" / "config.json").read_text())["tie_word_embeddings"] is False
    model = load_model(tmp_path / "untied")
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    ids = sample_ids(400)
    assert (logits(model, ids) - logits(peft_reference(tied_model_dir, [trained], [400]), ids)).abs().max() <= TOL
    # LoRA only (no embeddings trained): the output stays tied and writes no lm_head.
    lora_only = make_adapter(load_model(tied_model_dir), tmp_path / "lora_only", sp_tokenizer_dir, modules_to_save=())
    run_merge(tied_model_dir, [lora_only], tmp_path / "tied")
    assert json.loads((tmp_path / "tied" / "config.json").read_text())["tie_word_embeddings"] is True
    from safetensors import safe_open

    with safe_open(str(tmp_path / "tied" / "model.safetensors"), "pt") as handle:
        assert "lm_head.weight" not in handle.keys()


def test_legacy_adapter_bin_with_old_keys(world, tmp_path):
    """The seed's adapter_model.bin (PEFT 13e53fc keys and config fields) merges exactly like the safetensors one."""
    from safetensors.torch import load_file

    legacy = tmp_path / "legacy_lora"
    legacy.mkdir()
    state = load_file(str(world["first"] / "adapter_model.safetensors"))
    assert "base_model.model.model.embed_tokens.weight" in state  # the seed's modules_to_save key name
    torch.save(state, legacy / "adapter_model.bin")
    current = json.loads((world["first"] / "adapter_config.json").read_text())
    old_config = {
        "base_model_name_or_path": "decapoda-research/llama-7b-hf",
        "bias": "none",
        "enable_lora": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "lora_alpha": current["lora_alpha"],
        "lora_dropout": 0.05,
        "merge_weights": False,
        "modules_to_save": current["modules_to_save"],
        "peft_type": "LORA",
        "r": current["r"],
        "target_modules": current["target_modules"],
        "task_type": "CAUSAL_LM",
    }
    (legacy / "adapter_config.json").write_text(json.dumps(old_config))
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(world["first"] / name, legacy / name)
    # A live PeftModel's names (`.lora_A.default.weight`, `.modules_to_save.default.weight`) are accepted too.
    live = tmp_path / "live_names"
    shutil.copytree(legacy, live)
    renamed = {
        k.replace(".lora_A.", ".lora_A.default.")
        .replace(".lora_B.", ".lora_B.default.")
        .replace("embed_tokens.weight", "embed_tokens.modules_to_save.default.weight")
        .replace("lm_head.weight", "lm_head.modules_to_save.default.weight"): v
        for k, v in state.items()
    }
    torch.save(renamed, live / "adapter_model.bin")
    run_merge(world["base"], [world["first"]], tmp_path / "from_safetensors", "--no-verify")
    expected = all_tensors(tmp_path / "from_safetensors")
    for source in (legacy, live):
        out = tmp_path / f"from_{source.name}"
        summary = run_merge(world["base"], [source], out)  # verified through PEFT's own loader
        assert summary["verification"]["max_abs_logit_diff"] <= TOL
        got = all_tensors(out)
        assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)


def test_pth_output_round_trips_exactly(world, tmp_path):
    """Meta layout, 2 shards, odd vocabulary 403 -> output split [201, 202]; back to HF names bit for bit."""
    run_merge(world["base"], [world["first"], world["second"]], tmp_path / "hf", "--no-verify")
    summary = run_merge(
        world["base"], [world["first"], world["second"]], tmp_path / "pth", "--output_type", "pth", "--num_shards", "2"
    )
    assert summary["verification"]["max_abs_logit_diff"] <= TOL  # the pth, read back, against PEFT
    pth = tmp_path / "pth"
    assert sorted(p.name for p in pth.glob("consolidated.*.pth")) == ["consolidated.00.pth", "consolidated.01.pth"]
    assert not list(pth.glob(".slice-*"))
    params = json.loads((pth / "params.json").read_text())
    assert params == {
        "dim": 32,
        "multiple_of": 256,
        "n_heads": 4,
        "n_layers": 2,
        "norm_eps": 1e-6,
        "vocab_size": -1,
        "n_kv_heads": 2,
    }
    shards = [torch.load(str(pth / f"consolidated.0{k}.pth"), weights_only=True) for k in range(2)]
    assert [s["output.weight"].shape[0] for s in shards] == [201, 202]
    assert [tuple(s["tok_embeddings.weight"].shape) for s in shards] == [(403, 16), (403, 16)]
    assert tuple(shards[0]["layers.1.attention.wk.weight"].shape) == (8, 32)
    assert torch.equal(shards[0]["layers.0.attention_norm.weight"], shards[1]["layers.0.attention_norm.weight"])
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    back = meta.read_meta(pth, config)
    hf = load_model(tmp_path / "hf").state_dict()
    assert set(back) == set(hf)
    for name, tensor in back.items():
        assert torch.equal(tensor, hf[name]), name


def test_adapter_for_another_base_names_both_shapes(world, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=400,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    other = make_adapter(
        LlamaForCausalLM(config), tmp_path / "other_base_lora", None, targets=["q_proj"], modules_to_save=()
    )
    with pytest.raises(ZhtrainError, match=r"other_base_lora.*\[48, 48\].*\[32, 32\].*another base model"):
        run_merge(world["base"], [other], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_adapter_with_the_wrong_tokenizer_says_which_it_needs(world, tmp_path, sp_tokenizer_dir):
    wrong = tmp_path / "wrong_tokenizer_lora"
    shutil.copytree(world["second"], wrong)  # trained on 403 tokens...
    for name in ("tokenizer.json", "tokenizer_config.json"):  # ...but shipped with the 400-token tokenizer
        shutil.copyfile(sp_tokenizer_dir / name, wrong / name)
    with pytest.raises(
        ZhtrainError, match=r"wrong_tokenizer_lora.*\[403, 32\].*400 tokens.*needs a 403-token tokenizer"
    ):
        run_merge(world["base"], [world["first"], wrong], tmp_path / "out")


def test_grown_vocabulary_needs_a_tokenizer_of_its_size(world, tmp_path, sp_tokenizer_dir):
    """An adapter with 403 embedding rows but no tokenizer would leave the base's 400-token one beside
    a 403-row model (or none): refused before anything is written, naming the folder to fix."""
    bare = tmp_path / "bare_lora"
    shutil.copytree(world["second"], bare)  # trained on 403 tokens, its tokenizer files removed
    for path in bare.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens", "added_tokens")):
            path.unlink()
    with pytest.raises(
        ZhtrainError,
        match=r"merged model will have 403 tokens but the tokenizer in .*plus_lora has 400.*into .*bare_lora",
    ):
        run_merge(world["base"], [world["first"], bare], tmp_path / "out")
    with pytest.raises(
        ZhtrainError,
        match=r"merged model will have 403 tokens but none of the adapter folders holds a tokenizer.*bare_lora",
    ):
        run_merge(world["base"], [bare], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # With the training tokenizer put back, the same merge goes through.
    copy_tokenizer_files(world["tok403"], bare)
    assert run_merge(world["base"], [world["first"], bare], tmp_path / "out")["vocab_size"] == 403


@pytest.mark.parametrize(
    "patterns, message",
    [
        (["q_proj"], r"rank_pattern is list; it must be an object"),
        ({"q_proj(": 2}, r"rank_pattern key 'q_proj\(' is not a regular expression"),
        ({"q_proj": "two"}, r"rank_pattern\['q_proj'\] is 'two'"),
    ],
    ids=["list", "bad-regex", "not-a-number"],
)
def test_hand_edited_rank_pattern_is_one_line(world, tmp_path, patterns, message):
    edited = tmp_path / "edited_lora"
    shutil.copytree(world["first"], edited)
    config = json.loads((edited / "adapter_config.json").read_text())
    (edited / "adapter_config.json").write_text(json.dumps(dict(config, rank_pattern=patterns)))
    with pytest.raises(ZhtrainError, match=message):
        run_merge(world["base"], [edited], tmp_path / "out")


def test_pth_output_needs_the_config_sizes(world, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(world["base"], base)
    config = json.loads((base / "config.json").read_text())
    del config["hidden_size"]
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(ZhtrainError, match=r"config.json: no integer hidden_size; --output_type pth needs them"):
        run_merge(base, [world["first"]], tmp_path / "out", "--output_type", "pth")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda index: index.pop("metadata"), r"no 'metadata' object"),
        (lambda index: index.update(weight_map=list(index["weight_map"])), r"not a weight index"),
    ],
    ids=["no-metadata", "weight-map-a-list"],
)
def test_damaged_weight_index_is_one_line(world, tmp_path, edit, message):
    base = tmp_path / "base"
    shutil.copytree(world["base"], base)
    index = json.loads((base / "model.safetensors.index.json").read_text())
    edit(index)
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ZhtrainError, match=rf"model.safetensors.index.json: {message}"):
        run_merge(base, [world["first"]], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_adapter_config(world, tmp_path):
    broken = tmp_path / "no_config"
    shutil.copytree(world["first"], broken)
    (broken / "adapter_config.json").unlink()
    with pytest.raises(ZhtrainError, match=r"no_config: no adapter_config.json"):
        run_merge(world["base"], [broken], tmp_path / "out")


def test_order_that_would_shrink_the_vocabulary(world, tmp_path):
    with pytest.raises(
        ZhtrainError,
        match=r"would shrink the vocabulary.*alpaca_lora grows it to 403.*plus_lora needs a 400-token"
        r".*--lora_model .*plus_lora,.*alpaca_lora",
    ):
        run_merge(world["base"], [world["second"], world["first"]], tmp_path / "out")


def test_existing_output_dir_needs_overwrite(world, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(ZhtrainError, match=r"exists; pass --overwrite"):
        run_merge(world["base"], [world["first"]], out, "--no-verify")
    assert (out / "keep.txt").read_text() == "old"
    run_merge(world["base"], [world["first"]], out, "--no-verify", "--overwrite")
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


@pytest.mark.parametrize("failure", ["disk_full", "crash"])
def test_failure_mid_write_leaves_nothing_that_looks_complete(world, tmp_path, monkeypatch, failure):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")  # --overwrite: the old folder must survive a failed merge
    calls = []

    from zhtrain.weights import hf_folder as weights

    def failing_save(tensors, path, _real=weights.save_shard):
        calls.append(path)
        if len(calls) == 2:  # the second output shard
            raise OSError(errno.ENOSPC, "No space left on device") if failure == "disk_full" else RuntimeError("killed")
        return _real(tensors, path)

    monkeypatch.setattr(weights, "save_shard", failing_save)
    expected = (ZhtrainError, r"disk filled up") if failure == "disk_full" else (RuntimeError, "killed")
    with pytest.raises(expected[0], match=expected[1]):
        run_merge(world["base"], [world["first"]], out, "--overwrite", "--max_shard_size", "40KB")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp folder left behind
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_failed_verification_writes_nothing(world, tmp_path, monkeypatch):
    real = merge_module.merged_tensor

    def forgets_lora(plan, key, tensor):  # a merge bug: LoRA updates of v_proj dropped
        return tensor.float() if "v_proj" in key else real(plan, key, tensor)

    monkeypatch.setattr(merge_module, "merged_tensor", forgets_lora)
    with pytest.raises(ZhtrainError, match=r"verification failed: max \|logit difference\|"):
        run_merge(world["base"], [world["first"]], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_prints_one_line_and_exits_2(world, tmp_path, capsys):
    from zhtrain.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "merge",
                "--base_model",
                str(world["first"]),
                "--lora_model",
                str(world["first"]),
                "--output_dir",
                str(tmp_path / "o"),
            ]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("zhtrain: error:") and "LoRA adapter, not a model" in err


def test_targets_cover_all_seed_projections(world):
    config = json.loads((world["first"] / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == set(ALL_TARGETS)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_output(world, tmp_path, dtype):
    summary = run_merge(world["base"], [world["first"]], tmp_path / "half", "--dtype", dtype)
    tensors = all_tensors(tmp_path / "half")
    assert {str(t.dtype) for t in tensors.values()} == {f"torch.{dtype}"}
    assert json.loads((tmp_path / "half" / "config.json").read_text())["dtype"] == dtype
    check = summary["verification"]
    assert check["max_abs_logit_diff"] <= check["tolerance"]  # relative to the logits' scale for half precision
