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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sea_draws_are_pinned_by_the_loader_and_moved_to_the_gpu():
    """The DataLoader (pin_memory=True on CUDA) pins a batch's SEA draws through
    MicroPairs.pin_memory, and the step moves them to the device without blocking."""
    from torch.utils.data._utils.pin_memory import pin_memory

    from trainer.sea_loss import Draws

    g = torch.Generator().manual_seed(0)
    ids, scores = torch.randint(0, 50, (2, 16, 3), generator=g), torch.rand(2, 16, 3, generator=g)
    mp = Draws((4, 4), 2, "multi", 0)(ids, scores, 0, 0)
    pinned = pin_memory({"sea": mp})["sea"]
    assert pinned.token.is_pinned() and pinned.q.is_pinned() and pinned.weights.is_pinned()
    dev = pinned.to(torch.device("cuda"), non_blocking=True)
    assert dev.token.is_cuda and torch.equal(dev.q.cpu(), mp.q) and torch.equal(dev.words.cpu(), mp.words)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_world_baseline_picks_the_gpu(tmp_path):
    """``python -m world baseline`` with ``--device auto`` trains the world's CLIP and LM and
    both stages on CUDA, and its measures (answers in both formats, blind controls) run there."""
    import json

    from world.__main__ import main

    out = tmp_path / "b"
    assert main(["baseline", "--preset", "quick", "--cache", str(tmp_path / "cache"), "--out", str(out),
                 "--stage2-epochs", "1", "--curve-points", "1"]) == 0
    res = json.loads((out / "baseline.json").read_text())
    assert res["device"] == "cuda"
    logs = [json.loads(p.read_text()) for p in (tmp_path / "cache").glob("*/train_log.json")]
    assert len(logs) == 2 and all(g["device"] == "cuda" for g in logs)  # the CLIP and the LM
    assert res["final"]["answers"]["all"]["questions"] > 0 and set(res["final"]["blind"]) == {"zero", "swap"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_an_fsdp_bf16_step_matches_fp32(tiny_llm, monkeypatch):
    """Issue 34: FSDP2 on a GPU gathers bf16 parameters and reduces fp32 gradients
    (``trainer.distributed.mp_policy``): one step of the LLM sharded by ``llm_sharder`` on a
    one-rank NCCL group against the same LLM unsharded in fp32: the loss within bf16's
    resolution, the gradients pointing the same way, the masters still fp32."""
    import socket

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from trainer import distributed as D
    from trainer.llm import load_llm

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0",
                 "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    dev = torch.device("cuda")
    dist.init_process_group("nccl")
    try:
        _, ref = load_llm(tiny_llm, "float32", dev)
        _, sharded = load_llm(tiny_llm, "float32", dev, shard=D.llm_sharder(dev))
        fully_shard(sharded, mp_policy=D.mp_policy(dev))
        ids = torch.randint(5, 200, (2, 32), device=dev)
        losses, grads = [], []
        for m in (ref, sharded):
            loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            losses.append(float(loss))
            g = m.model.layers[0].mlp.up_proj.weight.grad
            grads.append((g.full_tensor() if hasattr(g, "full_tensor") else g).float().flatten())
        assert abs(losses[1] - losses[0]) / losses[0] < 2e-2
        assert float(torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)) > 0.99
        assert sharded.model.layers[0].mlp.up_proj.weight.dtype == torch.float32
    finally:
        dist.destroy_process_group()
