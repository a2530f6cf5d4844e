"""Token-level alignment (the paper's Figure 1): does each visual token land next to its
patch's label in the LLM's input-embedding space?

For held-out images: project the patches with the vision tower and adapter, find each
token's nearest word over the whole word list by cosine against the Eq. 8 label features,
and report over the patches that kept at least one label
  top1_match:  nearest word == the patch's top-1 label
  in_labels:   nearest word is one of the patch's kept labels
  mean_cos_top1: mean cosine between token and its top-1 label's feature
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipeline.shards import SENTINEL


def word_table(mllm, word_tokens) -> torch.Tensor:
    """Every word's Eq. 8 feature in the LLM's input-embedding space, L2-normalised, fp32."""
    embed = mllm.llm.get_input_embeddings().weight.detach()
    return F.normalize(word_tokens.to(embed.device).features(embed).float(), dim=-1)


def nearest_words(mllm, table: torch.Tensor, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the normalised visual tokens (B, P, H), each token's nearest word by cosine (B, P))."""
    tok = F.normalize(mllm.visual_tokens(pixels.to(table.device)).float(), dim=-1)
    return tok, (tok @ table.T).argmax(dim=-1)


def label_hits(nearest: torch.Tensor, labels: torch.Tensor) -> tuple[int, int, int]:
    """The alignment metric's counts over patches that kept a label: (nearest word == the
    patch's top-1 label, nearest word among its kept labels, such patches)."""
    labels = torch.as_tensor(labels).long().to(nearest.device)
    kept = labels != SENTINEL
    has = kept.any(dim=-1)
    top1 = int(((nearest == labels[..., 0]) & has).sum())
    within = int(((labels == nearest[..., None]) & kept).any(dim=-1)[has].sum())
    return top1, within, int(has.sum())


@torch.no_grad()  # not inference_mode: FSDP2 cannot gather parameters into inference tensors
def evaluate_alignment(mllm, word_tokens, rows, preprocess_batch, batch_size: int = 16,
                       device="cpu") -> dict:
    """``rows``: iterable of dicts with 'pixel' (3,H,W), 'label_ids' (P, n)."""
    table = word_table(mllm, word_tokens)
    n_eval = top1 = within = 0
    cos_sum = 0.0
    images = 0
    buf = []

    def flush():
        nonlocal n_eval, top1, within, cos_sum, images
        pixels = torch.stack([b["pixel"] for b in buf]).to(device)
        labels = torch.stack([torch.as_tensor(b["label_ids"]).long() for b in buf]).to(device)
        tok, nearest = nearest_words(mllm, table, pixels)
        t, w, n = label_hits(nearest, labels)
        top1, within, n_eval = top1 + t, within + w, n_eval + n
        has = (labels != SENTINEL).any(dim=-1)
        first = labels[..., 0]
        safe_first = torch.where(has, first, torch.zeros_like(first))
        cos_sum += float((tok * table[safe_first]).sum(-1)[has].sum())
        images += len(buf)
        buf.clear()

    for r in rows:
        buf.append(preprocess_batch(r))
        if len(buf) == batch_size:
            flush()
    if buf:
        flush()
    if n_eval == 0:
        return {"images": images, "patches": 0, "top1_match": None, "in_labels": None}
    return {"images": images, "patches": n_eval, "top1_match": top1 / n_eval,
            "in_labels": within / n_eval, "mean_cos_top1": cos_sum / n_eval}


@torch.inference_mode()
def heldout_align_loss(mllm, word_tokens, batches, grid: tuple[int, int], tau: float,
                       window: int = 2, top_k: int = 0, seed: int = 0, device="cpu") -> dict:
    """L_a (Eq. 9, the paper's sampled pairs) of held-out images at a fixed temperature, on
    pairs drawn from a fixed seed: two models measured on the same ``batches`` (each a dict
    with 'pixel' (B, 3, H, W), 'label_ids' and 'label_scores' (B, P, n)) meet the same pairs,
    so their losses compare (lower: tokens nearer their own label than the batch's others).
    -> mean loss and mean ln(pairs) (the loss of tokens that tell no label apart) per batch."""
    from trainer.sea_loss import Draws, info_nce

    embed = mllm.llm.get_input_embeddings().weight.detach()
    draws = Draws(tuple(grid), window, "sampled", seed, top_k)
    log_tau = torch.tensor(math.log(tau), device=device)
    losses, chances = [], []
    for i, b in enumerate(batches):
        pairs = draws(torch.as_tensor(b["label_ids"]), torch.as_tensor(b["label_scores"]), 0, i)
        if pairs is None or pairs.words.numel() < 2:
            continue
        tokens = mllm.visual_tokens(b["pixel"].to(device)).float()
        feats = word_tokens.to(embed.device).features(embed, pairs.words.to(embed.device)).float()
        losses.append(float(info_nce(tokens, feats.to(device), log_tau, index=pairs.token.to(device))))
        chances.append(float(torch.tensor(float(pairs.words.numel())).log()))
    if not losses:
        return {"batches": 0, "loss": None, "chance": None}
    return {"batches": len(losses), "loss": sum(losses) / len(losses),
            "chance": sum(chances) / len(chances), "tau": tau}
