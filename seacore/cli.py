"""Command-line habits shared by every command that takes a typed config.

- ``--config FILE`` and ``key.sub=value`` overrides (``seacore.config.load_config``);
- ``--print-config``: the resolved config (defaults, file, overrides) as YAML that loads back;
- ``--help-config`` (``seacore.config.describe``): every key with its value under ``--config`` and the overrides, its
  default when that differs, and its meaning;
- an unknown ``--flag`` names the key to use (``--learning_rate`` -> ``optim.lr=...``): from
  the command's table of familiar flag names (LLaVA / HF ``TrainingArguments``), else the
  closest key by spelling.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys

import yaml

from seacore.config import _field_types, _is_dataclass_type, to_dict


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (values there override the defaults)")
    p.add_argument("--help-config", action="store_true",
                   help="list every key with its resolved value (honours --config and overrides)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config as YAML and exit (it loads back with --config)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")


def keys(cls, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(cls):
        tp = _field_types(cls)[f.name]
        out += keys(tp, prefix + f.name + ".") if _is_dataclass_type(tp) else [prefix + f.name]
    return out


def suggest(flag: str, cls, aliases: dict[str, str] | None = None) -> str:
    """What to say about an unknown ``--flag``: the key it maps to, or the closest keys."""
    name = flag.lstrip("-").split("=", 1)[0]
    value = flag.split("=", 1)[1] if "=" in flag else "VALUE"
    norm = name.replace("-", "_")
    all_keys = keys(cls)
    if name in all_keys:  # `--optim.lr=1e-3`: right key, wrong form
        return f"unknown option {flag}: config keys take no dashes; write {name}={value}"
    hint = (aliases or {}).get(norm)
    if hint is not None:
        if hint in all_keys:
            return f"unknown option {flag}: did you mean {hint}={value}?"
        return f"unknown option {flag}: {hint}"
    leaves = {k.rsplit(".", 1)[-1]: k for k in all_keys}
    close = difflib.get_close_matches(norm, list(leaves), n=3, cutoff=0.6)
    close = [leaves[c] for c in close] or difflib.get_close_matches(norm, all_keys, n=3, cutoff=0.5)
    if close:
        return f"unknown option {flag}: did you mean {' or '.join(f'{k}={value}' for k in close)}?"
    return f"unknown option {flag}: config keys are set as key.sub=value; --help-config lists them"


def parse(parser: argparse.ArgumentParser, argv, cls_of, aliases: dict[str, str] | None = None):
    """``parse_known_args`` that turns a leftover ``--flag`` into a suggestion (exit 2).
    ``cls_of(args)`` is the config class of the chosen command (None: it has none)."""
    args, rest = parser.parse_known_args(argv)
    if rest:
        cls = cls_of(args)
        flags = [r for r in rest if r.startswith("-")]
        if flags and cls is not None:
            parser.exit(2, f"error: {suggest(flags[0], cls, aliases)}\n")
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


def print_config(cfg, out=None) -> None:
    (out or sys.stdout).write(yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None))


def exit_if_disk_full(e: OSError, folder, key: str) -> int:
    """rc 2 with ``disk_full``'s line on stderr; any other OSError is raised again."""
    full = disk_full(e, folder, key)
    if full is None:
        raise e
    print(f"error: {full}", file=sys.stderr)
    return 2


def disk_full(e: BaseException, folder, key: str) -> str | None:
    """One line for a write that ran out of space (also when Ray wraps the actor's OSError);
    None for any other error."""
    import errno

    if getattr(e, "errno", None) != errno.ENOSPC and "No space left on device" not in str(e):
        return None
    return (f"no space left on the device writing to {key} {folder}: free space there or point "
            f"{key} at a filesystem with room; rerun the same command to continue (finished "
            f"chunks and checkpoints are kept, a half-written one is redone)")
