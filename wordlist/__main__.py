"""`python -m wordlist fetch`: put the hash-checked 2of12 list in place (run by `make setup`)."""

import sys

from wordlist import ensure_default, load_wordlist


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["fetch"]:
        print("usage: python -m wordlist fetch", file=sys.stderr)
        return 2
    path = ensure_default()
    wl = load_wordlist()
    print(f"{path}: {len(wl)} words, sha256 {wl.sha256}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
