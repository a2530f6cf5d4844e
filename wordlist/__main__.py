"""`python -m wordlist check`: the shipped 2of12 list's path, size and hash, checked (run by
`make setup`)."""

import sys

from wordlist import ensure_default, load_wordlist


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["check"]:
        print("usage: python -m wordlist check", file=sys.stderr)
        return 2
    path = ensure_default()
    wl = load_wordlist()
    print(f"{path}: {len(wl)} words, sha256 {wl.sha256}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
