"""S2-Wrapper: multi-scale features from one vision tower (Shi et al., "When Do We Not Need
Larger Vision Models?", the paper's Table 2 row at 1008 px), written from the reference
``s2wrapper.forward`` (bfshi/scaling_on_scales) as LLaVA uses it: the image comes in at the
largest scale; for each scale it is resized (bicubic) to that size, cut into base-size tiles
(a chessboard, tiles stacked on the batch), each tile goes through the tower, the tiles' patch
grids are put back together, and each scale's grid is area-pooled to the base grid; the
scales' channels are concatenated (base scale first). With scales 336, 672, 1008 on CLIP-L/14:
576 tokens of 3 x 1024 channels, so the adapter's input width is 3072.

Labels stay those of the base-scale tower: the SEA labels name what each base-grid patch
shows, and the S2 token at a grid position pools exactly that image region at every scale
(the crops are the same region), so the labels' grid and the visual tokens' grid coincide.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def split_chessboard(x: torch.Tensor, n: int) -> torch.Tensor:
    """(B, C, H, W) -> (n*n*B, C, H/n, W/n): tile (i, j) is batch block i*n + j."""
    h, w = x.shape[-2] // n, x.shape[-1] // n
    return torch.cat([x[:, :, i * h:(i + 1) * h, j * w:(j + 1) * w]
                      for i in range(n) for j in range(n)], dim=0)


def merge_chessboard(x: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of ``split_chessboard``."""
    b = x.shape[0] // (n * n)
    rows = [torch.cat([x[(i * n + j) * b:(i * n + j + 1) * b] for j in range(n)], dim=-1)
            for i in range(n)]
    return torch.cat(rows, dim=-2)


def check_scales(scales: list[int], base: int) -> None:
    if not scales:
        return
    if scales[0] != base:
        raise ValueError(f"vision.s2_scales must start with the tower's own size {base}, got {scales}")
    if any(s % base for s in scales) or sorted(scales) != list(scales):
        raise ValueError(f"vision.s2_scales must be increasing multiples of {base}, got {scales}")


def multiscale(tokens_of, images: torch.Tensor, scales: list[int], grid: tuple[int, int]) -> torch.Tensor:
    """``tokens_of``: base-size images (N, 3, s, s) -> patch tokens (N, gh*gw, C), class token
    dropped. ``images``: (B, 3, S, S) at the largest scale. -> (B, gh*gw, C * len(scales))."""
    base = scales[0]
    b = images.shape[0]
    gh, gw = grid
    outs = []
    for size in scales:
        x = images
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(images.float(), size=(size, size), mode="bicubic").to(images.dtype)
        n = size // base
        t = tokens_of(split_chessboard(x, n))  # (n*n*B, gh*gw, C)
        t = t.transpose(1, 2).reshape(t.shape[0], t.shape[2], gh, gw)
        merged = merge_chessboard(t, n)  # (B, C, gh*n, gw*n)
        if n > 1:
            merged = F.interpolate(merged.float(), size=(gh, gw), mode="area").to(t.dtype)
        outs.append(merged)
    out = torch.cat(outs, dim=1)  # (B, C*len(scales), gh, gw)
    return out.reshape(b, out.shape[1], gh * gw).transpose(1, 2)


def tower_transform(preprocess, s2_scales: list[int]):
    """What images go through for a tower: its own transform, or with S2 the same at the
    largest scale."""
    return scaled_preprocess(preprocess, s2_scales[-1]) if s2_scales else preprocess


def scaled_preprocess(preprocess, size: int):
    """The tower's transform with its resize and centre crop at ``size`` (same region of the
    image as at the base size: the labels stay aligned)."""
    import copy

    from torchvision import transforms as T

    pre = copy.deepcopy(preprocess)
    found = 0
    for t in getattr(pre, "transforms", []):
        if isinstance(t, T.Resize):
            t.size = size if isinstance(t.size, int) or len(t.size) == 1 else (size, size)
            found += 1
        elif isinstance(t, T.CenterCrop):
            t.size = (size, size)
            found += 1
    if found != 2:
        raise ValueError("S2 needs the tower's transform to be a resize and a centre crop")
    return pre
