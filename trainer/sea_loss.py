"""SEA's alignment loss (§4.2, Eq. 7-10): label features, localized sampling, symmetric InfoNCE.

- Label features (Eq. 8): each word is tokenized once per tokenizer (``WordTokens``) and its
  feature is the mean of the LLM input-embedding rows of its tokens. Rule ``space`` tokenizes
  ``" " + word`` and drops tokens that are only whitespace, so byte-level BPE (GPT-2, Llama-3)
  and SentencePiece (Llama-2, Vicuna) tokenizers both give the word's mid-sentence form; rule
  ``bare`` tokenizes the word alone. The features are targets: no gradient flows into the
  embedding table through them.
- Localized sampling: the grid is cut into k x k windows (edge windows may be smaller when k
  does not divide the grid, e.g. 27x27 with k = 2); one patch per window, uniformly; for it one
  kept label with probability s / sum(s) (negative scores count as 0; all-zero scores fall back
  to uniform over the kept labels). Patches with no kept label are skipped. Among pairs with
  the same word in the batch one is kept at random.
- L_a: symmetric InfoNCE over the N pairs, cosine similarity, temperature tau = exp(log_tau),
  log_tau learnable and initialised at 0 (the paper's "tau = 0"), floored at ``min_tau``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.shards import SENTINEL
from trainer.model import label_features_table


@dataclass
class WordTokens:
    flat_ids: torch.Tensor  # (total,) int64
    offsets: torch.Tensor  # (W,) int64 start of each word

    def to(self, device) -> WordTokens:
        return WordTokens(self.flat_ids.to(device), self.offsets.to(device))

    def features(self, embed_weight: torch.Tensor, words: torch.Tensor | None = None) -> torch.Tensor:
        return label_features_table(embed_weight, self.flat_ids, self.offsets, words)


def _tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def tokenize_words(tokenizer, words, rule: str = "space") -> WordTokens:
    texts = [(" " + w) if rule == "space" else w for w in words]
    enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
    blank = set()
    if rule == "space":
        vocab_ids = {i for ids in enc for i in ids}
        blank = {i for i in vocab_ids if tokenizer.decode([i]).strip() == ""}
    flat, offsets = [], []
    for w, ids in zip(words, enc, strict=True):
        kept = [i for i in ids if i not in blank] or ids
        if not kept:
            raise ValueError(f"word {w!r} tokenizes to nothing")
        offsets.append(len(flat))
        flat.extend(kept)
    return WordTokens(torch.tensor(flat, dtype=torch.long), torch.tensor(offsets, dtype=torch.long))


def load_word_tokens(tokenizer, wordlist, rule: str, cache_dir: str | Path | None = None) -> WordTokens:
    """Tokenized word list, cached per (tokenizer, word list, rule)."""
    from pipeline.textemb import cache_root

    base = Path(cache_dir) if cache_dir else cache_root()
    key = hashlib.sha256(f"{_tokenizer_fingerprint(tokenizer)}|{wordlist.sha256}|{rule}".encode()).hexdigest()[:24]
    path = base / "llm-words" / f"{key}.npz"
    if path.is_file():
        z = np.load(path)
        return WordTokens(torch.from_numpy(z["flat"]), torch.from_numpy(z["offsets"]))
    wt = tokenize_words(tokenizer, list(wordlist.words), rule)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    np.savez(tmp, flat=wt.flat_ids.numpy(), offsets=wt.offsets.numpy())
    os.replace(tmp, path)
    return wt


def window_patches(batch: int, grid: tuple[int, int], k: int, gen: torch.Generator) -> torch.Tensor:
    """One patch index per k x k window per image: (B, num_windows) flat indices into the grid."""
    gh, gw = grid
    ys = torch.arange(0, gh, k)
    xs = torch.arange(0, gw, k)
    hs = torch.clamp(gh - ys, max=k)  # window heights (edge windows may be smaller)
    ws = torch.clamp(gw - xs, max=k)
    r = torch.rand(batch, len(ys), len(xs), 2, generator=gen)
    dy = (r[..., 0] * hs[None, :, None]).long()
    dx = (r[..., 1] * ws[None, None, :]).long()
    py = ys[None, :, None] + dy
    px = xs[None, None, :] + dx
    return (py * gw + px).reshape(batch, -1)


def draw_labels(ids: torch.Tensor, scores: torch.Tensor, gen: torch.Generator):
    """ids, scores (M, n) -> (word (M,), valid (M,)): one kept label per row, p = s / sum(s)."""
    kept = ids != SENTINEL
    valid = kept.any(dim=1)
    w = torch.where(kept, scores.clamp(min=0), torch.zeros_like(scores))
    zero = w.sum(dim=1) <= 0
    w = torch.where(zero[:, None], kept.float(), w)
    w[~valid] = 1.0  # any row; masked out below
    choice = torch.multinomial(w, 1, generator=gen).squeeze(1)
    word = ids.gather(1, choice[:, None]).squeeze(1)
    return word, valid


def dedupe_words(words: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Indices (sorted) of one random pair per distinct word."""
    if words.numel() == 0:
        return words.new_zeros(0, dtype=torch.long)
    perm = torch.randperm(words.numel(), generator=gen)
    uniq, inv = torch.unique(words[perm], return_inverse=True)
    first = torch.full((uniq.numel(),), words.numel(), dtype=torch.long)
    first = first.scatter_reduce(0, inv, torch.arange(words.numel()), reduce="amin")
    return perm[first].sort().values


