"""Issue 35: data where it lives. Extraction in from and out to a bucket, webdataset tars,
one writer per bucket output, a kill during the upload, and training from a bucket through a
cache smaller than the label set: all against a real S3 endpoint (moto's server mode on
127.0.0.1, ``s3_server`` in conftest.py), reached over HTTP by the real clients."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import yaml

from pipeline import shards
from pipeline.extract import run_local
from pipeline.lock import ObjectLease
from seacore.config import to_dict

ROOT = Path(__file__).resolve().parents[1]


def _upload(client, bucket: str, prefix: str, folder: Path) -> None:
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            client.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(folder).as_posix()}")


def _objects(client, bucket: str, prefix: str) -> dict[str, bytes]:
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for o in page.get("Contents", []):
            out[o["Key"][len(prefix) + 1:]] = client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
    return out


def _local_shards(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.parquet"))}


def _in_bucket(sample, bucket):
    name, client = bucket
    js, root = sample
    _upload(client, name, "data/images", Path(root))
    client.upload_file(str(js), name, "data/sample.json")
    return [f"input.json=s3://{name}/data/sample.json", f"input.image_root=s3://{name}/data/images"]


def test_extraction_from_a_bucket_to_a_bucket_matches_the_local_run(extract_cfg, sample, bucket, tmp_path):
    name, client = bucket
    local = run_local(extract_cfg(out=tmp_path / "local"))
    s = run_local(extract_cfg(*_in_bucket(sample, bucket), out=f"s3://{name}/labels/run"))
    assert s["images_labelled"] == local["images_labelled"] == 24 and s["complete"]
    got = _objects(client, name, "labels/run")
    want = _local_shards(tmp_path / "local")
    assert {k: v for k, v in got.items() if k.endswith(".parquet")} == want  # byte-identical
    assert {f"shard-{i:06d}.done" for i in range(3)} <= set(got)
    assert {"manifest.json", "errors.jsonl", "run.json"} <= set(got) and ".lock" not in got
    man = json.loads(got["manifest.json"])
    assert [e["sha256"] for e in man["shards"]] == [
        e["sha256"] for e in shards.read_manifest(tmp_path / "local")["shards"]]
    # the whole label set reads back through the storage layer, metadata checked
    rows = sum(rb.num_rows for rb in shards.iter_label_set(f"s3://{name}/labels/run"))
    assert rows == 24
    # a second run into the same bucket output has nothing to do
    assert run_local(extract_cfg(*_in_bucket(sample, bucket),
                                 out=f"s3://{name}/labels/run"))["images_processed_this_run"] == 0


def test_a_missing_bucket_input_is_an_input_error(extract_cfg, bucket):
    from pipeline.data import InputError

    name, _ = bucket
    with pytest.raises(InputError, match=rf"input.image_root: s3://{name}/nothing is not a folder"):
        run_local(extract_cfg(f"input.image_root=s3://{name}/nothing", out=f"s3://{name}/o"))


def _cli_config(cfg, tmp_path) -> Path:
    path = tmp_path / "extract.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    return path


def _cli(config: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline", "extract", "--config", str(config)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def test_a_kill_during_the_upload_then_a_rerun_gives_each_shard_exactly_once(
        extract_cfg, sample, bucket, tmp_path):
    """kill -9 of the driver as soon as the first shard object appears in the bucket (its
    upload just done, its read-back and marker not yet, or a little later), then a rerun:
    every chunk's shard exactly once, byte-identical to an uninterrupted local run."""
    name, client = bucket
    clean = run_local(extract_cfg("run.chunk_size=4", out=tmp_path / "local"))
    cfg = extract_cfg("run.chunk_size=4", *_in_bucket(sample, bucket), out=f"s3://{name}/labels/run")
    proc = _cli(_cli_config(cfg, tmp_path))
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        listed = client.list_objects_v2(Bucket=name, Prefix="labels/run/shard-").get("Contents", [])
        if any(o["Key"].endswith(".parquet") for o in listed):
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.communicate()}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _objects(client, name, "labels/run")
    markers = sorted(k for k in before if k.endswith(".done"))
    assert len(markers) < 6 and ".lock" in before  # killed mid-run, its lease left behind
    s = run_local(cfg)  # takes over the dead driver's lease (this host, pid gone)
    assert s["complete"] and s["images_labelled"] == 24 == clean["images_labelled"]
    assert s["images_processed_this_run"] == 24 - 4 * len(markers)
    after = _objects(client, name, "labels/run")
    assert {k: v for k, v in after.items() if k.endswith(".parquet")} == _local_shards(tmp_path / "local")
    ids = [i for rb in shards.iter_label_set(f"s3://{name}/labels/run")
           for i in rb.column("image_id").to_pylist()]
    assert len(ids) == len(set(ids)) == 24 and ".lock" not in after


