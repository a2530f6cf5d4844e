"""The MLLM: frozen open_clip vision tower -> mlp2x_gelu adapter -> Hugging Face causal LM.

``splice`` puts each sample's visual tokens where its ``<image>`` placeholder was and returns
where they landed. Truncation never cuts image tokens silently: a sample whose image tokens
would not fit in ``max_length`` is dropped (``truncation='drop'``, reported in ``dropped``) or
is an error (``'error'``); text after the image is cut from the end as usual.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline import dense
from pipeline.encoders import image_size_of
from trainer import s2

IMAGE_TOKEN_INDEX = -200  # LLaVA's placeholder id for <image> in input_ids
IGNORE_INDEX = -100


class MLP2xGelu(nn.Sequential):
    """LLaVA-1.5's ``mlp2x_gelu`` projector: Linear, GELU, Linear."""

    def __init__(self, vision_dim: int, llm_dim: int):
        super().__init__(nn.Linear(vision_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))


class VisionTower(nn.Module):
    """Patch features from a hidden layer (class token dropped), and the patch grid; with
    ``s2_scales``, S2-Wrapper's multi-scale features (``trainer.s2``: channels x scales)."""

    def __init__(self, visual: nn.Module, feature_layer: int = -2, s2_scales: list[int] | None = None):
        super().__init__()
        self.visual = visual
        self.feature_layer = feature_layer
        self.grid = dense.patch_grid(visual)
        self.s2_scales = list(s2_scales or [])
        if dense.is_clip_vit(visual):
            self.depth = len(visual.transformer.resblocks)
            self.width = visual.transformer.width
        elif dense.is_timm_attnpool(visual):
            self.depth = len(visual.trunk.blocks)
            self.width = visual.trunk.embed_dim
        else:
            raise ValueError(f"unsupported vision tower {type(visual).__name__}")
        n = self.depth + 1 + feature_layer if feature_layer < 0 else feature_layer
        if not 1 <= n <= self.depth:
            raise ValueError(f"vision.feature_layer={feature_layer} is outside 1..{self.depth} "
                             f"(or -1..-{self.depth})")
        self.num_blocks = n  # hidden state after this many blocks (LLaVA's hidden_states[n])
        if self.s2_scales:
            s2.check_scales(self.s2_scales, image_size_of(visual)[0])
            self.width *= len(self.s2_scales)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.s2_scales:
            return s2.multiscale(self.tokens, images, self.s2_scales, self.grid)
        return self.tokens(images)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The plain tower's patch tokens at its own size."""
        if dense.is_clip_vit(self.visual):
            return dense.clip_hidden(self.visual, images, self.num_blocks)[:, 1:]
        trunk = self.visual.trunk
        x = trunk.patch_embed(images)
        x = trunk._pos_embed(x)
        x = trunk.norm_pre(x)
        for blk in trunk.blocks[: self.num_blocks]:
            x = blk(x)
        return x[:, getattr(trunk, "num_prefix_tokens", 0):]


@dataclass
class Spliced:
    inputs_embeds: torch.Tensor  # (B, T, H)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), IGNORE_INDEX where no loss
    image_starts: torch.Tensor  # (B,) first image-token position, -1 for a text-only sample
    keep: torch.Tensor  # (B,) bool: samples kept (False: dropped by truncation)


