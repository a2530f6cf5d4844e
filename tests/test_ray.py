"""The Ray runner on a real local Ray (not mocked)."""

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline import shards
from pipeline.extract import run_local
from pipeline.ray_runner import run_ray
from pipeline.rayhead import start_head, stop_head

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]


def _same_content(a: Path, b: Path):
    ma, mb = shards.read_manifest(a), shards.read_manifest(b)
    assert ma["shards"] and [s["rows"] for s in ma["shards"]] == [s["rows"] for s in mb["shards"]]
    assert ma["config_hash"] == mb["config_hash"]
    for s in ma["shards"]:
        ta, tb = pq.read_table(a / s["name"]), pq.read_table(b / s["name"])
        assert ta.equals(tb), s["name"]
        assert shards.read_metadata(a / s["name"]) == shards.read_metadata(b / s["name"])
    assert (a / "errors.jsonl").read_text() == (b / "errors.jsonl").read_text()


def _temp_entries() -> set[str]:
    return set(os.listdir(tempfile.gettempdir()))


def _cli_args(cfg, out):
    return [f"encoder.model={cfg.encoder.model}", "encoder.pretrained=null",
            f"input.json={cfg.input.json}", f"input.image_root={cfg.input.image_root}",
            f"run.output={out}", f"labels.text_cache_dir={cfg.labels.text_cache_dir}",
            "run.progress=false", "run.runner=ray", "run.chunk_size=2", "run.batch_size=1"]


def test_killed_driver_rerun_gives_the_uninterrupted_content(extract_cfg, tmp_path):
    ref = tmp_path / "ref"
    run_local(extract_cfg("run.chunk_size=2", "run.batch_size=1", out=ref))
    out = tmp_path / "killed"
    cfg = extract_cfg(out=out)
    # killed, it cleans nothing up: its temp files go to the test's folder (Ray's own session
    # folder stays where Ray puts it: its socket paths must stay short)
    (tmp_path / "tmp").mkdir()
    env = dict(os.environ, TMPDIR=str(tmp_path / "tmp"),
               RAY_TMPDIR=os.environ.get("RAY_TMPDIR", tempfile.gettempdir()))
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "extract", *_cli_args(cfg, out)],
                            cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 240
    while time.time() < deadline and not list(out.glob("shard-*.done")):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
    proc.wait()
    done_at_kill = len(list(out.glob("shard-*.done")))
    assert 0 < done_at_kill < 12, done_at_kill
    assert not (out / "manifest.json").exists()
    before = _temp_entries()
    r = subprocess.run([sys.executable, "-m", "pipeline", "extract", *_cli_args(cfg, out)],
                       cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    _same_content(ref, out)
    # nothing left in the machine's temp folder: Ray's workers are killed at shutdown, so what
    # their imports create there (wandb's temp folders, via open_clip -> timm) must go elsewhere
    assert [e for e in _temp_entries() - before if "wandb" in e] == []
    # quiet: no Ray notices (token auth, actor arguments in the object store), no warnings
    for noise in ("Token authentication", "core_worker", "WARNING", "Warning", "Started a local"):
        assert noise not in r.stderr, r.stderr[-3000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _argv0(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes().split(b"\0")[0]
    except OSError:  # the process ended between the listing and the read (CI saw it happen)
        return b""


def _gcs_pids() -> set[int]:
    if not Path("/proc").is_dir():
        return set()
    return {int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and b"gcs_server" in _argv0(p)}


def test_ray_head_submit_and_stop_only_its_own(extract_cfg, tmp_path):
    """`ray-up`'s head takes a `ray job submit` through the project's path; then, with a second
    head on the machine, stopping ours leaves the other running (`ray stop` would end both, and
    every other user's Ray with them). One test: each head costs half a minute to start."""
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16),
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    before = _gcs_pids()
    dash, gcs = _free_port(), _free_port()
    # short folders: Ray's socket paths have a length limit
    ours, other = (Path(tempfile.mkdtemp(prefix=f"sea-ray-{n}-")) for n in ("a", "b"))
    try:
        start_head(ours, gcs, dash, num_cpus=2, env=env)
        mine = _gcs_pids() - before
        out = tmp_path / "submitted"
        cfg = extract_cfg(out=out)
        r = subprocess.run([sys.executable, "-m", "pipeline", "submit", "--address",
                            f"http://127.0.0.1:{dash}", *_cli_args(cfg, out)[:-2]],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "succeeded" in (r.stdout + r.stderr)
        m = shards.read_manifest(out)
        assert m["complete"] and m["rows"] == 24
        if not Path("/proc").is_dir():
            return
        start_head(other, _free_port(), _free_port(), num_cpus=1, env=env)
        theirs = _gcs_pids() - before - mine
        assert len(theirs) == 1 and len(mine) == 1
        with pytest.raises(RuntimeError, match="still running"):
            start_head(ours, _free_port(), _free_port(), num_cpus=1, env=env)
        assert stop_head(ours) > 0
        alive = _gcs_pids()
        assert not (mine & alive), "our head's GCS survived ray-down"
        assert theirs <= alive, "ray-down stopped another Ray instance"
        assert stop_head(ours) == 0  # nothing left to stop
    finally:
        for d in (ours, other):
            stop_head(d)  # only these heads: never `ray stop`
            shutil.rmtree(d, ignore_errors=True)


# last in the file: the module's local Ray stays up until the module ends, and the tests
# above start Ray clusters of their own in subprocesses
@pytest.fixture(scope="module")
def local_ray(tiny_clip):
    """One local Ray, started exactly as the runner starts it, for the in-process Ray tests
    (the runner joins an initialised Ray and leaves it up): half a minute saved per test."""

    from pipeline.config import ExtractConfig
    from pipeline.ray_runner import init_ray, shutdown_ray
    from seacore.config import load_config

    started = init_ray(load_config(ExtractConfig, None, ["run.runner=ray"]))
    yield
    if started:
        shutdown_ray()


def test_ray_run_equals_in_process_run(extract_cfg, local_ray, tmp_path):
    local = run_local(extract_cfg(out=tmp_path / "local"))
    ray_s = run_ray(extract_cfg("run.runner=ray", out=tmp_path / "ray"))
    assert ray_s["runner"] == "ray" and ray_s["images_labelled"] == local["images_labelled"] == 24
    assert ray_s["steady_images_per_second"] > 0 and ray_s["first_shard_seconds"] >= ray_s["startup_seconds"]
    _same_content(tmp_path / "local", tmp_path / "ray")


def test_bad_corpus_through_ray(extract_cfg, bad_corpus, local_ray, tmp_path):
    from test_extract import check_bad_corpus

    bad_json, root, expected = bad_corpus
    s = run_ray(extract_cfg(f"input.json={bad_json}", f"input.image_root={root}",
                            "input.max_pixels=1000000", "run.runner=ray", out=tmp_path / "s"))
    check_bad_corpus(s, tmp_path / "s", expected)
