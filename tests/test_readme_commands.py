"""Every command the README shows is one our parsers accept, and one a test runs.

The README's commands (its fenced code blocks' ``python -m`` and ``make`` lines) are parsed
with the real argument parsers (``python -m pipeline`` / ``trainer`` / ``world``), so a renamed
flag or subcommand fails here; ``make`` lines are expanded with ``make -n``; and each
(module, subcommand) the README shows must be called by some test through its command line
(a quoted ``"subcommand"`` in a test file next to its module), so no README command goes
untried. Running them all for real is the flow tests' work (test_readme_flow, test_first_hour).
"""

from __future__ import annotations

import importlib
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"```(?:bash|sh|console)?\n(.*?)```", re.S)


def readme_commands() -> list[str]:
    out = []
    for block in FENCE.findall((REPO / "README.md").read_text()):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split(" # ")[0].strip()
            if line.startswith(("python -m ", "make ")):
                out.append(line)
    return out


def test_the_readme_shows_commands():
    cmds = readme_commands()
    assert len([c for c in cmds if c.startswith("python -m")]) >= 10 and any(c.startswith("make ") for c in cmds)


def _parse(line: str):
    argv = shlex.split(line)[2:]  # drop "python -m"
    module, rest = argv[0], argv[1:]
    parser = importlib.import_module(f"{module}.__main__")._parser()
    return module, parser.parse_known_args(rest)


@pytest.mark.parametrize("line", [c for c in readme_commands() if c.startswith("python -m")])
def test_each_python_command_parses(line):
    module, (args, unknown) = _parse(line)
    # what the parser did not take must be key=value overrides, never an unknown flag
    assert all("=" in u and not u.startswith("-") for u in unknown), (line, unknown)
    assert getattr(args, "cmd", None), line


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize("line", [c for c in readme_commands() if c.startswith("make ")])
def test_each_make_command_expands(line):
    argv = shlex.split(line)
    r = subprocess.run(["make", "-n", "-W", ".venv/.installed", *argv[1:]], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, (line, r.stderr)
    target = argv[1]
    expected = {"labels": "pipeline extract", "train-pretrain": "trainer pretrain",
                "train-finetune": "trainer finetune", "demo": "world demo", "test": "pytest",
                "evidence": "world", "bench": "bench.py"}.get(target)
    assert expected is None or expected in r.stdout, (line, r.stdout[-500:])
    for kv in argv[2:]:  # every VAR=value the README passes reaches the command
        if "=" in kv and kv.split("=", 1)[0] in ("CONFIG", "TRAIN_CONFIG", "FT_CONFIG"):
            assert kv.split("=", 1)[1] in r.stdout, (line, kv)


def test_each_readme_subcommand_is_run_by_a_test():
    tests = {p.name: p.read_text() for p in (REPO / "tests").glob("test_*.py")}
    missing = []
    for line in readme_commands():
        if not line.startswith("python -m"):
            continue
        module, (args, _) = _parse(line)
        sub = args.cmd
        runs = [n for n, text in tests.items() if n != Path(__file__).name
                and f'"{sub}"' in text and module in text]
        if not runs:
            missing.append(f"{module} {sub}")
    assert missing == [], f"README commands no test runs: {missing}"


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_demo_installs_what_the_demo_needs_only():
    """Issue 36: `make demo` installs the project (and tensorboard, the default logger), not
    the test tools; `make test` adds them."""
    def installs(target: str) -> list[str]:
        r = subprocess.run(["make", "-n", "-B", target], cwd=REPO, capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, r.stderr
        return [x for x in r.stdout.splitlines() if "pip install" in x and " -e " in x]

    demo, test = installs("demo"), installs("test")
    assert demo and not any("dev" in x for x in demo), demo
    assert any("dev" in x for x in test), test


def _config_class(line: str):
    from pipeline.config import ExtractConfig
    from trainer.config import FinetuneConfig, PretrainConfig

    for key, cls in (("pipeline extract", ExtractConfig), ("make labels", ExtractConfig),
                     ("trainer pretrain", PretrainConfig), ("train-pretrain", PretrainConfig),
                     ("trainer finetune", FinetuneConfig), ("train-finetune", FinetuneConfig)):
        if key in line:
            return cls
    return None


@pytest.mark.parametrize("line", [c for c in readme_commands() if _config_class(c) is not None])
def test_every_readme_key_is_a_real_config_key(line):
    """Issue 36: each ``key=value`` of a README line (in ARGS='...' too) loads into the real
    config of its command, so a misspelt key fails here (the parsers take any key=value)."""
    from seacore.config import load_config

    words = shlex.split(line)
    pairs = []
    for w in words:
        if w.startswith("ARGS="):
            pairs += shlex.split(w[len("ARGS="):])
        elif "=" in w and not w.startswith("-") and w.split("=", 1)[0].islower():
            pairs.append(w)
    pairs = [p for p in pairs if "." in p.split("=", 1)[0] or p.split("=", 1)[0] in (
        "resume", "init_from", "device")]
    assert pairs or "--help" in line, line
    load_config(_config_class(line), None, pairs)  # raises ConfigError naming an unknown key
