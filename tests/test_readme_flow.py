"""The README's flow as a user runs it, on tiny models, each command through its command line:
show, stats, gallery, pretrain (lambda 0 and 1), eval-align, finetune, generate, export, report,
plot.
Every command exits 0 and prints no warning line (the demo itself is `make demo`; its own
output is checked by hand and in the notes)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
NOISE = re.compile(r"\bwarn(ing)?\b|deprecat|Loading weights|Traceback", re.I)


def _run(*args) -> str:
    r = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, (args, r.stderr[-3000:])
    noisy = [ln for ln in (r.stdout + r.stderr).splitlines() if NOISE.search(ln)]
    assert noisy == [], (args[:2], noisy)
    return r.stdout


@pytest.mark.slow
def test_the_readme_flow_is_quiet(tiny_clip, tiny_llm, sample, label_run, instruct_json, tmp_path):
    js, root = sample
    path = pq.read_table(sorted(Path(label_run).glob("shard-*.parquet"))[0]).column("path")[0].as_py()
    _run("pipeline", "show", "--shards", str(label_run), "--image", path)
    _run("pipeline", "show", "--shards", str(label_run), "--image", path, "--patch", "1,2")
    _run("pipeline", "stats", "--shards", str(label_run), "--out", str(tmp_path / "stats"))
    _run("pipeline", "gallery", "--shards", str(label_run), "--out", str(tmp_path / "gallery"))
    common = [f"vision.model={tiny_clip}", "vision.pretrained=null", f"llm.path={tiny_llm}",
              f"data.image_root={root}", "optim.global_batch_size=4", "optim.micro_batch_size=2",
              "log.progress=false", "log.report_to=[]"]
    runs = {}
    for w in ("0", "1"):
        runs[w] = tmp_path / f"s1-lambda{w}"
        _run("trainer", "pretrain", *common, f"data.json={js}", f"data.shards={label_run}",
             "data.holdout_images=4", "optim.max_steps=2", f"sea.weight={w}",
             f"log.output={runs[w]}")
    _run("trainer", "eval-align", "--checkpoint", str(runs["1"]))  # the run's own config
    s2 = tmp_path / "s2"
    _run("trainer", "finetune", *common, f"data.json={instruct_json}", "optim.max_steps=2",
         f"init_from={runs['1']}", f"log.output={s2}")
    image = next(Path(root).rglob("*.jpg"))
    _run("trainer", "generate", "--checkpoint", str(s2), "--image", str(image), "--prompt",
         "What is this?", "--max-new-tokens", "3", "--device", "cpu")
    _run("trainer", "export", "--run", str(s2), "--format", "hf-llava", "--out", str(tmp_path / "hf"))
    _run("trainer", "report", "--runs", str(runs["0"]), str(runs["1"]), "--shards", str(label_run),
         "--out", str(tmp_path / "report"), "--images", "2")
    _run("trainer", "plot", str(runs["0"]), str(runs["1"]), "--out", str(tmp_path / "curves.png"))
    assert (tmp_path / "report" / "alignment.html").is_file() and (tmp_path / "curves.png").is_file()
