"""No test asserts a wall-clock time: speed is measured in `make bench`, not asserted where a
busy CI machine can fail it (a quick-evidence run once failed its own time limit that way)."""

from __future__ import annotations

import ast
from pathlib import Path

CLOCKS = ("seconds", "elapsed", "perf_counter", "monotonic", "time.time", "duration", "wall")


def _timing_asserts(source: str) -> list[int]:
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Assert) and isinstance(node.test, ast.Compare)):
            continue
        if any(isinstance(op, (ast.Lt, ast.LtE, ast.Gt, ast.GtE)) for op in node.test.ops):
            # a lower bound of zero says the field is recorded, not how fast anything ran
            zero = all(isinstance(c, ast.Constant) and c.value == 0 for c in node.test.comparators)
            # a set, list or dict literal is a comparison of keys (set(d) >= {"total_seconds"}),
            # not of a time
            operands = [node.test.left, *node.test.comparators]
            text = " ".join(ast.unparse(o) for o in operands
                            if not isinstance(o, ast.Set | ast.List | ast.Tuple | ast.Dict)).lower()
            if not zero and any(c in text for c in CLOCKS):
                lines.append(node.lineno)
    return lines


def test_the_checker_sees_a_timing_assert():
    assert _timing_asserts("assert res['total_seconds'] < 360\n") == [1]
    assert _timing_asserts("t0 = 1\nassert time.perf_counter() - t0 < 2\n") == [2]
    assert _timing_asserts("assert res['total_seconds'] > 0\nassert len(x) < 3\n") == []
    assert _timing_asserts("assert set(s) >= {'seeds', 'total_seconds'}\n") == []


def test_no_test_asserts_a_wall_clock_time():
    found = {p.name: ln for p in Path(__file__).parent.glob("*.py")
             if p.name != Path(__file__).name and (ln := _timing_asserts(p.read_text()))}
    assert not found, f"timing assertions (move them to bench/): {found}"
