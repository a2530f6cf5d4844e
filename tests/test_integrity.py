"""Issue 12 (pipeline side): a run that did nothing or used bad input never ends with rc 0."""

import json

import pytest

from pipeline import shards
from pipeline.__main__ import main


def _args(cfg, *extra):
    """CLI overrides reproducing an extract_cfg config, plus ``extra``."""
    return ["extract", f"encoder.model={cfg.encoder.model}", "encoder.pretrained=null",
            f"input.json={cfg.input.json}", f"input.image_root={cfg.input.image_root}",
            f"run.output={cfg.run.output}", f"labels.text_cache_dir={cfg.labels.text_cache_dir}",
            "run.progress=false", "run.chunk_size=10", "run.batch_size=4", *extra]


@pytest.mark.parametrize("runner", ["local", "ray"])
def test_missing_image_root_fails_before_any_work(extract_cfg, tmp_path, capsys, runner):
    import ray

    cfg = extract_cfg(out=tmp_path / "out")
    rc = main(_args(cfg, f"input.image_root={tmp_path / 'nope'}", f"run.runner={runner}"))
    err = capsys.readouterr().err
    assert rc == 2 and "input.image_root" in err and str(tmp_path / "nope") in err
    assert not ray.is_initialized() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("content,want", [
    (None, "does not exist"),
    ("", "empty"),
    ('[{"id": "a", "image": "x.jpg"},\n {"id": "b" "image": "y.jpg"}]', "line 2 column"),
    ('{"id": "a", "image": "x.jpg"}', "not a list"),
    ("[]", "no sample"),
    ('[{"id": "a", "conversations": []}]', "no sample"),
])
def test_bad_input_json_is_an_error_naming_the_file(extract_cfg, tmp_path, capsys, content, want):
    js = tmp_path / "in.json"
    if content is not None:
        js.write_text(content)
    cfg = extract_cfg(out=tmp_path / "out")
    rc = main(_args(cfg, f"input.json={js}", "run.runner=ray"))
    err = capsys.readouterr().err
    assert rc == 2 and str(js) in err and want in err, err
    assert not (tmp_path / "out").exists()


def test_a_run_that_labels_nothing_exits_non_zero(extract_cfg, tmp_path, capsys):
    empty = tmp_path / "empty-root"
    empty.mkdir()
    cfg = extract_cfg(out=tmp_path / "out")
    rc = main(_args(cfg, f"input.image_root={empty}", "run.runner=local", "input.limit=6"))
    cap = capsys.readouterr()
    assert rc == 1 and "0 of 6 images labelled" in cap.err and "file not found: 6" in cap.err
    summary = json.loads(cap.out)
    assert summary["images_labelled"] == 0 and summary["errors_by_reason"] == {"file not found": 6}
    assert len((tmp_path / "out" / "errors.jsonl").read_text().splitlines()) == 6  # written


def test_error_rate_above_the_limit_exits_non_zero(extract_cfg, bad_corpus, tmp_path, capsys):
    bad_json, root, expected = bad_corpus  # 5 good images, 8 bad ones
    cfg = extract_cfg(f"input.json={bad_json}", f"input.image_root={root}", out=tmp_path / "o")
    args = _args(cfg, "input.max_pixels=1000000", "run.runner=local")
    assert main(args) == 1
    cap = capsys.readouterr()
    assert "8 of 13 images failed" in cap.err and "run.max_error_rate" in cap.err
    assert json.loads(cap.out)["errors_by_reason"]["cannot decode"] == 3
    assert main([*args, "run.max_error_rate=0.7"]) == 0  # same run, higher tolerance: accepted


def test_duplicate_and_null_ids_are_recorded_errors(extract_cfg, sample, tmp_path):
    from pipeline.extract import run_local

    js, root = sample
    items = json.loads(js.read_text())[:4]
    a, b, c, d = items
    rows = [a, b, {**c, "id": a["id"]},  # same id, another image: an error
            {**b},  # the same sample twice: labelled once, not an error
            {**d, "id": None}]  # id null: an error
    bad = tmp_path / "dups.json"
    bad.write_text(json.dumps(rows))
    out = tmp_path / "o"
    s = run_local(extract_cfg(f"input.json={bad}", out=out))
    errors = {e["path"]: e["reason"] for e in map(json.loads, (out / "errors.jsonl").read_text().splitlines())}
    assert set(errors) == {c["image"], d["image"]}
    assert "duplicate id" in errors[c["image"]] and a["image"] in errors[c["image"]]
    assert "id is null" in errors[d["image"]]
    got = sorted(r for rb in shards.iter_label_set(out) for r in rb.column("image_id").to_pylist())
    assert got == sorted([a["id"], b["id"]]) and s["images_failed"] == 2


def _lock_file(out, host, pid):
    import socket

    out.mkdir(parents=True, exist_ok=True)
    (out / ".lock").write_text(json.dumps({"host": host or socket.gethostname(), "pid": pid,
                                           "since": 0}))


@pytest.mark.parametrize("runner", ["local", "ray"])
def test_a_second_driver_on_the_same_output_exits_at_once(extract_cfg, tmp_path, capsys, runner):
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out = tmp_path / "out"
        _lock_file(out, None, holder.pid)
        (out / ".shard-000000.parquet.tmp123").write_bytes(b"the holder's temp shard")
        cfg = extract_cfg(out=out)
        rc = main(_args(cfg, f"run.runner={runner}", "input.limit=3"))
        err = capsys.readouterr().err
        assert rc == 2 and f"pid {holder.pid}" in err and "this host" in err
        assert (out / ".shard-000000.parquet.tmp123").exists()  # untouched
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_from_another_host_is_refused_naming_it(extract_cfg, tmp_path, capsys):
    out = tmp_path / "out"
    _lock_file(out, "gpu-node-7", 4242)
    rc = main(_args(extract_cfg(out=out), "run.runner=local", "input.limit=3"))
    err = capsys.readouterr().err
    assert rc == 2 and "gpu-node-7" in err and "pid 4242" in err and ".lock" in err


def test_a_stale_lock_of_a_dead_process_is_taken_over(extract_cfg, tmp_path, capsys):
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    _lock_file(out, None, dead.pid)
    assert main(_args(extract_cfg(out=out), "run.runner=local", "input.limit=3")) == 0
    assert not (out / ".lock").exists()  # released at the end


def _dead_port():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_an_unreachable_ray_address_is_a_quick_clear_error(extract_cfg, tmp_path, capsys):
    cfg = extract_cfg(out=tmp_path / "out")
    rc = main(_args(cfg, f"ray.address=127.0.0.1:{_dead_port()}", "ray.connect_timeout_s=5",
                    "input.limit=3"))
    err = capsys.readouterr().err
    assert rc == 2 and "cannot reach the Ray cluster" in err and "RAY_ADDRESS" in err