def test_a_second_driver_on_a_bucket_output_is_refused(extract_cfg, sample, bucket, tmp_path):
    name, client = bucket
    cfg = extract_cfg(*_in_bucket(sample, bucket), out=f"s3://{name}/labels/run")
    with ObjectLease(f"s3://{name}/labels/run", settle=0.1) as lease:  # a live driver (this process)
        proc = _cli(_cli_config(cfg, tmp_path))
        out, err = proc.communicate(timeout=120)
        assert proc.returncode != 0
        assert f"in use by pid {os.getpid()}" in err and "one writer per folder" in err
        assert lease.held
    assert "labels/run/shard-000000.parquet" not in _objects(client, name, "labels")
    # a lease left by a driver on another host, not renewed for longer than its ttl: taken over
    client.put_object(Bucket=name, Key="labels/run/.lock", Body=json.dumps(
        {"host": "elsewhere", "pid": 1, "token": "x", "since": 0, "renewed": time.time() - 999,
         "ttl": 300}).encode())
    assert run_local(cfg)["complete"]
    # and one renewed a moment ago is not
    client.put_object(Bucket=name, Key="labels/run/.lock", Body=json.dumps(
        {"host": "elsewhere", "pid": 1, "token": "x", "since": 0, "renewed": time.time(),
         "ttl": 300}).encode())
    from pipeline.lock import FolderLocked

    with pytest.raises(FolderLocked, match="host elsewhere"):
        run_local(cfg)


