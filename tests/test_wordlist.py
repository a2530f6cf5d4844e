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
    # and the default itself, altered in place, is refused
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "2of12.txt").write_bytes(bad.read_bytes())
    with pytest.raises(WordListError, match=got):
        wordlist.ensure_default(tmp_path / "data")


def test_the_default_list_ships_in_the_package_and_nothing_fetches_it(monkeypatch):
    """Issue 36: the list is the package's own file (tracked by git), read without network
    or any folder outside the package (it used to look in ../shared, then download)."""
    import subprocess
    import urllib.request

    def no_network(*a, **k):
        raise AssertionError("the word list must not be downloaded")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    path = wordlist.ensure_default()
    assert path.parent == wordlist.DATA_DIR and path.is_relative_to(Path(wordlist.__file__).parent)
    repo = Path(wordlist.__file__).resolve().parents[1]
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", str(path)], cwd=repo,
                             capture_output=True)
    assert tracked.returncode == 0, "wordlist/data/2of12.txt is not committed"
    assert not hasattr(wordlist, "SHARED_COPY")


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
