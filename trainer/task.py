"""The training task: the MLLM and the SEA loss in one module returning a dict of losses
(open_clip's ``TrainingTask`` shape), shared by both stages."""

from __future__ import annotations

import torch
import torch.nn as nn

from trainer.distributed import unsharded
from trainer.model import IGNORE_INDEX, MLLM, splice, supervised_lm_loss
from trainer.sea_loss import AlignmentLoss


class SEATask(nn.Module):
    def __init__(self, mllm: MLLM, align: AlignmentLoss | None, weight: float, max_length: int,
                 truncation: str = "drop", train_vision: bool = False):
        super().__init__()
        self.mllm = mllm
        self.align = align
        self.weight = weight
        self.max_length = max_length
        self.truncation = truncation
        self.train_vision = train_vision

    def forward(self, batch: dict, sample=None, micro: int = 0, gather=None,
                shared_gen: torch.Generator | None = None) -> dict:
        """One micro-batch. ``sample`` is the step's SEA draws (``AlignmentLoss.sample``),
        ``micro`` this micro-batch's index in it."""
        m = self.mllm
        device = m.adapter[0].weight.device
        embed = m.llm.get_input_embeddings()
        if not batch["input_ids"]:
            return self._empty(sample, micro, gather, shared_gen)
        tokens = None
        if batch["pixels"] is not None:
            tokens = m.visual_tokens(batch["pixels"].to(device), self.train_vision)
        sp = splice(embed, batch["input_ids"], batch["labels"], tokens, batch["has_image"],
                    self.max_length, self.truncation)
        if sp.keep.any() and (sp.labels[:, 1:] != IGNORE_INDEX).any():
            # the output head only where a caption / answer token is predicted
            lm_loss = supervised_lm_loss(m.llm, sp.inputs_embeds, sp.attention_mask, sp.labels)
        else:  # nothing to predict (all dropped or masked): 0, through the LLM and its head all
            # the same (FSDP: every rank gathers each unit the same number of times), attached
            # to the adapter
            anchor = tokens if tokens is not None else m.adapter[0].weight
            x = sp.inputs_embeds[:1, :1] if len(sp.inputs_embeds) else sp.inputs_embeds.new_zeros(
                1, 1, sp.inputs_embeds.shape[-1])
            logits = m.llm(inputs_embeds=x, use_cache=False).logits
            lm_loss = (anchor.sum() + logits.sum()) * 0.0
        losses = {"lm_loss": lm_loss, "dropped": int((~sp.keep).sum())}
        align_loss = lm_loss.new_zeros(())
        pairs = 0
        if self.align is not None and self.weight > 0:
            # without labels the loss is 0 but keeps the temperature in the graph, so DDP sees
            # every trainable parameter and gathered negatives stay collective
            with unsharded(embed):  # the label features read the table outside its forward
                align_loss, pairs = self.align(tokens, embed.weight, sample, micro, gather,
                                               shared_gen)
        losses.update(align_loss=align_loss, pairs=pairs,
                      loss=lm_loss + self.weight * align_loss)
        return losses

    def _empty(self, sample, micro: int, gather, shared_gen) -> dict:
        """Zero loss through every module a real micro-batch runs (a blank image through the
        tower and adapter, one position through the LM and its head), so the backward makes
        the same collectives with zero gradients."""
        from pipeline.encoders import image_size_of

        m = self.mllm
        device = m.adapter[0].weight.device
        blank = torch.zeros(1, 3, *image_size_of(m.vision.visual), device=device)
        tokens = m.visual_tokens(blank, self.train_vision)
        # the embedding too: a real micro-batch calls it once (splice)
        e = m.llm.get_input_embeddings()(torch.zeros(1, dtype=torch.long, device=device))
        logits = m.llm(inputs_embeds=tokens[:, :1], use_cache=False).logits
        zero = (tokens.sum() + e.sum() + logits.sum()) * 0.0
        align_loss, pairs = zero * 0.0, 0
        if self.align is not None and self.weight > 0:
            embed = m.llm.get_input_embeddings()
            with unsharded(embed):
                align_loss, pairs = self.align(None, embed.weight, sample, micro, gather,
                                               shared_gen)
        return {"lm_loss": zero, "dropped": 0, "align_loss": align_loss, "pairs": pairs,
                "loss": zero + self.weight * align_loss}
