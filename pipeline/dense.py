"""Per-patch features in the joint image-text space (DESIGN "The method, precisely").

Three readings for CLIP-style open_clip ViTs, one mapping for SigLIP-style timm ViTs:

- ``raw`` tokens (modes ``sea`` and ``vanilla``): the last block's patch tokens through
  ``ln_post`` and ``proj``, class token dropped. ``sea`` scores them by -cos (the paper's
  Eq. 6 taken literally), ``vanilla`` by +cos.
- ``surgery`` (CLIP Surgery, Li et al. 2023): over the last ``depth`` blocks a second path
  runs value-value attention on the original path's normed input and skips the MLP; its
  patch tokens go through ``ln_post`` and ``proj``. Scores then use feature surgery
  (``surgery_scores`` below), +cos.
- ``attnpool_value`` (SigLIP, no class token): the attention-pool head's value path applied
  to each patch alone, ``y = proj(v_i)``, ``y + mlp(norm(y))``, then the model's head. This is
  exactly what the head outputs when a single patch is pooled (softmax over one key is 1); it
  is this project's choice, with no published prior work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MODES = ("sea", "vanilla", "surgery")
SIGN = {"sea": -1, "vanilla": 1, "surgery": 1}


def is_clip_vit(visual) -> bool:
    from open_clip.transformer import VisionTransformer

    return isinstance(visual, VisionTransformer)


def is_timm_attnpool(visual) -> bool:
    trunk = getattr(visual, "trunk", None)
    return trunk is not None and getattr(trunk, "attn_pool", None) is not None


def dense_kind(visual, mode: str) -> str:
    """Which per-patch mapping a (model, mode) pair uses; refuses pairs that make no sense."""
    if mode not in MODES:
        raise ValueError(f"labels.mode must be one of {MODES}, got '{mode}'")
    if is_clip_vit(visual):
        if visual.attn_pool is not None or visual.final_ln_after_pool:
            raise ValueError("open_clip ViTs with an attentional pooler or final_ln_after_pool "
                             "are not supported for dense labels")
        return "surgery" if mode == "surgery" else "raw"
    if is_timm_attnpool(visual):
        if mode == "surgery":
            raise ValueError("mode 'surgery' needs a CLIP-style ViT (class token); "
                             "SigLIP-style models support 'sea' and 'vanilla'")
        return "attnpool_value"
    raise ValueError(f"unsupported vision tower {type(visual).__name__}: need an open_clip "
                     "VisionTransformer or a timm ViT with an attention-pool head")


def patch_grid(visual, image_size=None) -> tuple[int, int]:
    if is_clip_vit(visual):
        return tuple(int(g) for g in visual.grid_size)
    trunk = getattr(visual, "trunk", None)
    if trunk is not None and hasattr(trunk, "patch_embed"):
        return tuple(int(g) for g in trunk.patch_embed.grid_size)
    raise ValueError(f"cannot tell the patch grid of {type(visual).__name__}")


def clip_hidden(visual, images: torch.Tensor, num_blocks: int | None = None) -> torch.Tensor:
    """Tokens (B, 1+P, W) after the first ``num_blocks`` blocks (all when None).

    Also the trainer's feature source: ``num_blocks = depth - 1`` is LLaVA's select layer -2.
    """
    x = visual._embeds(images)
    blocks = visual.transformer.resblocks
    if num_blocks is not None:
        blocks = blocks[:num_blocks]
    batch_first = getattr(visual.transformer, "batch_first", True)
    if not batch_first:
        x = x.transpose(0, 1)
    for blk in blocks:
        x = blk(x)
    return x if batch_first else x.transpose(0, 1)


def _vv_attention(block, x: torch.Tensor) -> torch.Tensor:
    """CLIP Surgery's value-value self-attention with the block's own weights (batch first)."""
    attn = block.attn
    B, N, C = x.shape
    h = attn.num_heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
    v = qkv[..., 2 * C:].reshape(B, N, h, C // h).transpose(1, 2)  # (B, h, N, d)
    scale = (C // h) ** -0.5
    a = ((v @ v.transpose(-2, -1)) * scale).softmax(dim=-1)
    out = (a @ v).transpose(1, 2).reshape(B, N, C)
    return attn.out_proj(out)


def clip_surgery_tokens(visual, images: torch.Tensor, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(patch tokens of the surgery path, class token of the original path), before ln_post."""
    blocks = visual.transformer.resblocks
    depth = min(depth, len(blocks))
    x = clip_hidden(visual, images, num_blocks=len(blocks) - depth)
    x_new = x
    for blk in blocks[len(blocks) - depth:]:
        # The new path reads the original path's normed input and skips the FFN, as in the
        # CLIP Surgery reference code; the original path is the unchanged block.
        x_new = x_new + blk.ls_1(_vv_attention(blk, blk.ln_1(x)))
        x = blk(x)
    return x_new[:, 1:], x[:, 0]


