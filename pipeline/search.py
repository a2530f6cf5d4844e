"""Top-n word search per patch: exact inner product over L2-normalised vectors.

Backends: FAISS ``IndexFlatIP`` (CPU; a GPU index when faiss sees a GPU) and torch
matmul + topk (used on CUDA when faiss has no GPU build, and by surgery mode, whose
per-image word weights rule out a fixed index). ``auto`` picks faiss-gpu, then torch on
CUDA, then faiss on CPU.

Scores are stored with the sign of the mode: for ``sea`` the queries are negated, so the
top n are the n *least* similar words by +cos and the stored score is -cos (Eq. 6).
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.shards import SENTINEL  # re-exported: the shard contract's "no label" id


def _faiss_gpus() -> int:
    import faiss

    try:
        return faiss.get_num_gpus()
    except AttributeError:
        return 0


def pick_backend(name: str, device: torch.device) -> str:
    if name != "auto":
        return name
    if device.type == "cuda":
        return "faiss" if _faiss_gpus() > 0 else "torch"
    return "faiss"


class WordIndex:
    """The word-list embedding matrix behind a search backend, built once per process."""

    def __init__(self, text: np.ndarray, backend: str = "auto", device="cpu",
                 query_chunk: int = 8192):
        import faiss

        self.device = torch.device(device)
        self.backend = pick_backend(backend, self.device)
        self.dim = text.shape[1]
        self.size = text.shape[0]
        self.query_chunk = query_chunk
        text = np.ascontiguousarray(text, dtype=np.float32)
        self.text_t = torch.from_numpy(text).to(self.device)
        if self.backend == "faiss":
            index = faiss.IndexFlatIP(self.dim)
            if self.device.type == "cuda" and _faiss_gpus() > 0:
                self._res = faiss.StandardGpuResources()
                index = faiss.index_cpu_to_gpu(self._res, self.device.index or 0, index)
            index.add(text)
            self.index = index
        elif self.backend != "torch":
            raise ValueError(f"search backend must be auto, faiss or torch, got {backend}")

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """queries (N, D) normalised -> (scores (N, k) float32, ids (N, k) int64), on CPU."""
        k = min(k, self.size)
        if self.backend == "faiss":
            q = queries.detach().float().cpu().numpy()
            scores, ids = self.index.search(np.ascontiguousarray(q), k)
            return torch.from_numpy(scores), torch.from_numpy(ids)
        out_s, out_i = [], []
        for start in range(0, queries.shape[0], self.query_chunk):
            q = queries[start:start + self.query_chunk].to(self.device, torch.float32)
            s, i = (q @ self.text_t.T).topk(k, dim=-1)
            out_s.append(s.cpu())
            out_i.append(i.cpu())
        return torch.cat(out_s), torch.cat(out_i)


def finalize(scores: torch.Tensor, ids: torch.Tensor, min_score: float, n: int):
    """Drop scores below ``min_score``; pad to n slots. -> (ids uint16, scores float16) numpy.

    Dropped and padded slots get id SENTINEL and score 0, and always sit after the kept
    ones (inputs are sorted by descending score).
    """
    keep = scores >= min_score
    ids_np = np.where(keep.numpy(), ids.numpy(), SENTINEL).astype(np.uint16)
    sc_np = np.where(keep.numpy(), scores.numpy(), 0.0).astype(np.float16)
    if ids_np.shape[-1] < n:
        pad = n - ids_np.shape[-1]
        ids_np = np.pad(ids_np, [(0, 0)] * (ids_np.ndim - 1) + [(0, pad)], constant_values=SENTINEL)
        sc_np = np.pad(sc_np, [(0, 0)] * (sc_np.ndim - 1) + [(0, pad)])
    return ids_np, sc_np


def surgery_topk(patches: torch.Tensor, cls: torch.Tensor, text: torch.Tensor, k: int,
                 weights: str = "cls"):
    """Top k of CLIP Surgery's feature-surgery scores, image by image (B, P, D) -> (B*P, k).

    One image at a time bounds memory at a (P, W) matrix (95 MB at 576 x 41,241 fp32).
    """
    from pipeline.dense import surgery_scores

    out_s, out_i = [], []
    for b in range(patches.shape[0]):
        s = surgery_scores(patches[b:b + 1], cls[b:b + 1], text, weights)[0]
        top_s, top_i = s.topk(min(k, text.shape[0]), dim=-1)
        out_s.append(top_s.float().cpu())
        out_i.append(top_i.cpu())
    return torch.cat(out_s), torch.cat(out_i)
