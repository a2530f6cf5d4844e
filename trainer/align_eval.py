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

import torch
import torch.nn.functional as F

from pipeline.shards import SENTINEL


@torch.inference_mode()
def evaluate_alignment(mllm, word_tokens, rows, preprocess_batch, batch_size: int = 16,
                       device="cpu") -> dict:
    """``rows``: iterable of dicts with 'pixel' (3,H,W), 'label_ids' (P, n)."""
    embed = mllm.llm.get_input_embeddings().weight.detach()
    table = F.normalize(word_tokens.to(embed.device).features(embed).float(), dim=-1)
    n_eval = top1 = within = 0
    cos_sum = 0.0
    images = 0
    buf = []

    def flush():
        nonlocal n_eval, top1, within, cos_sum, images
        pixels = torch.stack([b["pixel"] for b in buf]).to(device)
        labels = torch.stack([torch.as_tensor(b["label_ids"]).long() for b in buf]).to(device)
        tok = F.normalize(mllm.visual_tokens(pixels).float(), dim=-1)  # (B, P, H)
        nearest = (tok @ table.T).argmax(dim=-1)  # (B, P)
        kept = labels != SENTINEL
        has = kept.any(dim=-1)
        first = labels[..., 0]
        top1 += int(((nearest == first) & has).sum())
        within += int(((labels == nearest[..., None]) & kept).any(dim=-1)[has].sum())
        safe_first = torch.where(has, first, torch.zeros_like(first))
        cos_sum += float((tok * table[safe_first]).sum(-1)[has].sum())
        n_eval += int(has.sum())
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