def clip_patch_features(visual, images: torch.Tensor, kind: str, surgery_depth: int = 6):
    """Joint-space features: (B, P, D) patches and (B, D) global image embedding (or None)."""
    if kind == "raw":
        x = visual.ln_post(clip_hidden(visual, images))
        return x[:, 1:] @ visual.proj, x[:, 0] @ visual.proj
    if kind == "surgery":
        patches, cls = clip_surgery_tokens(visual, images, surgery_depth)
        return visual.ln_post(patches) @ visual.proj, visual.ln_post(cls) @ visual.proj
    raise ValueError(kind)


def attnpool_value_path(pool, x: torch.Tensor) -> torch.Tensor:
    """timm AttentionPoolLatent applied to every token on its own: (B, N, C) -> (B, N, C')."""
    if pool.pos_embed is not None:
        x = x + pool.pos_embed.unsqueeze(0).to(x.dtype)
    C = x.shape[-1]
    v = pool.kv(x)[..., C:]  # kv's output is [k | v] along the last dim (heads interleave inside)
    y = pool.proj(v)
    if pool.mlp is not None:
        y = y + pool.mlp(pool.norm(y))
    return y


def siglip_patch_features(visual, images: torch.Tensor):
    trunk = visual.trunk
    x = trunk.forward_features(images)
    n_prefix = getattr(trunk, "num_prefix_tokens", 0)
    x = x[:, n_prefix:]
    y = attnpool_value_path(trunk.attn_pool, x)
    y = trunk.fc_norm(y)
    y = trunk.head(trunk.head_drop(y))
    return visual.head(y), None


def patch_features(visual, images: torch.Tensor, kind: str, surgery_depth: int = 6):
    """Dispatch to the mapping chosen by ``dense_kind``; returns (patches, global or None)."""
    if kind == "attnpool_value":
        return siglip_patch_features(visual, images)
    return clip_patch_features(visual, images, kind, surgery_depth)


def image_size_of(visual) -> tuple[int, int]:
    """(h, w) a tower takes: open_clip ViTs say it, timm trunks keep it in the patch embedding."""
    size = getattr(visual, "image_size", None)
    if size is None:
        size = visual.trunk.patch_embed.img_size
    if isinstance(size, int):
        return (size, size)
    return (int(size[0]), int(size[1]))


SURGERY_WEIGHTS = ("cls", "token")


def surgery_scores(patches: torch.Tensor, cls: torch.Tensor, text: torch.Tensor,
                   weights: str = "cls") -> torch.Tensor:
    """CLIP Surgery's feature surgery in closed form, all inputs L2-normalised.

    The reference forms feats[i,t,:] = v_i * t_t * w[i,t], subtracts their mean over words and
    sums over channels. Summing over channels first gives
        score[i,t] = w[i,t] s[i,t] - mean_t'(w[i,t'] s[i,t']),   s = cos(v_i, t_t),
    so no (P, W, D) tensor is ever formed (576 x 41,241 x 768 would not fit).

    ``weights="cls"`` (the current xmed-lab/CLIP_Surgery ``clip/clip.py``, d2cf33f, 2023-04-13):
    one w for every token, from the class token's similarities. ``"token"`` (the one-day-older
    "demo version", 9f5be11): w[i,:] = softmax(2 s[i,:]) / mean, each token weighted by its own
    similarities. patches (B, P, D), cls (B, D), text (W, D) -> (B, P, W).
    """
    sims = patches @ text.T  # (B, P, W)
    if weights == "token":
        prob = (2 * sims).softmax(dim=-1)
    elif weights == "cls":
        prob = (2 * cls @ text.T).softmax(dim=-1)[:, None, :]  # (B, 1, W)
    else:
        raise ValueError(f"labels.surgery_weights must be one of {SURGERY_WEIGHTS}, got '{weights}'")
    weighted = sims * (prob / prob.mean(dim=-1, keepdim=True))
    return weighted - weighted.mean(dim=-1, keepdim=True)
