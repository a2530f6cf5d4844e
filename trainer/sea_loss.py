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
  the same word in a micro-batch one is kept at random; with cross-rank negatives, again
  after gathering, so each word appears once over all ranks.
- L_a (``objective="sampled"``, the paper): symmetric InfoNCE over the N pairs, cosine
  similarity, temperature tau = exp(log_tau), log_tau learnable and initialised at 0 (the
  paper's "tau = 0"), floored at ``min_tau``.
- ``objective="multi"`` (this project's, after the patch-aligned training paper's
  "multi-semantic alignment"): every kept label of a sampled patch is a positive, weighted by
  s / sum(s); see ``multi_info_nce``.

Sampling runs once per optimizer step for all micro-batches (``sample_step``), vectorised on
the device. Only the uniforms are drawn per micro-batch, from that micro-batch's generator, so
one process with accumulation draws exactly what several ranks without it draw.
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


OBJECTIVES = ("sampled", "multi")


_GEOMETRY: dict = {}  # (grid, k, device) -> window geometry: fixed per run, built once


def _window_geometry(grid: tuple[int, int], k: int, device) -> tuple[torch.Tensor, ...]:
    """Per window (row-major): its first patch's flat index, its height and width."""
    key = (tuple(grid), k, str(device))
    if key not in _GEOMETRY:
        gh, gw = grid
        ys = torch.arange(0, gh, k)
        xs = torch.arange(0, gw, k)
        base = (ys[:, None] * gw + xs[None, :]).reshape(-1)
        hs = torch.clamp(gh - ys, max=k)[:, None].expand(len(ys), len(xs)).reshape(-1)
        ws = torch.clamp(gw - xs, max=k)[None, :].expand(len(ys), len(xs)).reshape(-1)
        _GEOMETRY[key] = tuple(t.to(device) for t in (base, hs.float(), ws.float()))
    return _GEOMETRY[key]


def window_patches(u: torch.Tensor, grid: tuple[int, int], k: int) -> torch.Tensor:
    """One patch per k x k window from uniforms ``u`` (B, num_windows, 2): (B, num_windows)
    flat indices into the grid. Edge windows may be smaller when k does not divide the grid."""
    base, hs, ws = _window_geometry(grid, k, u.device)
    return base + (u[..., 0] * hs).long() * grid[1] + (u[..., 1] * ws).long()


def num_windows(grid: tuple[int, int], k: int) -> int:
    return (-(-grid[0] // k)) * (-(-grid[1] // k))


def label_weights(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """(M, n) -> s / sum(s) over the kept labels (negative scores count as 0; all-zero rows
    uniform over the kept labels; rows with none kept all 0)."""
    kept = ids != SENTINEL
    w = torch.where(kept, scores.clamp(min=0), torch.zeros_like(scores))
    w = torch.where((w.sum(dim=1, keepdim=True) <= 0), kept.to(w.dtype), w)
    return w / w.sum(dim=1, keepdim=True).clamp(min=1e-30)


def draw_labels(ids: torch.Tensor, scores: torch.Tensor, u: torch.Tensor):
    """ids, scores (M, n), uniforms u (M,) -> (word (M,), valid (M,)): one kept label per row
    with probability s / sum(s), by inverse CDF (no per-row sampling call)."""
    valid = (ids != SENTINEL).any(dim=1)
    cdf = label_weights(ids, scores).cumsum(dim=1)
    choice = (cdf < u[:, None] * cdf[:, -1:]).sum(dim=1).clamp(max=ids.shape[1] - 1)
    return ids.gather(1, choice[:, None]).squeeze(1), valid


def dedupe(keys: torch.Tensor, prio: torch.Tensor) -> torch.Tensor:
    """Indices (sorted) keeping one entry per distinct key: the one with the lowest ``prio``
    (uniforms, so a uniformly random one among duplicates)."""
    if keys.numel() == 0:
        return keys.new_zeros(0, dtype=torch.long)
    order = prio.argsort()
    by_key = keys[order].sort(stable=True)
    first = torch.ones_like(by_key.values, dtype=torch.bool)
    first[1:] = by_key.values[1:] != by_key.values[:-1]
    return order[by_key.indices[first]].sort().values


@dataclass
class MicroPairs:
    """SEA's draws for one micro-batch: the sampled visual tokens (image, patch) and their
    targets: ``words`` (N,) for ``sampled``; ``ids`` and ``weights`` (N, n) for ``multi``.
    ``rows`` index the step's word table (``StepSample.words``)."""

    img: torch.Tensor
    pat: torch.Tensor
    words: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    ids: torch.Tensor | None = None
    weights: torch.Tensor | None = None


@dataclass
class StepSample:
    """Every micro-batch's pairs of one optimizer step, and the distinct words they use."""

    micro: list[MicroPairs | None]
    words: torch.Tensor  # (U,) distinct words of the step
    table: torch.Tensor | None = None  # their unit label features, filled on first use in the step


def draw_uniforms(gen: torch.Generator, batch: int, windows: int) -> torch.Tensor:
    """A micro-batch's randomness: per window (dy, dx, label draw, de-duplication priority).
    Drawn on the CPU, so CPU and GPU runs sample the same pairs."""
    return torch.rand(batch, windows, 4, generator=gen)


def sample_step(labels: list[tuple[torch.Tensor, torch.Tensor] | None], grid: tuple[int, int],
                k: int, gens: list[torch.Generator], objective: str = "sampled",
                device: torch.device | str = "cpu") -> StepSample:
    """Pairs of every micro-batch of one step in one vectorised pass on ``device``.

    ``labels[i]`` is micro-batch i's (ids, scores), each (B_i, P, n), or None (no labels).
    """
    nw = num_windows(grid, k)
    present = [i for i, lab in enumerate(labels) if lab is not None and lab[0].shape[0] > 0]
    if not present:
        return StepSample([None] * len(labels), torch.zeros(0, dtype=torch.long, device=device))
    sizes = [labels[i][0].shape[0] for i in present]
    u = torch.cat([draw_uniforms(gens[i], b, nw) for i, b in zip(present, sizes)]).to(device)
    ids = torch.cat([labels[i][0] for i in present]).to(device, torch.long, non_blocking=True)
    scores = torch.cat([labels[i][1] for i in present]).to(device, torch.float, non_blocking=True)
    patches = window_patches(u[..., :2], grid, k)  # (B, nw)
    rows = torch.arange(ids.shape[0], device=device).repeat_interleave(nw)
    pat = patches.reshape(-1)
    pid, psc = ids[rows, pat], scores[rows, pat]  # (B*nw, n)
    u = u.reshape(-1, 4)
    # rows are in micro-batch order, so every selection below stays grouped by micro-batch
    first_row = torch.tensor([0] + sizes[:-1], device=device).cumsum(0)  # of each micro-batch
    if objective == "sampled":
        words, valid = draw_labels(pid, psc, u[:, 2])
        sel = valid.nonzero().squeeze(1)
        # one pair per distinct word per micro-batch: key (micro-batch, word)
        micro = torch.bucketize(rows[sel], first_row, right=True) - 1
        sel = sel[dedupe(micro * (SENTINEL + 1) + words[sel], u[sel, 3])]
        step_words, inv = torch.unique(words[sel], return_inverse=True)
    elif objective == "multi":
        sel = (pid != SENTINEL).any(dim=1).nonzero().squeeze(1)
        weights = label_weights(pid[sel], psc[sel])
        step_words = torch.unique(pid[sel][weights > 0])
    else:
        raise ValueError(f"sea.objective must be one of {OBJECTIVES}, got '{objective}'")
    r_sel = rows[sel]
    counts = torch.bucketize(first_row, r_sel).diff(append=r_sel.new_tensor([r_sel.numel()])).tolist()
    img = r_sel - first_row.repeat_interleave(torch.tensor(counts, device=device))
    parts = [img.split(counts), pat[sel].split(counts)]
    if objective == "sampled":
        parts += [words[sel].split(counts), inv.split(counts)]
    else:
        parts += [pid[sel].split(counts), weights.split(counts)]
    out: list[MicroPairs | None] = [None] * len(labels)
    for j, i in enumerate(present):
        a, b, c, d = (t[j] for t in parts)
        out[i] = (MicroPairs(a, b, words=c, rows=d) if objective == "sampled"
                  else MicroPairs(a, b, ids=c, weights=d))
    return StepSample(out, step_words)


def info_nce(x: torch.Tensor, t: torch.Tensor, tau: torch.Tensor, t_unit: bool = False) -> torch.Tensor:
    """Symmetric InfoNCE (Eq. 9) over N matched rows of x and t, cosine similarity / tau.
    ``t_unit``: t is already L2-normalised (the step's label table is normalised once)."""
    if x.shape[0] == 0:
        return x.sum() * 0.0
    t = t.float() if t_unit else F.normalize(t.float(), dim=-1)
    logits = F.normalize(x.float(), dim=-1) @ t.T / tau
    target = torch.arange(x.shape[0], device=x.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def multi_targets(ids: torch.Tensor, weights: torch.Tensor):
    """(N, n) kept labels and their weights -> (the distinct words U with a positive weight,
    Q (N, |U|): Q[i, u] = weight of word u among token i's labels, rows summing to 1)."""
    pos = weights > 0
    words, inv = torch.unique(ids[pos], return_inverse=True)
    q = weights.new_zeros(ids.shape[0], words.numel())
    rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(ids)[pos]
    q.index_put_((rows, inv), weights[pos], accumulate=True)
    return words, q


def multi_info_nce(x: torch.Tensor, t: torch.Tensor, q: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Multi-positive symmetric InfoNCE. x (N, D) visual tokens, t (U, D) the features of the
    distinct label words, q (N, U) each token's target distribution over U (s / sum(s) of its
    kept labels). Token -> words: cross-entropy of softmax over U against q[i]. Word -> tokens:
    for word u, cross-entropy of softmax over the N tokens against q[:, u] / sum_i q[i, u] (the
    tokens carrying u, by their weight for u). L = mean of both directions' means."""
    if x.shape[0] == 0 or t.shape[0] == 0:
        return x.sum() * 0.0
    logits = F.normalize(x.float(), dim=-1) @ F.normalize(t.float(), dim=-1).T / tau
    q = q.float()
    to_words = -(q * logits.log_softmax(dim=1)).sum(dim=1).mean()
    r = q / q.sum(dim=0, keepdim=True)
    to_tokens = -(r * logits.log_softmax(dim=0)).sum(dim=0).mean()
    return 0.5 * (to_words + to_tokens)


class AlignmentLoss(nn.Module):
    """L_a with its learnable temperature. ``sample`` draws a step's pairs; ``forward`` takes a
    micro-batch's visual tokens and its pairs."""

    def __init__(self, word_tokens: WordTokens, grid: tuple[int, int], window: int = 2,
                 log_tau_init: float = 0.0, learn_tau: bool = True, min_tau: float = 0.01,
                 objective: str = "sampled"):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"sea.objective must be one of {OBJECTIVES}, got '{objective}'")
        self.log_tau = nn.Parameter(torch.tensor(float(log_tau_init)), requires_grad=learn_tau)
        self.register_buffer("flat_ids", word_tokens.flat_ids, persistent=False)
        self.register_buffer("offsets", word_tokens.offsets, persistent=False)
        # each word's tokens padded to the longest word, with weights 1/len (0 on padding): a
        # step's Eq. 8 features are then one gather and one weighted embedding bag
        flat, offsets = word_tokens.flat_ids, word_tokens.offsets
        lengths = torch.diff(offsets, append=offsets.new_tensor([flat.numel()]))
        pos = torch.arange(int(lengths.max()) if lengths.numel() else 1)
        mask = pos[None, :] < lengths[:, None]
        pad = flat[(offsets[:, None] + pos[None, :]).clamp(max=max(0, flat.numel() - 1))]
        self.register_buffer("pad_ids", torch.where(mask, pad, 0), persistent=False)
        self.register_buffer("pad_w", mask.float() / lengths[:, None].clamp(min=1), persistent=False)
        self.grid = tuple(grid)
        self.window = window
        self.min_tau = min_tau
        self.objective = objective

    @property
    def tau(self) -> torch.Tensor:
        return self.log_tau.exp().clamp(min=self.min_tau)

    def sample(self, labels, gens, device=None) -> StepSample:
        return sample_step(labels, self.grid, self.window, gens, self.objective,
                           device if device is not None else self.flat_ids.device)

    def _features(self, embed_weight: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        """Eq. 8 for ``words``: the mean of each word's token embeddings (as
        ``label_features_table``). Targets: no gradient into the embedding table."""
        with torch.no_grad():
            w = embed_weight.detach()
            return F.embedding_bag(self.pad_ids[words], w, mode="sum",
                                   per_sample_weights=self.pad_w[words].to(w.dtype))

    def forward(self, visual_tokens: torch.Tensor | None, embed_weight: torch.Tensor,
                step: StepSample | None, micro: int, gather=None,
                shared_gen: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
        """``gather`` (cross-rank negatives) is collective: every rank calls it for every
        micro-batch, labelled or not. ``shared_gen`` is the same on every rank: it picks which
        pair of a word found on several ranks survives."""
        dev = embed_weight.device
        pairs = step.micro[micro] if step is not None else None
        if pairs is None or visual_tokens is None:  # no pairs here: 0, the temperature attached
            empty = torch.zeros(0, dtype=torch.long, device=dev)
            x = embed_weight.new_zeros(0, embed_weight.shape[1]) + 0.0 * self.log_tau
            pairs = MicroPairs(empty, empty, words=empty, ids=empty[:, None],
                               weights=torch.zeros(0, 1, device=dev))
        else:
            x = visual_tokens[pairs.img, pairs.pat]
        if self.objective == "multi":
            ids, weights = pairs.ids, pairs.weights
            if gather is not None:
                x, ids, weights = gather(x, ids, weights)
            words, q = multi_targets(ids, weights)
            return multi_info_nce(x, self._features(embed_weight, words), q, self.tau), int(x.shape[0])
        if gather is not None:
            x, words = gather(x, pairs.words)
            keep = dedupe(words, torch.rand(words.shape[0], generator=shared_gen).to(dev))
            x, t = x[keep], self._features(embed_weight, words[keep])
        elif pairs.rows is None or pairs.rows.numel() == 0:
            t = x.detach()  # no pairs: info_nce returns the attached 0
        else:
            if step.table is None:  # once per step: the embedding table does not change within it
                step.table = F.normalize(self._features(embed_weight, step.words).float(), dim=-1)
            return info_nce(x, step.table[pairs.rows], self.tau, t_unit=True), int(x.shape[0])
        return info_nce(x, t, self.tau), int(x.shape[0])
