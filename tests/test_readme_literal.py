"""Issue 36: the README's commands run as written, in order, with tiny stand-ins.

The README's Labels, Train and Look blocks are read from README.md and run line by line in a
temporary folder (the README's relative folders, ``shards/`` and ``runs/``, land there), with
exactly these substitutions and nothing else:

- the model and data paths the README names: ``/models/vicuna-7b-v1.5`` -> the tiny LLM,
  ``/data/blip_laion_cc_sbu_558k.json`` -> the sample's captions, ``/data/llava_v1_5_mix665k.json``
  -> its conversations, ``/data/images`` -> its images, ``cat.jpg`` -> one of them,
  ``s3://my-bucket`` -> a bucket on the local S3 endpoint holding the same files;
- ``NPROC=8`` -> ``NPROC=1``;
- the shipped configs (``configs/extract.yaml``, ``configs/pretrain.yaml``,
  ``configs/finetune.yaml``) -> copies with the tiny tower and small batches (each copy is the
  shipped file with only ``encoder.*`` / ``vision.*``, batch sizes, holdout, workers, eval and
  chunk sizes changed); ``make`` lines get them as ``CONFIG=`` / ``TRAIN_CONFIG=`` /
  ``FT_CONFIG=`` after the README's own words.

Lines that are alternatives to an earlier line rather than steps (the Labels block's other
forms: another run into the same folder would be refused by design) are named in SKIP. Every
other line of the three blocks runs, and must exit 0.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_readme_commands import FENCE

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
SKIP = ("labels.top_n=10", "input.tars=", "--help-config")  # Labels: alternatives, not steps


def _block(title: str) -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
    lines = []
    for block in FENCE.findall(section):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  # ")[0].strip()
            if line and not any(s in line for s in SKIP):
                lines.append(line)
    return lines


def _tiny_config(name: str, dst: Path, changes: dict) -> Path:
    cfg = yaml.safe_load((REPO / "configs" / name).read_text())
    for key, value in changes.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    dst.write_text(yaml.safe_dump(cfg))
    return dst


def test_the_readme_runs_as_written(tiny_clip, tiny_llm, sample, instruct_json, text_cache,
                                    bucket, tmp_path):
    name, client = bucket
    js, root = sample
    work = tmp_path / "work"
    work.mkdir()
    for entry in (".venv", "Makefile", "pyproject.toml", "configs"):  # what make reads
        (work / entry).symlink_to(REPO / entry)
    tower = {"model": tiny_clip, "pretrained": None}
    small = {"optim.global_batch_size": 4, "optim.micro_batch_size": 2, "data.num_workers": 0,
             "data.holdout_images": 4, "log.eval_every": 0, "log.save_every": 2,
             "log.progress": False, "log.report_to": []}
    configs = {
        "configs/extract.yaml": _tiny_config("extract.yaml", tmp_path / "extract.yaml", {
            "encoder.model": tiny_clip, "encoder.pretrained": None, "run.chunk_size": 10,
            "run.batch_size": 4, "run.runner": "local", "run.progress": False,
            "labels.text_cache_dir": str(text_cache)}),
        "configs/pretrain.yaml": _tiny_config("pretrain.yaml", tmp_path / "pretrain.yaml", {
            **{f"vision.{k}": v for k, v in tower.items()}, **small}),
        "configs/finetune.yaml": _tiny_config("finetune.yaml", tmp_path / "finetune.yaml", {
            **{f"vision.{k}": v for k, v in tower.items()}, **small, "data.holdout_images": 0}),
    }
    image = next(Path(root).rglob("*.jpg"))
    subs = {"/models/vicuna-7b-v1.5": str(tiny_llm), "/data/blip_laion_cc_sbu_558k.json": str(js),
            "/data/llava_v1_5_mix665k.json": str(instruct_json), "/data/images": str(root),
            "cat.jpg": str(image), "s3://my-bucket": f"s3://{name}", "NPROC=8": "NPROC=1",
            **{k: str(v) for k, v in configs.items()}}
    make_vars = [f"CONFIG={configs['configs/extract.yaml']}",
                 f"TRAIN_CONFIG={configs['configs/pretrain.yaml']}",
                 f"FT_CONFIG={configs['configs/finetune.yaml']}"]
    # the bucket the README's s3:// lines read: LLaVA's files as they are, under llava/
    for p in sorted(Path(root).rglob("*")):
        if p.is_file():
            client.upload_file(str(p), name, f"llava/images/{p.relative_to(root).as_posix()}")
    client.upload_file(str(js), name, "llava/blip_laion_cc_sbu_558k.json")

    ran = []
    for title in ("Labels for your images", "Train", "Look at the results"):
        for line in _block(title):
            text = line
            for old, new in subs.items():
                text = text.replace(old, new)
            argv = shlex.split(text)
            if argv[0] == "make":
                argv += make_vars
            elif argv[:2] == ["python", "-m"]:
                argv[0] = sys.executable
            env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline")
            r = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True,
                               timeout=600)
            assert r.returncode == 0, f"README line failed:\n{line}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
            ran.append(line)
    # every step of the Train and Look blocks ran, and left what the next ones read
    assert len([x for x in ran if "train-" in x]) >= 5 and len(ran) >= 12
    for run in ("pretrain-sea", "pretrain-lambda0", "finetune-sea", "pretrain-sea-bucket"):
        assert (work / "runs" / run / "final").is_dir(), run
    assert (work / "report" / "alignment.html").is_file() and (work / "curves.png").is_file()
    assert (work / "hf-model" / "config.json").is_file()
    objects = client.list_objects_v2(Bucket=name, Prefix="labels/run1/").get("Contents", [])
    assert any(re.search(r"shard-\d+\.parquet$", o["Key"]) for o in objects)