def splice(embed: nn.Embedding, input_ids: list[torch.Tensor], labels: list[torch.Tensor],
           image_feats: torch.Tensor | None, has_image: list[bool], max_length: int,
           truncation: str = "drop") -> Spliced:
    """Replace each sample's single IMAGE_TOKEN_INDEX with its P visual tokens; right-pad.

    ``image_feats`` is (num_images, P, H) for the samples with ``has_image`` in order.
    """
    device = embed.weight.device
    ids_on = [ids.to(device) for ids in input_ids]
    # one embedding call for the whole micro-batch: under FSDP the table is its own unit,
    # gathered on each call, and every rank must make the same calls whatever its samples
    text = [ids[ids != IMAGE_TOKEN_INDEX] for ids in ids_on]
    embedded = embed(torch.cat(text)).split([len(t) for t in text])
    seqs, labs, starts, keep = [], [], [], []
    img_i = 0
    P = image_feats.shape[1] if image_feats is not None else 0
    for ids, e, lab, img in zip(ids_on, embedded, labels, has_image, strict=True):
        lab = lab.to(device)
        pos = (ids == IMAGE_TOKEN_INDEX).nonzero().flatten()
        if img:
            if len(pos) != 1:
                raise ValueError(f"a sample with an image needs exactly one <image>, found {len(pos)}")
            p = int(pos[0])
            feats = image_feats[img_i]
            img_i += 1
            if p + P > max_length:
                if truncation == "error":
                    raise ValueError(f"image tokens end at {p + P}, beyond max_length {max_length}")
                seqs.append(None)
                labs.append(None)
                starts.append(-1)
                keep.append(False)
                continue
            emb = torch.cat([e[:p], feats.to(e.dtype), e[p:]])
            lab = torch.cat([lab[:p], lab.new_full((P,), IGNORE_INDEX), lab[p + 1:]])
            starts.append(p)
        else:
            if len(pos):
                raise ValueError("a text-only sample contains <image>")
            emb = e
            starts.append(-1)
        seqs.append(emb[:max_length])
        labs.append(lab[:max_length])
        keep.append(True)
    kept = [i for i, k in enumerate(keep) if k]
    T = max((seqs[i].shape[0] for i in kept), default=1)
    H = embedded[0].shape[-1]
    B = len(kept)
    out = torch.zeros(B, T, H, dtype=embedded[0].dtype, device=device)
    mask = torch.zeros(B, T, dtype=torch.long, device=device)
    lab_out = torch.full((B, T), IGNORE_INDEX, dtype=torch.long, device=device)
    for row, i in enumerate(kept):
        n = seqs[i].shape[0]
        out[row, :n] = seqs[i]
        mask[row, :n] = 1
        lab_out[row, :n] = labs[i]
    return Spliced(out, mask, lab_out, torch.tensor([starts[i] for i in kept], device=device),
                   torch.tensor(keep, device=device))


# logit transforms of the output head that only the model's own forward knows: such LMs get
# the full forward (and so logits at every position); soft-capping is applied here
_OWN_HEAD_SCALING = ("logit_scale", "logits_scaling", "output_multiplier_scale")


def supervised_lm_loss(llm: nn.Module, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                       labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy, the output head run only at the positions whose next label is
    read: never on the visual tokens or the prompt. Equal (fp32) to transformers'
    ``llm(inputs_embeds=..., labels=labels).loss``: the same shift, the mean over the
    supervised tokens, fp32 logits, Gemma-2's final soft-capping.

    At Vicuna-7B with 576 visual tokens and a 40-token caption the full forward builds
    (B, ~620, 32k) logits to read ~40 rows of each; at Llama-3's 128k vocabulary that is ~0.3 GB
    of fp32 logits per sample, plus their gradient.
    """
    head, decoder = llm.get_output_embeddings(), llm.get_decoder()
    if head is None or decoder is None or decoder is llm or any(
            getattr(llm.config, k, None) not in (None, 1, 1.0) for k in _OWN_HEAD_SCALING):
        loss = llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels,
                   use_cache=False).loss
        return loss * int((labels[:, 1:] != IGNORE_INDEX).sum()) if reduction == "sum" else loss
    hidden = decoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                     use_cache=False).last_hidden_state
    target = labels[:, 1:]
    read = target != IGNORE_INDEX
    logits = head(hidden[:, :-1][read]).float()
    cap = getattr(llm.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return F.cross_entropy(logits, target[read], reduction=reduction)


class MLLM(nn.Module):
    """Vision tower + adapter + LLM. Which parts train is set by the stage (``set_trainable``)."""

    def __init__(self, visual: nn.Module, llm: nn.Module, feature_layer: int = -2,
                 s2_scales: list[int] | None = None):
        super().__init__()
        self.vision = VisionTower(visual, feature_layer, s2_scales)
        self.llm = llm
        self.adapter = MLP2xGelu(self.vision.width, llm.get_input_embeddings().weight.shape[1])

    @property
    def grid(self) -> tuple[int, int]:
        return self.vision.grid

    def visual_tokens(self, images: torch.Tensor, train_vision: bool = False) -> torch.Tensor:
        """Adapter outputs (B, P, H): the visual tokens in the LLM input space. Pixels are
        taken to the tower's device and dtype (a no-op in training, where the step put them
        there; what makes a bf16 model answer fp32 pixels from a preprocess)."""
        w = next(self.vision.parameters())
        with torch.set_grad_enabled(train_vision and torch.is_grad_enabled()):
            feats = self.vision(images.to(w.device, w.dtype))
        return self.adapter(feats.to(self.adapter[0].weight.dtype))

    def set_trainable(self, adapter: bool = True, llm: bool = False, vision: bool = False) -> None:
        self.adapter.requires_grad_(adapter)
        self.llm.requires_grad_(llm)
        self.vision.requires_grad_(vision)
        # frozen parts stay in eval mode (no dropout drift between identical steps)
        self.vision.train(vision)
        self.llm.train(llm)