def test_an_altered_object_is_named_and_refused(pretrain_cfg, label_run, sample, bucket, tmp_path):
    from trainer.train import train

    name, client = bucket
    _upload(client, name, "labels", label_run)
    key = f"labels/{shards.shard_name(1)}"
    data = bytearray(client.get_object(Bucket=name, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0x10  # same size: only the hash can tell
    client.put_object(Bucket=name, Key=key, Body=bytes(data))
    cfg = pretrain_cfg(f"data.shards=s3://{name}/labels", f"data.cache_dir={tmp_path / 'cache'}")
    with pytest.raises(shards.ShardMismatch, match=rf"s3://{name}/labels/shard-000001.parquet.*sha256"):
        train(cfg, "pretrain")
    assert not (tmp_path / "run" / "final").exists()


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line]


def test_training_from_a_bucket_through_a_cache_smaller_than_the_labels(
        pretrain_cfg, label_run, sample, bucket, tmp_path):
    """Labels, images and the JSON in the bucket; a cache that holds about one shard of
    three: the run matches the one from local files loss for loss."""
    from trainer.train import train

    name, client = bucket
    js, root = sample
    _upload(client, name, "labels", label_run)
    _upload(client, name, "data/images", Path(root))
    client.upload_file(str(js), name, "data/sample.json")
    sizes = [e["bytes"] for e in shards.read_manifest(label_run)["shards"]]
    limit = 1.5 * max(sizes) / (1 << 30)
    local = pretrain_cfg("log.every=1", f"log.output={tmp_path / 'local'}")
    train(local, "pretrain")
    remote = pretrain_cfg("log.every=1", f"log.output={tmp_path / 'remote'}",
                          f"data.shards=s3://{name}/labels", f"data.json=s3://{name}/data/sample.json",
                          f"data.image_root=s3://{name}/data/images",
                          f"data.cache_dir={tmp_path / 'cache'}", f"data.cache_limit_gb={limit}")
    out = train(remote, "pretrain")
    assert out["samples"] == 20
    assert _losses(tmp_path / "remote") == pytest.approx(_losses(tmp_path / "local"), rel=1e-6)
    cached = [p for p in (tmp_path / "cache").rglob("shard-*.parquet")]
    assert 1 <= len(cached) < len(sizes)  # evicted as it went
    assert sum(p.stat().st_size for p in cached) <= limit * (1 << 30)


# --- webdataset tars ------------------------------------------------------------------------


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _make_tars(sample, folder: Path) -> dict[str, str]:
    """img2dataset's layout from the sample's 24 images: 00000.tar (images 0-11, plus a
    member that does not decode and a key with no image), 00001.tar (12-23), 00002.tar cut
    short. Returns image key -> the image's path in the sample."""
    js, root = sample
    items = json.loads(Path(js).read_text())
    folder.mkdir(parents=True, exist_ok=True)
    keys = {}
    for t, part in enumerate((items[:12], items[12:])):
        with tarfile.open(folder / f"{t:05d}.tar", "w") as tf:
            for it in part:
                k = it["id"]
                keys[k] = it["image"]
                _add(tf, f"{k}.jpg", (Path(root) / it["image"]).read_bytes())
                _add(tf, f"{k}.txt", it["conversations"][1]["value"].encode())
                _add(tf, f"{k}.json", json.dumps({"key": k}).encode())
            if t == 0:
                _add(tf, "broken0001.jpg", b"\xff\xd8 not a jpeg")
                _add(tf, "noimage0001.json", b"{}")
    whole = (folder / "00001.tar").read_bytes()
    (folder / "00002.tar").write_bytes(whole[: len(whole) // 2 + 100])
    return keys


@pytest.mark.parametrize("where", ["folder", "bucket"])
def test_webdataset_tars_are_labelled_like_the_files_they_hold(extract_cfg, sample, bucket,
                                                               tmp_path, where):
    name, client = bucket
    keys = _make_tars(sample, tmp_path / "tars")
    files = run_local(extract_cfg(out=tmp_path / "files"))
    by_path = {r["path"]: r for rb in shards.iter_label_set(tmp_path / "files")
               for r in rb.to_pylist()}
    tars = str(tmp_path / "tars")
    out = tmp_path / "tar-labels"
    if where == "bucket":
        _upload(client, name, "tars", tmp_path / "tars")
        tars, out = f"s3://{name}/tars", f"s3://{name}/tar-labels"
    s = run_local(extract_cfg(f"input.tars={tars}", "input.json=null", "run.max_error_rate=0.5", out=out))
    assert s["chunks"] == 3 and s["complete"] and files["images_labelled"] == 24
    rows = [r for rb in shards.iter_label_set(out) for r in rb.to_pylist()]
    # the good members of both tars, and those the cut tar held whole before its end
    assert 24 < len(rows) < 36
    for r in rows:
        tar, member = r["path"].split("/")
        want = by_path[keys[r["image_id"]]]
        assert member == f"{r['image_id']}.jpg" and tar.endswith(".tar")
        assert r["label_ids"] == want["label_ids"] and r["scores"] == want["scores"]
    errors = [json.loads(x) for x in (
        (Path(out) / "errors.jsonl").read_text() if where == "folder" else
        client.get_object(Bucket=name, Key="tar-labels/errors.jsonl")["Body"].read().decode()
    ).splitlines()]
    reasons = {e["path"]: e["reason"] for e in errors}
    assert reasons["00000.tar/broken0001.jpg"].startswith("cannot decode")
    assert reasons["00000.tar/noimage0001"].startswith("no image member")
    assert reasons["00002.tar"].startswith("unreadable tar")
    assert len(errors) == 3


def test_training_reads_images_from_tars_in_a_bucket(pretrain_cfg, sample, bucket, extract_cfg, tmp_path):
    """Stage 1 on the tar run's labels, the JSON naming images as '<tar>/<member>', the tars
    read from the bucket through the cache: every sample readable."""
    from trainer.train import train

    name, client = bucket
    keys = _make_tars(sample, tmp_path / "tars")
    (tmp_path / "tars" / "00002.tar").unlink()
    _upload(client, name, "tars", tmp_path / "tars")
    run_local(extract_cfg(f"input.tars=s3://{name}/tars", "input.json=null", "run.max_error_rate=0.5",
                          "run.row_group_size=4", out=f"s3://{name}/labels"))
    js, _ = sample
    items = json.loads(Path(js).read_text())
    for i, it in enumerate(items):
        it["image"] = f"{i // 12:05d}.tar/{it['id']}.jpg"
    assert set(keys) == {it["id"] for it in items}
    (tmp_path / "tars.json").write_text(json.dumps(items))
    cfg = pretrain_cfg(f"data.shards=s3://{name}/labels", f"data.json={tmp_path / 'tars.json'}",
                       f"data.image_root=s3://{name}/tars", f"data.cache_dir={tmp_path / 'cache'}")
    out = train(cfg, "pretrain")
    assert out["samples"] == 20 and out["dropped"]["unreadable"] == 0
    assert sorted(p.name for p in (tmp_path / "cache").rglob("*.tar")) == ["00000.tar", "00001.tar"]


@pytest.mark.ray
@pytest.mark.slow
def test_the_ray_runner_reads_and_writes_the_bucket(extract_cfg, sample, bucket, tmp_path):
    """The Ray runner's actors upload their own shards and read the images from the bucket
    (no shared filesystem); a tar chunk is decoded inside its actor. Its own local Ray,
    started after the endpoint's variables are set (its workers inherit them)."""
    from pipeline.ray_runner import run_ray

    name, client = bucket
    local = run_local(extract_cfg(out=tmp_path / "local"))
    _make_tars(sample, tmp_path / "tars")
    _upload(client, name, "tars", tmp_path / "tars")
    s = run_ray(extract_cfg(*_in_bucket(sample, bucket), "run.runner=ray",
                            out=f"s3://{name}/labels/ray"))
    assert s["runner"] == "ray" and s["images_labelled"] == local["images_labelled"] == 24
    got = _objects(client, name, "labels/ray")
    assert {k: v for k, v in got.items() if k.endswith(".parquet")} == _local_shards(tmp_path / "local")
    t = run_ray(extract_cfg(f"input.tars=s3://{name}/tars", "input.json=null",
                            "run.max_error_rate=0.5", "run.runner=ray", out=f"s3://{name}/labels/tars"))
    assert t["chunks"] == 3 and t["complete"] and 24 < t["images_labelled"] < 36
    assert t["images_failed"] == 3 and ".lock" not in _objects(client, name, "labels/tars")


def test_submit_passes_the_bucket_endpoint_and_never_the_keys(monkeypatch):
    from pipeline.submit import storage_env, submit_command

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.delenv("AWS_REGION", raising=False)
    env = storage_env()
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000" and "AWS_SECRET_ACCESS_KEY" not in env
    cmd = submit_command("http://head:8265", None, ["run.output=s3://b/x"], env_vars=env)
    runtime = json.loads(cmd[cmd.index("--runtime-env-json") + 1])
    assert runtime["env_vars"] == env and "secret" not in " ".join(cmd)


def test_the_cache_evicts_the_least_recently_used_and_keeps_each_copys_mtime(tmp_path):
    """The bucket cache's LRU runs on access times; a copy's mtime stays its download's, since
    it names the node's verification marker (a touched copy is not hashed again)."""
    from seacore.storage import FileCache, resolve

    src = tmp_path / "src"
    src.mkdir()
    for name in "abc":
        (src / name).write_bytes(name.encode() * 100)
    cache = FileCache(str(tmp_path / "cache"), 250 / (1 << 30), "key")
    a = cache.get(resolve(str(src / "a")), 100)
    mtime = a.stat().st_mtime_ns
    time.sleep(0.01)
    cache.get(resolve(str(src / "b")), 100)
    time.sleep(0.01)
    assert cache.get(resolve(str(src / "a")), 100) == a and a.stat().st_mtime_ns == mtime
    time.sleep(0.01)
    cache.get(resolve(str(src / "c")), 100)  # 300 bytes > 250: the least recently used goes
    assert sorted(p.name for p in cache.dir.iterdir()) == ["a", "c"]
    with pytest.raises(ValueError, match="data.cache_limit_gb"):
        FileCache(str(tmp_path / "small"), 50 / (1 << 30), "k").get(resolve(str(src / "a")), 100)


def test_a_tower_checkpoint_in_a_bucket_loads_like_the_file(bucket, tiny_clip, tmp_path, monkeypatch):
    """encoder.pretrained / vision.pretrained as a URL: copied once into the node's cache,
    then loaded as the file (same weights, same recorded sha256); a missing object is
    WeightsNotFound naming the key. The tiny CLIP's architecture is registered with open_clip
    under a name of its own (as a built-in one is), its weights file put in the bucket."""
    import open_clip
    import torch

    from pipeline.encoders import load_encoder
    from pipeline.weights import WeightsNotFound

    name, client = bucket
    monkeypatch.setenv("SEA_CACHE", str(tmp_path / "cache"))
    folder = Path(tiny_clip.split(":", 1)[1])
    arch = tmp_path / "sea-tiny-bucket-test.json"
    arch.write_text(json.dumps(json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]))
    open_clip.add_model_config(arch)
    weights = folder / "open_clip_model.safetensors"
    client.upload_file(str(weights), name, "weights/tiny.safetensors")
    remote = load_encoder("sea-tiny-bucket-test", f"s3://{name}/weights/tiny.safetensors")
    local = load_encoder("sea-tiny-bucket-test", str(weights))
    assert remote.weights_tag == local.weights_tag == "file"
    assert remote.identity()["weights_sha256"] == local.identity()["weights_sha256"]
    for a, b in zip(remote.model.state_dict().values(), local.model.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert len(list((tmp_path / "cache").rglob("tiny.safetensors"))) == 1
    with pytest.raises(WeightsNotFound, match=r"encoder.pretrained: s3://.*/nothing.pt does not exist"):
        load_encoder("sea-tiny-bucket-test", f"s3://{name}/weights/nothing.pt")
