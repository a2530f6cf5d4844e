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
    from pipeline.tiny import save_tiny

    return save_tiny("siglip", workdir / "tiny-siglip", seed=0)


@pytest.fixture(scope="session")
def sample(workdir):
    from pipeline.demo import make_sample

    js = make_sample(workdir / "sample", n=24, size=80)
    return js, workdir / "sample" / "images"


@pytest.fixture(scope="session")
def text_cache(workdir):
    return workdir / "text-cache"


@pytest.fixture
def extract_cfg(tiny_clip, sample, text_cache, tmp_path):
    """A config for the tiny CLIP on the sample set, writing into a fresh folder."""
    from pipeline.config import ExtractConfig, load_config

    js, root = sample

    def make(*overrides, model=tiny_clip, out=None):
        return load_config(ExtractConfig, None, [
            f"encoder.model={model}", "encoder.pretrained=null", f"input.json={js}",
            f"input.image_root={root}", f"run.output={out or tmp_path / 'shards'}",
            "run.chunk_size=10", "run.batch_size=4", f"labels.text_cache_dir={text_cache}",
            "run.progress=false", *overrides])

    return make