def sample_pairs(label_ids: torch.Tensor, label_scores: torch.Tensor, grid: tuple[int, int],
                 k: int, gen: torch.Generator):
    """(B, P, n) labels -> (image index, patch index, word) of the pairs used by L_a."""
    B = label_ids.shape[0]
    patches = window_patches(B, grid, k, gen)  # (B, Wn)
    rows = torch.arange(B)[:, None].expand_as(patches)
    ids = label_ids[rows, patches].reshape(-1, label_ids.shape[-1]).long()
    sc = label_scores[rows, patches].reshape(-1, label_scores.shape[-1]).float()
    words, valid = draw_labels(ids, sc, gen)
    img, pat, words = rows.reshape(-1)[valid], patches.reshape(-1)[valid], words[valid]
    keep = dedupe_words(words, gen)
    return img[keep], pat[keep], words[keep]


def info_nce(x: torch.Tensor, t: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE (Eq. 9) over N matched rows of x and t, cosine similarity / tau."""
    if x.shape[0] == 0:
        return x.sum() * 0.0
    logits = F.normalize(x.float(), dim=-1) @ F.normalize(t.float(), dim=-1).T / tau
    target = torch.arange(x.shape[0], device=x.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


class AlignmentLoss(nn.Module):
    """L_a with its learnable temperature; call with visual tokens and the batch's labels."""

    def __init__(self, word_tokens: WordTokens, grid: tuple[int, int], window: int = 2,
                 log_tau_init: float = 0.0, learn_tau: bool = True, min_tau: float = 0.01):
        super().__init__()
        self.log_tau = nn.Parameter(torch.tensor(float(log_tau_init)), requires_grad=learn_tau)
        self.register_buffer("flat_ids", word_tokens.flat_ids, persistent=False)
        self.register_buffer("offsets", word_tokens.offsets, persistent=False)
        self.grid = tuple(grid)
        self.window = window
        self.min_tau = min_tau

    @property
    def tau(self) -> torch.Tensor:
        return self.log_tau.exp().clamp(min=self.min_tau)

    def pairs(self, label_ids, label_scores, gen):
        return sample_pairs(label_ids, label_scores, self.grid, self.window, gen)

    def forward(self, visual_tokens: torch.Tensor | None, embed_weight: torch.Tensor, label_ids,
                label_scores, gen: torch.Generator, gather=None) -> tuple[torch.Tensor, int]:
        """``label_ids=None`` (a micro-batch without labels) still takes part in ``gather``,
        which is collective: every rank must call it the same number of times."""
        dev = embed_weight.device
        if label_ids is None or visual_tokens is None:
            x = embed_weight.new_zeros(0, embed_weight.shape[1]) + 0.0 * self.log_tau
            words = torch.zeros(0, dtype=torch.long)
        else:
            img, pat, words = self.pairs(label_ids.cpu(), label_scores.cpu(), gen)
            x = visual_tokens[img.to(dev), pat.to(dev)]
        with torch.no_grad():
            t = label_features_table(embed_weight.detach(), self.flat_ids, self.offsets, words.to(dev))
        if gather is not None:  # cross-rank negatives (trainer.distributed)
            x, t = gather(x, t)
        return info_nce(x, t, self.tau), int(x.shape[0])
