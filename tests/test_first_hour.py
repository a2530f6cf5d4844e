"""A new user's mistakes end in one line naming the argument and the fix, with a non-zero exit
and no traceback, run through the command line as a person runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _cli(*args) -> tuple[int, str, str]:
    r = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    return r.returncode, r.stdout, r.stderr


def _one_line_error(rc: int, err: str, *needles: str) -> None:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert rc != 0 and "Traceback" not in err, err[-3000:]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, err[-3000:]
    for n in needles:
        assert n in errors[0], errors[0]


@pytest.mark.parametrize("patch,needle", [("9,9", "outside the"), ("a,b", "two integers"),
                                          ("3", "two integers")])
def test_show_with_a_bad_patch(label_run, patch, needle):
    import pyarrow.parquet as pq

    path = pq.read_table(sorted(Path(label_run).glob("shard-*.parquet"))[0]).column("path")[0].as_py()
    rc, _, err = _cli("pipeline", "show", "--shards", str(label_run), "--image", path, "--patch", patch)
    _one_line_error(rc, err, f"--patch {patch}", needle)


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory, tiny_clip, tiny_llm, sample, label_run):
    from seacore.config import load_config
    from trainer.config import PretrainConfig
    from trainer.train import train

    js, root = sample
    out = tmp_path_factory.mktemp("s1") / "run"
    cfg = load_config(PretrainConfig, None, [
        f"vision.model={tiny_clip}", "vision.pretrained=null", f"llm.path={tiny_llm}",
        f"data.json={js}", f"data.image_root={root}", f"data.shards={label_run}",
        "data.holdout_images=4", "data.num_workers=0", "optim.global_batch_size=4",
        "optim.micro_batch_size=2", "optim.max_steps=1", "log.progress=false",
        "log.report_to=[]", f"log.output={out}"])
    return train(cfg)["final"], next(Path(root).rglob("*.jpg"))


def test_generate_with_a_missing_image(stage1_run, tmp_path):
    run, _ = stage1_run
    rc, _, err = _cli("trainer", "generate", "--checkpoint", run, "--image", str(tmp_path / "missing.png"))
    _one_line_error(rc, err, "--image", "missing.png", "file not found")


def test_generate_with_a_file_that_is_not_an_image(stage1_run, tmp_path):
    run, _ = stage1_run
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    rc, _, err = _cli("trainer", "generate", "--checkpoint", run, "--image", str(bad))
    _one_line_error(rc, err, "--image", "notes.png", "cannot decode")


def test_a_prompt_to_a_stage1_model_is_named_not_dropped(stage1_run):
    run, image = stage1_run
    rc, out, err = _cli("trainer", "generate", "--checkpoint", run, "--image", str(image),
                        "--prompt", "What colour is it?", "--max-new-tokens", "3", "--device", "cpu")
    assert rc == 0, err[-2000:]
    notes = [ln for ln in err.splitlines() if "--prompt is not used" in ln]
    assert len(notes) == 1 and "stage-1" in notes[0]
