"""Run under torchrun by tests/test_dist_faults.py (in its process for the one-process
reference: ``main(argv)``), not a test module itself.

argv: mode out_file [config overrides...]
- ``empty``: one optimizer step's gradients where rank 1's only micro-batch is empty (every
  image unreadable), saved by rank 0; run with one process the same step sees that empty
  micro-batch among its own.
- ``stuck``: rank 1 never joins the first collective; rank 0 must end on dist.timeout_s.
"""

import sys
import time

import torch

from seacore.config import load_config
from trainer import distributed as D
from trainer.config import PretrainConfig
from trainer.data import StreamDataset, collate
from trainer.train import build, forward_backward


def main(argv: list[str] | None = None):
    mode, out_file, *overrides = sys.argv[1:] if argv is None else argv
    cfg = load_config(PretrainConfig, None, overrides)
    p = build(cfg, "pretrain")
    if mode == "stuck":
        if p.dist.rank == 1:
            time.sleep(60)
        D.barrier(p.dist)
        return
    ds = StreamDataset(p.source, cfg.optim.micro_batch_size, cfg.optim.seed, 0, 1,
                       cfg.data.shuffle_window, p.dataset.holdout, p.dataset.draws)
    good = next(iter(ds))
    empty = collate([])
    empty["bad"] = cfg.optim.micro_batch_size
    micro = [good, empty]  # rank 0 gets the good one, rank 1 the empty one
    mine = micro if p.dist.world == 1 else [micro[p.dist.rank]]
    p.task.train()
    p.optimizer.zero_grad(set_to_none=True)
    gather = D.gather_pairs if (p.dist.enabled and cfg.sea.gather_negatives) else None
    metrics = forward_backward(p, mine, step=0, gather=gather)
    grads = {n: q.grad.detach().cpu() for n, q in p.task.named_parameters() if q.grad is not None}
    losses = D.gather_objects(metrics["loss"], p.dist)
    if p.dist.is_main():
        torch.save({"grads": grads, "losses": losses}, out_file)
    # every rank reaches the end before any tears the group down, as the trainer's final
    # save does (trainer/final.py); without it rank 1 tears its gloo group down while rank 0
    # still saves, the likely cause of one SIGABRT of rank 0 in CI (not reproduced in 6 reruns)
    D.barrier(p.dist)
    D.close()


if __name__ == "__main__":
    main()
