"""The 2of12 word list (or a user's own list): where it comes from, how it is read, how it is named.

Loading rule (one rule, used everywhere): each line is stripped of surrounding whitespace,
blank lines are skipped, and a word already seen earlier in the file is dropped, so the
first occurrence keeps its id. Ids are 0..N-1 over the kept entries in file order. For the
shipped 2of12 list (41,242 lines, ``bout`` twice) that gives N = 41,241. Dropping the repeat
matters: a duplicated word would otherwise take two of a patch's n label slots and be drawn
twice as often by the SEA sampler.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from seacore.files import sha256_file  # noqa: F401  (the one file-hash helper, re-exported)

DEFAULT_NAME = "2of12.txt"
DEFAULT_SHA256 = "39f915f416469c79aa1fda230584f840d11aa3343681073dd5e97c864985ecca"
DEFAULT_LINES = 41_242
# Shipped inside the package (12dicts' 2of12 is public domain): nothing downloads it and
# nothing looks outside the installed package for it; the hash check still guards it.
DATA_DIR = Path(__file__).resolve().parent / "data"


class WordListError(ValueError):
    """A word list that cannot be used: wrong hash, empty, unreadable."""


@dataclass(frozen=True)
class WordList:
    words: tuple[str, ...]
    sha256: str  # of the file's bytes, so two runs agree on which list was used
    source: str

    def __len__(self) -> int:
        return len(self.words)

    def __getitem__(self, i: int) -> str:
        return self.words[i]

    def identity(self) -> dict:
        """What travels into shard metadata and cache keys."""
        return {"wordlist_sha256": self.sha256, "wordlist_size": len(self.words)}


def parse_words(text: str) -> tuple[str, ...]:
    seen: set[str] = set()
    words = []
    for line in text.splitlines():
        w = line.strip()
        if w and w not in seen:
            seen.add(w)
            words.append(w)
    return tuple(words)


def load_wordlist(path: str | os.PathLike | None = None, expect_sha256: str | None = None) -> WordList:
    """Load a word list. ``path=None`` means the default 2of12 list, hash-checked.

    A user's own list (UTF-8, one word per line) is loaded as is; pass ``expect_sha256`` to
    pin it too.
    """
    if path is None:
        path = ensure_default()
        expect_sha256 = DEFAULT_SHA256
    path = Path(path)
    if not path.is_file():
        raise WordListError(f"word list not found: {path}")
    digest = sha256_file(path)
    if expect_sha256 is not None and digest != expect_sha256:
        raise WordListError(
            f"word list {path} has sha256 {digest}, expected {expect_sha256}; "
            "the file was changed or is a different release"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise WordListError(f"word list {path} is not UTF-8: {e}") from e
    words = parse_words(text)
    if not words:
        raise WordListError(f"word list {path} has no words")
    return WordList(words=words, sha256=digest, source=str(path))


def _check(path: Path) -> None:
    digest = sha256_file(path)
    if digest != DEFAULT_SHA256:
        raise WordListError(
            f"{path} has sha256 {digest}, expected {DEFAULT_SHA256} (2of12, {DEFAULT_LINES} lines)"
        )


def ensure_default(dest_dir: Path = DATA_DIR) -> Path:
    """The shipped 2of12 list (``wordlist/data/2of12.txt``), hash-checked."""
    dest = dest_dir / DEFAULT_NAME
    if not dest.is_file():
        raise WordListError(f"{dest} is missing: the 2of12 list ships with the package; "
                            f"reinstall it (pip install -e .)")
    _check(dest)
    return dest
