"""``python -m paper {write,table,list,run}``: the paper's rows (``paper.rows``).

``run ROW`` does a row on a cluster node, each step skipped when its result is there and
resumed when it was cut short: label extraction (a rerun keeps finished shards), stage 1 and
stage 2 per arm (``resume=latest``; done when ``final/`` exists) and the export for
evaluation (``exports/paper/<row>/<arm>``). ``--dry-run`` prints the commands.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from paper import configs as C
from paper import rows as R


@dataclass
class Step:
    name: str
    cmd: list[str]
    done: Path | None  # skipped when this exists
    note: str = ""


def _data_overrides(cfg: dict, section: str, keys: tuple[str, str], root: str) -> list[str]:
    if root.rstrip("/") == "data":
        return []
    import posixpath

    out = []
    for k in keys:  # every data path in the configs is data/<relative>
        rel = posixpath.relpath(cfg[section][k], "data")
        out.append(f"{section}.{k}={posixpath.normpath(posixpath.join(root, rel))}")
    return out


def plan(row: R.Row, data_root: str = "data", nproc: int = 1, exports: str = "exports/paper",
         python: str = sys.executable) -> list[Step]:
    cfg_dir = C.CONFIG_DIR
    ex = C.extract(row)
    steps = [Step("labels", [python, "-m", "pipeline", "extract", "--config",
                             str(cfg_dir / row.extract_config),
                             *_data_overrides(ex, "input", ("json", "image_root"), data_root)],
                  Path(C.shards_dir(row)) / "manifest.json")]
    launch = ([python, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
              if nproc > 1 else [python])
    for arm in row.arms:
        if arm.pretrain_from is None:
            pre = C.pretrain(row, arm)
            steps.append(Step(f"{arm.name}: stage 1", [
                *launch, "-m", "trainer", "pretrain", "--config",
                str(cfg_dir / row.name / f"{arm.name}-pretrain.yaml"), "resume=latest",
                *_data_overrides(pre, "data", ("json", "image_root"), data_root)],
                Path(pre["log"]["output"]) / "final" / "sea_model.json"))
        ft = C.finetune(row, arm)
        steps.append(Step(f"{arm.name}: stage 2", [
            *launch, "-m", "trainer", "finetune", "--config",
            str(cfg_dir / row.name / f"{arm.name}-finetune.yaml"), "resume=latest",
            *_data_overrides(ft, "data", ("json", "image_root"), data_root)],
            Path(ft["log"]["output"]) / "final" / "sea_model.json"))
        out = Path(exports) / row.name / arm.name
        if row.tower.startswith("siglip"):
            steps.append(Step(f"{arm.name}: export", [], None,
                              note="no export: transformers' LLaVA cannot hold open_clip's SigLIP "
                                   "tower; evaluate with `python -m trainer generate`"))
        else:
            fmt = "llava" if row.s2_scales else "hf-llava"
            steps.append(Step(f"{arm.name}: export ({fmt})", [
                python, "-m", "trainer", "export", "--run", ft["log"]["output"], "--format", fmt,
                "--out", str(out)], out / "config.json"))
    return steps


def run(steps: list[Step], dry_run: bool = False) -> int:
    for s in steps:
        if not s.cmd:
            print(f"# {s.name}: {s.note}")
            continue
        if s.done is not None and s.done.exists():
            print(f"# {s.name}: done ({s.done})")
            continue
        print(f"# {s.name}\n{shlex.join(s.cmd)}", flush=True)
        if dry_run:
            continue
        rc = subprocess.call(s.cmd)
        if rc != 0:
            print(f"error: step '{s.name}' failed (exit {rc}); rerun the same command to resume",
                  file=sys.stderr)
            return rc
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m paper", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("write", help="write configs/paper/ from paper/rows.py")
    sub.add_parser("table", help="the row table of docs/paper.md with the paper's numbers")
    sub.add_parser("list", help="the rows")
    r = sub.add_parser("run", help="extraction, stage 1, stage 2 and export of a row")
    r.add_argument("row", choices=sorted(R.ROWS))
    r.add_argument("--data-root", default="data", help="folder holding the data sets (README)")
    r.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per training step")
    r.add_argument("--exports", default="exports/paper", help="where the exported models go")
    r.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = p.parse_args(argv)
    if args.cmd == "write":
        for path in C.write():
            print(path)
    elif args.cmd == "table":
        print(C.table())
    elif args.cmd == "list":
        for name, row in R.ROWS.items():
            print(f"{name}  ({row.table}; arms: {', '.join(a.name for a in row.arms)})")
    else:
        return run(plan(R.ROWS[args.row], args.data_root, args.nproc, args.exports),
                   args.dry_run)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
