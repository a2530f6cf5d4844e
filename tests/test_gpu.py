"""GPU path: the same run picks CUDA by itself and agrees with the CPU labels.

Skipped where no CUDA device is present (our CI machines have none)."""

import pytest
import torch

from pipeline import shards
from pipeline.extract import run_local

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_labels_agree_with_cpu(extract_cfg, tmp_path):
    cpu = run_local(extract_cfg("run.device=cpu", out=tmp_path / "cpu"))
    gpu = run_local(extract_cfg("run.device=auto", out=tmp_path / "gpu"))
    assert gpu["device"].startswith("cuda") and cpu["device"] == "cpu"
    agree = total = 0
    for a, b in zip(shards.iter_label_set(tmp_path / "cpu"), shards.iter_label_set(tmp_path / "gpu"),
                    strict=True):
        _, ia, _ = shards.batch_arrays(a, 10)
        _, ib, _ = shards.batch_arrays(b, 10)
        agree += int((ia[..., 0] == ib[..., 0]).sum())
        total += ia[..., 0].size
    assert agree / total >= 0.99, f"top-1 agreement {agree / total:.4f}"
