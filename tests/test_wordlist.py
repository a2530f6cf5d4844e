import hashlib
from pathlib import Path

import pytest

import wordlist
from wordlist import DEFAULT_SHA256, WordListError, load_wordlist, parse_words


def test_default_list_is_hash_checked_and_deduplicated():
    wl = load_wordlist()
    assert wl.sha256 == DEFAULT_SHA256
    raw = Path(wl.source).read_text(encoding="utf-8").splitlines()
    assert len(raw) == 41_242
    # one documented rule: the repeated 'bout' keeps its first id, so 41,241 entries
    assert len(wl) == 41_241
    assert wl.words.count("bout") == 1
    assert wl.words[:3] == ("a", "aardvark", "abaci")
    assert wl.words.index("bout") == raw.index("bout")  # ids follow file order
    assert wl.identity() == {"wordlist_sha256": DEFAULT_SHA256, "wordlist_size": 41_241}


def test_rule_strips_skips_blanks_and_repeats():
    assert parse_words("  cat \n\n dog\ncat\n\t\nemu  \n") == ("cat", "dog", "emu")


def test_tampered_default_is_refused(tmp_path, monkeypatch):
    src = load_wordlist().source
    bad = tmp_path / "2of12.txt"
    bad.write_bytes(Path(src).read_bytes().replace(b"aardvark", b"aardwolf"))
    with pytest.raises(WordListError) as e:
        load_wordlist(bad, expect_sha256=DEFAULT_SHA256)
    got = hashlib.sha256(bad.read_bytes()).hexdigest()
    assert got in str(e.value) and DEFAULT_SHA256 in str(e.value)
    # and ensure_default refuses a tampered SEA_WORDLIST source without installing it
    monkeypatch.setenv("SEA_WORDLIST", str(bad))
    with pytest.raises(WordListError, match=got):
        wordlist.ensure_default(tmp_path / "data")
    assert not (tmp_path / "data" / "2of12.txt").exists()


def test_ensure_default_copies_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SEA_WORDLIST", load_wordlist().source)
    path = wordlist.ensure_default(tmp_path / "data")
    assert wordlist.sha256_file(path) == DEFAULT_SHA256


def test_user_list_and_empty_list(tmp_path):
    own = tmp_path / "mine.txt"
    own.write_text("zebra\ncafé\nzebra\n", encoding="utf-8")
    wl = load_wordlist(own)
    assert wl.words == ("zebra", "café") and len(wl) == 2
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(WordListError, match="no words"):
        load_wordlist(empty)
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(WordListError, match="not UTF-8"):
        load_wordlist(latin)
