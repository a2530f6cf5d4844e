"""Run under torchrun by tests/test_finetune.py (and in its process, for the one-process
reference: ``main(argv)``): one gradient computation on a fixed global batch, saved for
comparison with a single process. Not a test module itself.

argv: stage out_file [config overrides...]
"""

import sys

import torch

from seacore.config import load_config
from trainer import distributed as D
from trainer.config import FinetuneConfig, PretrainConfig
from trainer.data import StreamDataset
from trainer.train import build, forward_backward


def main(argv: list[str] | None = None):
    stage, out_file, *overrides = sys.argv[1:] if argv is None else argv
    cls = PretrainConfig if stage == "pretrain" else FinetuneConfig
    cfg = load_config(cls, None, overrides)
    p = build(cfg, stage)
    # the global batch is the single-process stream's first global_batch samples
    ds = StreamDataset(p.source, cfg.optim.micro_batch_size, cfg.optim.seed, 0, 1,
                       cfg.data.shuffle_window, p.dataset.holdout, p.dataset.draws)
    it = iter(ds)
    n_micro = cfg.optim.global_batch_size // cfg.optim.micro_batch_size
    micro = [next(it) for _ in range(n_micro)]
    per_rank = n_micro // p.dist.world
    mine = micro[p.dist.rank * per_rank:(p.dist.rank + 1) * per_rank]
    p.task.train()
    p.optimizer.zero_grad(set_to_none=True)
    gather = D.gather_pairs if (p.dist.enabled and cfg.sea.gather_negatives) else None
    metrics = forward_backward(p, mine, step=0, gather=gather)
    grads = {}
    for name, q in p.task.named_parameters():
        if q.grad is not None:
            g = q.grad
            grads[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().cpu()
    pairs = D.gather_objects(metrics["pairs"], p.dist)
    if p.dist.is_main():
        torch.save({"grads": grads, "pairs": pairs, "loss": metrics["loss"]}, out_file)
    D.barrier(p.dist)  # every rank at the end before any tears the group down (tests/_empty_worker.py)
    D.close()


if __name__ == "__main__":
    main()
