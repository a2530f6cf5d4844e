"""Run under torchrun by tests/test_fsdp.py: the LLM loaded sharded (meta device, each rank
reading its rows of the safetensors) against ``from_pretrained`` whole. Not a test module.

argv: llm_path
"""

import sys

import torch

from trainer import distributed as D
from trainer.llm import load_llm


def main():
    path = sys.argv[1]
    cpu = torch.device("cpu")
    d = D.init(cpu)
    _, sharded = load_llm(path, "auto", cpu, trained=True, shard=D.llm_sharder(cpu))
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    fully_shard(sharded)  # the root unit, as trainer.distributed.wrap adds it
    _, whole = load_llm(path, "auto", cpu, trained=True)
    ref = dict(whole.named_parameters())
    for name, q in sharded.named_parameters():
        assert isinstance(q, DTensor), name
        local = q.to_local()
        assert local.numel() <= -(-ref[name].numel() // d.world), name  # its shard, no more
        assert torch.equal(q.full_tensor(), ref[name]), name
    for (name, b), (_, b2) in zip(sharded.named_buffers(), whole.named_buffers(), strict=True):
        assert torch.equal(b, b2), name  # RoPE's inv_freq survives the meta construction
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(sharded(input_ids=ids).logits, whole(input_ids=ids).logits)
    D.barrier(d)
    if d.is_main():
        print("sharded load ok")
    D.close()


if __name__ == "__main__":
    main()
