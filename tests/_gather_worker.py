"""Run under torchrun by tests/test_sea_loss.py: SEA's gathered negatives on 2 gloo ranks.
Each rank samples pairs from labels whose words overlap across ranks, computes L_a with
gathered negatives and saves what it saw. Not a test module itself.

argv: out_file
"""

import sys

import torch

from pipeline.shards import SENTINEL
from trainer import distributed as D
from trainer.sea_loss import AlignmentLoss, WordTokens


def rank_inputs(rank: int):
    """Labels over 6 words (every rank uses them all: duplicates across ranks) and tokens."""
    g = torch.Generator().manual_seed(10 + rank)
    ids = torch.randint(0, 6, (3, 16, 2), generator=g)
    ids[:, :, 1] = SENTINEL
    tokens = torch.randn(3, 16, 5, generator=g, dtype=torch.float64)
    return ids, torch.rand(3, 16, 2, generator=g), tokens


def loss_module(objective: str = "sampled") -> AlignmentLoss:
    wt = WordTokens(torch.arange(8), torch.tensor([0, 1, 3, 4, 6, 7]))
    return AlignmentLoss(wt, grid=(4, 4), window=2, objective=objective).double()


def embed() -> torch.Tensor:
    return torch.randn(8, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def main():
    out_file = sys.argv[1]
    d = D.init(torch.device("cpu"))
    ids, scores, tokens = rank_inputs(d.rank)
    tokens.requires_grad_(True)
    mod = loss_module()
    step = mod.sample([(ids, scores)], [torch.Generator().manual_seed(d.rank)])
    shared = torch.Generator().manual_seed(77)
    loss, n = mod(tokens, embed(), step, 0, gather=D.gather_pairs, shared_gen=shared)
    loss.backward()
    mine = {"rank": d.rank, "words": step.micro[0].words.tolist(), "img": step.micro[0].img,
            "pat": step.micro[0].pat, "loss": float(loss.detach()), "pairs": n, "grad": tokens.grad}
    # multi with gathered negatives where rank 1's micro-batch has no labels at all: it still
    # joins the collective, with no rows
    multi = loss_module("multi")
    mstep = multi.sample([(ids, scores) if d.rank == 0 else None], [torch.Generator().manual_seed(5)])
    mloss, mn = multi(tokens.detach(), embed(), mstep, 0, gather=D.gather_pairs, shared_gen=shared)
    mp = mstep.micro[0]
    mine.update(multi_loss=float(mloss.detach()), multi_pairs=mn,
                multi_pick=None if mp is None else (mp.token, mp.ids, mp.weights))
    # ranks whose label rows differ in width (2 against 3 labels per patch): refused on every
    # rank, not padded into wrong label ids
    wide = torch.cat([ids, torch.full_like(ids[..., :1], SENTINEL)], dim=-1) if d.rank else ids
    wstep = multi.sample([(wide, torch.ones(wide.shape))], [torch.Generator().manual_seed(5)])
    try:
        multi(tokens.detach(), embed(), wstep, 0, gather=D.gather_pairs, shared_gen=shared)
        mine["width_error"] = None
    except ValueError as e:
        mine["width_error"] = str(e)
    everything = D.gather_objects(mine, d)
    if d.is_main():
        torch.save(everything, out_file)
    D.barrier(d)  # every rank at the end before any tears the group down (tests/_empty_worker.py)
    D.close()


if __name__ == "__main__":
    main()
