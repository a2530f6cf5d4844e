"""Shared fixtures: tiny random encoders saved as open_clip local dirs, a sample set, and a
shared word-embedding cache (so the full 2of12 list is encoded once per encoder per session).
Nothing here downloads."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("sea")


@pytest.fixture(scope="session")
def tiny_clip(workdir):
    from pipeline.tiny import save_tiny

    return save_tiny("clip", workdir / "tiny-clip", seed=0)


@pytest.fixture(scope="session")
def tiny_siglip(workdir):
    """The tiny SigLIP-style tower; its timm trunk is registered in this process (test-only:
    the product's resolver does not know it)."""
    from pipeline.tiny import register_tiny_siglip, save_tiny

    spec = save_tiny("siglip", workdir / "tiny-siglip", seed=0)
    register_tiny_siglip()  # save_tiny reuses an existing folder without building
    return spec


@pytest.fixture(scope="session")
def sample(workdir):
    from world.sample import make_sample

    js = make_sample(workdir / "sample", n=24, size=80)
    return js, workdir / "sample" / "images"


@pytest.fixture(scope="session")
def text_cache(workdir):
    return workdir / "text-cache"


@pytest.fixture
def extract_cfg(tiny_clip, sample, text_cache, tmp_path):
    """A config for the tiny CLIP on the sample set, writing into a fresh folder."""
    from pipeline.config import ExtractConfig
    from seacore.config import load_config

    js, root = sample

    def make(*overrides, model=tiny_clip, out=None):
        return load_config(ExtractConfig, None, [
            f"encoder.model={model}", "encoder.pretrained=null", f"input.json={js}",
            f"input.image_root={root}", f"run.output={out or tmp_path / 'shards'}",
            "run.chunk_size=10", "run.batch_size=4", f"labels.text_cache_dir={text_cache}",
            "run.progress=false", *overrides])

    return make


@pytest.fixture(scope="session")
def tiny_llm(workdir):
    from trainer.tiny import save_tiny_llm
    from wordlist import load_wordlist
    from world.sample import sample_text

    return save_tiny_llm(workdir / "tiny-llm", list(load_wordlist().words), extra_text=sample_text())


@pytest.fixture(scope="session")
def label_run(workdir, tiny_clip, sample, text_cache):
    """Labels for the 24-image sample (tiny CLIP, chunks of 10 -> 3 shards)."""
    from pipeline.config import ExtractConfig
    from pipeline.extract import run_local
    from seacore.config import load_config

    js, root = sample
    out = workdir / "labels"
    run_local(load_config(ExtractConfig, None, [
        f"encoder.model={tiny_clip}", "encoder.pretrained=null", f"input.json={js}",
        f"input.image_root={root}", f"run.output={out}", "run.chunk_size=10",
        "run.row_group_size=4", f"labels.text_cache_dir={text_cache}", "run.progress=false"]))
    return out


@pytest.fixture
def pretrain_cfg(tiny_clip, tiny_llm, sample, label_run, tmp_path):
    from seacore.config import load_config
    from trainer.config import PretrainConfig

    js, root = sample

    def make(*overrides):
        return load_config(PretrainConfig, None, [
            f"vision.model={tiny_clip}", "vision.pretrained=null", f"llm.path={tiny_llm}",
            f"data.json={js}", f"data.image_root={root}", f"data.shards={label_run}",
            "data.holdout_images=4", "data.num_workers=0", "data.shuffle_window=2",
            "optim.global_batch_size=4", "optim.micro_batch_size=2", "optim.epochs=1",
            "log.eval_every=0", "log.save_every=1000", "log.progress=false",
            "log.report_to=[]", f"log.output={tmp_path / 'run'}", *overrides])

    return make


@pytest.fixture
def bad_corpus(sample, tmp_path):
    """Five good images plus one of each kind of unusable input: (json, root, path -> reason)."""
    import json
    import shutil

    from PIL import Image

    js, good_root = sample
    root = tmp_path / "imgs"
    shutil.copytree(good_root, root)
    good = next(root.rglob("*.jpg")).read_bytes()
    (root / "zero.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("not an image at all")
    (root / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (root / "corrupt.jpg").write_bytes(good[:20] + bytes(range(256)) * 4)
    Image.new("RGB", (4000, 3000)).save(root / "bomb.png")  # over max_pixels=1e6 in the tests
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(good)
    expected = {"zero.jpg": "0 bytes", "text.jpg": "cannot decode", "truncated.jpg": "cannot decode",
                "corrupt.jpg": "cannot decode", "bomb.png": "decompression bomb",
                "missing.jpg": "not found", "../outside.jpg": "escapes the image root",
                str(outside): "absolute"}
    items = json.loads(js.read_text())[:5]
    for name in expected:
        items.append({"id": f"bad-{name}", "image": name, "conversations": []})
    bad_json = tmp_path / "bad.json"
    bad_json.write_text(json.dumps(items))
    return bad_json, root, expected


@pytest.fixture(scope="session")
def instruct_json(sample, workdir):
    from world.sample import make_instruct_sample

    js, _ = sample
    return make_instruct_sample(js, workdir / "instruct.json", text_only=4)


@pytest.fixture
def finetune_cfg(tiny_clip, tiny_llm, sample, instruct_json, tmp_path):
    from seacore.config import load_config
    from trainer.config import FinetuneConfig

    _, root = sample

    def make(*overrides):
        return load_config(FinetuneConfig, None, [
            f"vision.model={tiny_clip}", "vision.pretrained=null", f"llm.path={tiny_llm}",
            f"data.json={instruct_json}", f"data.image_root={root}", "data.num_workers=0",
            "data.shuffle_block=4", "data.shuffle_window=2",
            "optim.global_batch_size=4", "optim.micro_batch_size=2", "optim.epochs=1",
            "optim.lr=1e-3", "log.eval_every=0", "log.save_every=1000", "log.progress=false",
            "log.report_to=[]", f"log.output={tmp_path / 'ft'}", *overrides])

    return make


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint on 127.0.0.1 (tests/s3server.py), reached over HTTP by pyarrow's S3
    client (our code) and boto3 (the tests' own setup and checks), for the whole session."""
    from s3server import moto_endpoint, moto_server_path

    if moto_server_path() is None:
        pytest.skip("moto[server] is not installed (make test installs the dev extras)")
    with moto_endpoint() as url:
        yield url


@pytest.fixture
def bucket(s3_server, request):
    """A fresh bucket for one test: (name, boto3 client)."""
    import re
    import uuid

    import boto3

    client = boto3.client("s3", endpoint_url=s3_server)
    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:8]
    client.create_bucket(Bucket=name)
    return name, client


@pytest.fixture(scope="session", autouse=True)
def _own_caches(tmp_path_factory):
    """The project's caches (the trainer's conversation store and bucket cache default under
    $SEA_CACHE) in the session's temp folder, not in the machine's."""
    saved = os.environ.get("SEA_CACHE")
    os.environ["SEA_CACHE"] = str(tmp_path_factory.mktemp("sea-cache"))
    yield
    if saved is None:
        os.environ.pop("SEA_CACHE", None)
    else:
        os.environ["SEA_CACHE"] = saved
