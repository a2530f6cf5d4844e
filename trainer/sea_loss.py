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

Sampling is vectorised in numpy on the host, where the labels are (``sample_pairs``). The
trainer's data loader draws each micro-batch's pairs as it builds the batch (``Draws``), from
a generator keyed by the batch's place in the data stream, so the draws overlap the training
step (in loader workers) and a resumed run draws the same. In the step, the micro-batches'
target words form one label table whose features are computed once (``StepSample``), and the
loss of a micro-batch is one autograd node (``_SymmetricInfoNCE``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from pipeline.shards import SENTINEL
from seacore.files import atomic_path


def padded_tokens(flat: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each word's token ids padded to the longest word, and weights 1/len (0 on padding):
    Eq. 8 for any set of words is then one gather and one weighted embedding bag."""
    lengths = torch.diff(offsets, append=offsets.new_tensor([flat.numel()]))
    pos = torch.arange(int(lengths.max()) if lengths.numel() else 1, device=flat.device)
    mask = pos[None, :] < lengths[:, None]
    pad = flat[(offsets[:, None] + pos[None, :]).clamp(max=max(0, flat.numel() - 1))]
    return torch.where(mask, pad, 0), mask.float() / lengths[:, None].clamp(min=1)


def eq8(embed_weight: torch.Tensor, pad_ids: torch.Tensor, pad_w: torch.Tensor,
        words: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 8, the one implementation: each word's label feature is the mean of its tokens'
    input embeddings (rows for ``words``, or every word)."""
    ids, w = (pad_ids, pad_w) if words is None else (pad_ids[words], pad_w[words])
    return F.embedding_bag(ids, embed_weight, mode="sum",
                           per_sample_weights=w if w.dtype == embed_weight.dtype else w.to(embed_weight.dtype))


@dataclass
class WordTokens:
    flat_ids: torch.Tensor  # (total,) int64
    offsets: torch.Tensor  # (W,) int64 start of each word
    pad_ids: torch.Tensor | None = None  # (W, longest) from ``padded_tokens``
    pad_w: torch.Tensor | None = None

    def __post_init__(self):
        if self.pad_ids is None:
            self.pad_ids, self.pad_w = padded_tokens(self.flat_ids, self.offsets)

    def to(self, device) -> WordTokens:
        return WordTokens(self.flat_ids.to(device), self.offsets.to(device),
                          self.pad_ids.to(device), self.pad_w.to(device))

    def features(self, embed_weight: torch.Tensor, words: torch.Tensor | None = None) -> torch.Tensor:
        return eq8(embed_weight, self.pad_ids, self.pad_w, words)


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
    with atomic_path(path) as tmp:  # its name ends in .npz: savez adds no suffix
        np.savez(tmp, flat=wt.flat_ids.numpy(), offsets=wt.offsets.numpy())
    return wt


OBJECTIVES = ("sampled", "multi")


_EPS = 1e-12  # the normalisation's floor, as F.normalize
_GEOMETRY: dict = {}  # (grid, k) -> window geometry: fixed per run, built once


def _window_geometry(grid: tuple[int, int], k: int) -> tuple[np.ndarray, ...]:
    """Per window (row-major): its first patch's flat index, its height and width."""
    key = (tuple(grid), k)
    if key not in _GEOMETRY:
        gh, gw = grid
        ys, xs = np.arange(0, gh, k), np.arange(0, gw, k)
        base = (ys[:, None] * gw + xs[None, :]).reshape(-1)
        hs = np.broadcast_to(np.minimum(gh - ys, k)[:, None], (len(ys), len(xs))).reshape(-1)
        ws = np.broadcast_to(np.minimum(gw - xs, k)[None, :], (len(ys), len(xs))).reshape(-1)
        _GEOMETRY[key] = (base, hs.astype(np.float32), ws.astype(np.float32))
    return _GEOMETRY[key]


def window_patches(u: np.ndarray, grid: tuple[int, int], k: int) -> np.ndarray:
    """One patch per k x k window from float32 uniforms ``u`` (B, num_windows, 2): (B,
    num_windows) flat indices into the grid. Edge windows may be smaller when k does not
    divide the grid."""
    base, hs, ws = _window_geometry(grid, k)
    return base + (u[..., 0] * hs).astype(np.int64) * grid[1] + (u[..., 1] * ws).astype(np.int64)


def num_windows(grid: tuple[int, int], k: int) -> int:
    return (-(-grid[0] // k)) * (-(-grid[1] // k))


def label_weights(ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(M, n) -> s / sum(s) over the kept labels (negative scores count as 0; all-zero rows
    uniform over the kept labels; rows with none kept all 0)."""
    kept = ids != SENTINEL
    w = np.where(kept, np.maximum(scores, 0), 0).astype(np.float32)
    w = np.where(w.sum(axis=1, keepdims=True) <= 0, kept.astype(np.float32), w)
    return w / np.maximum(w.sum(axis=1, keepdims=True), 1e-30)


def draw_labels(ids: np.ndarray, scores: np.ndarray, u: np.ndarray):
    """ids, scores (M, n), uniforms u (M,) -> (word (M,), valid (M,)): one kept label per row
    with probability s / sum(s), by inverse CDF (no per-row sampling call)."""
    cdf = label_weights(ids, scores).cumsum(axis=1)
    choice = np.minimum((cdf < u[:, None] * cdf[:, -1:]).sum(axis=1), ids.shape[1] - 1)
    return ids[np.arange(ids.shape[0]), choice], (ids != SENTINEL).any(axis=1)


def dedupe(keys: np.ndarray, prio: np.ndarray) -> np.ndarray:
    """Indices (sorted) keeping one entry per distinct key: the one with the lowest ``prio``
    (uniforms, so a uniformly random one among duplicates)."""
    if keys.size == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((prio, keys))  # by key, then priority
    first = np.ones(order.size, dtype=bool)
    first[1:] = keys[order[1:]] != keys[order[:-1]]
    return np.sort(order[first])


def multi_targets(ids: np.ndarray, weights: np.ndarray):
    """(N, n) kept labels and their weights -> (the distinct words U with a positive weight,
    Q (N, |U|) float32: Q[i, u] = weight of word u among token i's labels, rows summing to 1)."""
    pos = weights > 0
    words, inv = np.unique(ids[pos], return_inverse=True)
    cell = np.nonzero(pos)[0] * words.size + inv.reshape(-1)  # (token, word), summed if repeated
    q = np.bincount(cell, weights=weights[pos], minlength=ids.shape[0] * words.size)
    return words, q.reshape(ids.shape[0], words.size).astype(np.float32)


@dataclass
class MicroPairs:
    """SEA's draws for one micro-batch: the sampled visual tokens (``token`` = image * P +
    patch, P = ``patches`` per image; ``img`` and ``pat`` derived) and ``words``, the target
    words, one per column of L_a's logits. ``sampled``: one word per pair (N,). ``multi``: the
    micro-batch's distinct positive words (U,), with ``q`` (N, U) each token's weights over
    them and ``r`` = q / column sums (``multi_targets``), and each token's kept labels ``ids``
    / ``weights`` (N, n), which cross-rank negatives gather. Built on the host (by the data
    loader); ``pin_memory`` lets torch's DataLoader pin it, ``to`` moves it."""

    token: torch.Tensor
    words: torch.Tensor
    q: torch.Tensor | None = None
    r: torch.Tensor | None = None
    ids: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    patches: int = 1

    @property
    def img(self) -> torch.Tensor:
        return self.token // self.patches

    @property
    def pat(self) -> torch.Tensor:
        return self.token % self.patches

    def _map(self, fn) -> MicroPairs:
        return MicroPairs(*(None if v is None else fn(v) for v in
                            (self.token, self.words, self.q, self.r, self.ids, self.weights)),
                          patches=self.patches)

    def to(self, device, non_blocking: bool = False) -> MicroPairs:
        if self.token.device == torch.device(device):
            return self
        return self._map(lambda v: v.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> MicroPairs:
        return self._map(lambda v: v.pin_memory())


@dataclass
class StepSample:
    """The pairs of every micro-batch of one optimizer step. Their target words, concatenated
    in micro-batch order, form the step's label table (``words``; micro-batch i's rows start at
    ``offsets[i]``), whose features are computed once, on first use in the step (the
    embedding table does not change within a step)."""

    micro: list[MicroPairs | None]
    words: torch.Tensor = field(init=False)
    offsets: list[int] = field(init=False)
    table: torch.Tensor | None = field(default=None, init=False)

    def __post_init__(self):
        present = [m.words for m in self.micro if m is not None]
        self.offsets = [0]
        for m in self.micro:
            self.offsets.append(self.offsets[-1] + (0 if m is None else m.words.shape[0]))
        self.words = (present[0] if len(present) == 1 else torch.cat(present)) if present else \
            torch.zeros(0, dtype=torch.long)


@dataclass(frozen=True)
class Draws:
    """What the data loader needs to draw SEA's pairs for each micro-batch it builds: the grid,
    the window, the objective and the run's seed. A micro-batch's randomness comes from its
    place in the data stream (epoch, global micro-batch index), so the
    draws are fixed by the data position (nothing to save; a resumed run draws the same, on
    any world size) and belong to the batch, as the data order does. Why in the loader and not in the training
    step: with loader workers this host work overlaps the step instead of delaying it."""

    grid: tuple[int, int]
    window: int
    objective: str
    seed: int
    top_k: int = 0  # each patch's first k kept labels only (0: all)

    def generator(self, epoch: int, batch: int) -> torch.Generator:
        key = (self.seed * 1_000_003 + epoch) * 100_003 + batch
        return torch.Generator().manual_seed(key % (1 << 63))

    def __call__(self, ids, scores, epoch: int, batch: int) -> MicroPairs | None:
        if self.top_k:  # the shards keep each patch's labels best first
            ids, scores = ids[..., :self.top_k], scores[..., :self.top_k]
        return sample_pairs([(ids, scores)], self.grid, self.window,
                            [self.generator(epoch, batch)], self.objective)[0]


def draw_uniforms(gen: torch.Generator, batch: int, windows: int) -> torch.Tensor:
    """A micro-batch's randomness: per window (dy, dx, label draw, de-duplication priority)."""
    return torch.rand(batch, windows, 4, generator=gen)


def _host(t) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def sample_pairs(labels: list[tuple[torch.Tensor, torch.Tensor] | None], grid: tuple[int, int],
                 k: int, gens: list[torch.Generator], objective: str = "sampled") -> list[MicroPairs | None]:
    """Pairs of one or more micro-batches in one vectorised pass, as host tensors.

    ``labels[i]`` is micro-batch i's (ids, scores), each (B_i, P, n), or None (no labels);
    ``gens[i]`` its generator. Runs in numpy on the host, where the labels are: a micro-
    batch's candidates are a few hundred rows, which numpy handles in a fraction of a
    millisecond, while torch pays several microseconds of dispatch per operator and, on a
    GPU, would need every label copied over.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"sea.objective must be one of {OBJECTIVES}, got '{objective}'")
    nw = num_windows(grid, k)
    present = [i for i, lab in enumerate(labels) if lab is not None and lab[0].shape[0] > 0]
    out: list[MicroPairs | None] = [None] * len(labels)
    if not present:
        return out
    sizes = np.array([labels[i][0].shape[0] for i in present])
    u = torch.cat([draw_uniforms(gens[i], int(b), nw) for i, b in zip(present, sizes)]).numpy()
    ids = np.concatenate([_host(labels[i][0]) for i in present])
    scores = np.concatenate([_host(labels[i][1]) for i in present])
    nb, npatch, n = ids.shape
    image = np.repeat(np.arange(nb), nw)  # each candidate's image (over all micro-batches)
    flat = image * npatch + window_patches(u[..., :2], grid, k).reshape(-1)
    pid = ids.reshape(-1, n)[flat].astype(np.int64)
    psc = scores.reshape(-1, n)[flat].astype(np.float32)  # fp16 -> fp32 on the picks only
    u = u.reshape(-1, 4)
    micro = np.repeat(np.arange(len(present)), sizes * nw)  # each candidate's micro-batch
    if objective == "sampled":
        words, valid = draw_labels(pid, psc, u[:, 2])
        sel = np.flatnonzero(valid)
        # one pair per distinct word per micro-batch: key (micro-batch, word)
        sel = sel[dedupe(micro[sel] * (SENTINEL + 1) + words[sel], u[sel, 3])]
        words = words[sel]
    else:
        sel = np.flatnonzero((pid != SENTINEL).any(axis=1))
        weights = label_weights(pid[sel], psc[sel])
    # candidates are in micro-batch order, so every selection stays grouped by micro-batch
    first_image = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    bounds = np.concatenate([[0], np.cumsum(np.bincount(micro[sel], minlength=len(present)))])
    img = image[sel] - first_image[micro[sel]]
    pat = flat[sel] - image[sel] * npatch
    pid = pid[sel]

    def host(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a))

    for j, i in enumerate(present):
        part = slice(bounds[j], bounds[j + 1])
        token = host(img[part] * npatch + pat[part])
        if objective == "sampled":
            out[i] = MicroPairs(token, host(words[part]), patches=npatch)
        else:
            distinct, q = multi_targets(pid[part], weights[part])
            r = q / np.maximum(q.sum(axis=0, keepdims=True), 1e-30)
            out[i] = MicroPairs(token, host(distinct), host(q), host(r), host(pid[part]),
                                host(weights[part]), patches=npatch)
    return out


def sample_step(labels, grid: tuple[int, int], k: int, gens: list[torch.Generator],
                objective: str = "sampled", device: torch.device | str = "cpu") -> StepSample:
    """``sample_pairs`` for a step's micro-batches at once, on ``device``."""
    return StepSample([None if m is None else m.to(device)
                       for m in sample_pairs(labels, grid, k, gens, objective)])


class _SymmetricInfoNCE(torch.autograd.Function):
    """L_a as one autograd node: the pick of the sampled tokens, the temperature and a
    symmetric InfoNCE with soft targets.

    Loss: x = tokens' rows ``index`` (all rows when None); tau = max(exp(log_tau), min_tau);
    s = cos(x_i, t_u) (t already unit rows), logits = s / tau; token -> words: -sum_u q[i, u]
    log softmax_u(logits[i]), mean over i; words -> tokens: -sum_i r[i, u] log
    softmax_i(logits[:, u]), mean over u, with r = q / sum_i q[i, u]; the loss is half their
    sum. ``q=None`` is the identity (Eq. 9: one positive per row and column). ``r`` may be
    passed precomputed (``multi_targets``' q and r); the caller then guarantees that q's rows
    sum to 1, as multi_targets' do, which drops two operators from the gradient.
    Gradient, derived by hand: dlogits = (softmax_row * sum_u q - q) / (2N) + (softmax_col *
    sum_i r - r) / (2U); ds = dlogits / tau; d log_tau = -sum(ds * s) where the clamp is not
    active (else 0); through the matmul, the normalisation (I - xn xn^T) / |x| and the pick
    (an index_add).
    Why the gradient is computed in the forward: the loss is a scalar, so the backward only
    scales it by the incoming gradient. The node then keeps one (N, D) tensor and a scalar for
    the backward instead of its (N, U) intermediates, the row and column softmaxes come from
    the log-softmaxes in place, and the backward is three operators. On small batches the
    per-operator dispatch, not arithmetic, is L_a's cost, so both passes are written with as
    few operators as the formula allows. Computes in at least fp32, with autocast off. The
    tests check it against autograd of the plain formula (gradcheck in fp64) and against Eq. 9
    written term by term."""

    @staticmethod
    def forward(ctx, tokens, index, t, q, log_tau, min_tau, r=None, grad=True):
        # ``grad``: the caller's grad mode (inside forward it is always off, and
        # needs_input_grad does not see torch.no_grad), so evaluation skips the gradient
        need_x, need_tau = grad and ctx.needs_input_grad[0], grad and ctx.needs_input_grad[4]
        with _autocast_off(tokens.device.type):
            x = tokens.reshape(-1, tokens.shape[-1])
            if index is not None:
                x = x.index_select(0, index)
            if x.dtype not in (torch.float32, torch.float64):
                x = x.float()
            t, q, r, log_tau = (a if a is None or a.dtype == x.dtype else a.to(x.dtype)
                                for a in (t, q, r, log_tau))
            e = log_tau.exp()
            tau = e.clamp(min=min_tau)
            norm = torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min_(_EPS)
            xn = x / norm
            s = xn @ t.T
            logits = s / tau
            lr, lc = logits.log_softmax(dim=1), logits.log_softmax(dim=0)
            n, u = logits.shape
            rows_sum_to_one = r is not None
            if q is None:
                loss = lr.add(lc).trace().mul(-0.5 / n)  # diagonals: one positive each way
            else:
                if r is None:
                    r = q / q.sum(dim=0, keepdim=True)
                loss = torch.addcmul(lr.mul(q), lc, r, value=n / u).sum().mul(-0.5 / n)
            dx = d_log_tau = None
            if need_x or need_tau:  # the softmaxes from the log-softmaxes, in place
                if q is None:  # N = U
                    ds = lr.exp_().add_(lc.exp_())
                    ds.diagonal().sub_(2.0)
                else:  # in units of the row term's 1/(2N); r's columns sum to 1 by construction
                    ds = lr.exp_()
                    if not rows_sum_to_one:
                        ds.mul_(q.sum(dim=1, keepdim=True))
                    ds.sub_(q).add_(lc.exp_().sub_(r), alpha=n / u)
                ds.mul_(0.5 / n).div_(tau)  # dL/ds = dlogits / tau
            if need_tau:
                # dL/dtau = -sum(ds * s) / tau and dtau/dlog_tau = exp(log_tau) = tau where the
                # clamp is not active, else 0
                d_log_tau = torch.where(e > min_tau, -torch.vdot(ds.reshape(-1), s.reshape(-1)), 0.0)
            if need_x:
                dxn = ds @ t
                # the normalisation's Jacobian (I - xn xn^T) / |x|; below the clamp, I / eps
                along = (dxn * xn).sum(dim=1, keepdim=True).mul_(norm > _EPS)
                dx = torch.addcmul(dxn, xn, along, value=-1.0).div_(norm)
        ctx.save_for_backward(dx, index, d_log_tau)
        ctx.shape, ctx.x_dtype = tokens.shape, tokens.dtype
        return loss

    @staticmethod
    @once_differentiable  # the saved gradient is a constant: a second derivative would be wrong
    def backward(ctx, g):
        dx, index, d_log_tau = ctx.saved_tensors
        dtokens = None
        if d_log_tau is not None:
            d_log_tau = d_log_tau * g
        if dx is not None:
            dx = dx * g
            if index is not None:
                dx = dx.new_zeros(ctx.shape[:-1].numel(), dx.shape[1]).index_add_(0, index, dx)
            dtokens = dx.view(ctx.shape)
            if dtokens.dtype != ctx.x_dtype:
                dtokens = dtokens.to(ctx.x_dtype)
        return dtokens, None, None, None, d_log_tau, None, None, None


def _autocast_off(device_type: str):
    """Autocast disabled (the loss is fp32), without the context manager's cost when it is off."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _targets(t: torch.Tensor, t_unit: bool) -> torch.Tensor:
    if t.requires_grad:
        raise ValueError("the label features are targets: pass them detached")
    return t if t_unit else F.normalize(t if t.dtype == torch.float64 else t.float(), dim=-1)


def info_nce(x: torch.Tensor, t: torch.Tensor, log_tau: torch.Tensor, min_tau: float = 0.0,
             index: torch.Tensor | None = None, t_unit: bool = False) -> torch.Tensor:
    """Symmetric InfoNCE (Eq. 9) over N matched rows of x (or x's rows ``index``, x then any
    (..., D)) and t, cosine similarity / tau, tau = max(exp(log_tau), min_tau).
    ``t_unit``: t is already L2-normalised (the step's label table is normalised once)."""
    if t.shape[0] == 0:
        return x.sum() * 0.0
    return _SymmetricInfoNCE.apply(x, index, _targets(t, t_unit), None, log_tau, min_tau, None,
                                   torch.is_grad_enabled())


def multi_info_nce(x: torch.Tensor, t: torch.Tensor, q: torch.Tensor, log_tau: torch.Tensor,
                   min_tau: float = 0.0, index: torch.Tensor | None = None,
                   t_unit: bool = False, r: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-positive symmetric InfoNCE. x (N, D) visual tokens (or x's rows ``index``), t
    (U, D) the features of the distinct label words, q (N, U) each token's target
    distribution over U (s / sum(s) of its kept labels). Token -> words: cross-entropy of
    softmax over U against q[i]. Word -> tokens: for word u, cross-entropy of softmax over the
    N tokens against q[:, u] / sum_i q[i, u] (the tokens carrying u, by their weight for u).
    L = mean of both directions' means. ``r``: that column-normalised q, if already known;
    passing it promises that q's rows sum to 1 (``multi_targets``' do)."""
    if t.shape[0] == 0 or q.shape[0] == 0:
        return x.sum() * 0.0
    return _SymmetricInfoNCE.apply(x, index, _targets(t, t_unit), q, log_tau, min_tau, r,
                                   torch.is_grad_enabled())


class AlignmentLoss(nn.Module):
    """L_a with its learnable temperature. ``sample`` draws a step's pairs; ``forward`` takes a
    micro-batch's visual tokens and its pairs."""

    def __init__(self, word_tokens: WordTokens, grid: tuple[int, int], window: int = 2,
                 log_tau_init: float = 0.0, learn_tau: bool = True, min_tau: float = 0.01,
                 objective: str = "sampled", top_k: int = 0):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"sea.objective must be one of {OBJECTIVES}, got '{objective}'")
        self.log_tau = nn.Parameter(torch.tensor(float(log_tau_init)), requires_grad=learn_tau)
        self.register_buffer("flat_ids", word_tokens.flat_ids, persistent=False)
        self.register_buffer("offsets", word_tokens.offsets, persistent=False)
        self.register_buffer("pad_ids", word_tokens.pad_ids, persistent=False)
        self.register_buffer("pad_w", word_tokens.pad_w, persistent=False)
        self.grid = tuple(grid)
        self.window = window
        self.min_tau = min_tau
        self.objective = objective
        self.top_k = top_k

    @property
    def tau(self) -> torch.Tensor:
        return self.log_tau.exp().clamp(min=self.min_tau)

    def sample(self, labels, gens, device=None) -> StepSample:
        """A step's pairs drawn here (the trainer's loader draws them instead: ``draws``)."""
        return sample_step(labels, self.grid, self.window, gens, self.objective,
                           device if device is not None else self.flat_ids.device)

    def draws(self, seed: int) -> Draws:
        return Draws(self.grid, self.window, self.objective, seed, self.top_k)

    def _features(self, embed_weight: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        """Eq. 8 for ``words`` (``eq8``). Targets: no gradient into the embedding table."""
        with torch.no_grad():
            return eq8(embed_weight.detach(), self.pad_ids, self.pad_w, words)

    def _unit_features(self, embed_weight: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        """``_features`` in at least fp32, L2-normalised (as F.normalize, in fewer operators)."""
        f = self._features(embed_weight, words)
        if f.dtype not in (torch.float32, torch.float64):
            f = f.float()
        return f.div_(torch.linalg.vector_norm(f, dim=1, keepdim=True).clamp_min_(_EPS))

    def forward(self, visual_tokens: torch.Tensor | None, embed_weight: torch.Tensor,
                step: StepSample | None, micro: int, gather=None,
                shared_gen: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
        """``gather`` (cross-rank negatives) is collective: every rank calls it for every
        micro-batch, labelled or not. ``shared_gen`` is the same on every rank: it picks which
        pair of a word found on several ranks survives."""
        dev = embed_weight.device
        pairs = step.micro[micro] if step is not None else None
        multi = self.objective == "multi"
        if gather is None:
            if pairs is None or visual_tokens is None or pairs.token.numel() == 0:
                # no pairs here: 0, the temperature attached (DDP sees every parameter used)
                return self.log_tau * 0.0, 0
            if step.table is None:  # once per step: the embedding table does not change within it
                step.table = self._unit_features(embed_weight, step.words)
            t = step.table.narrow(0, step.offsets[micro], pairs.words.shape[0])
            args = (self.log_tau, self.min_tau, pairs.token, True)
            loss = multi_info_nce(visual_tokens, t, pairs.q, *args, r=pairs.r) if multi else \
                info_nce(visual_tokens, t, *args)
            return loss, int(pairs.token.numel())
        # cross-rank negatives: collective, so every rank gathers, with or without pairs
        if pairs is None or visual_tokens is None:
            empty = torch.zeros(0, dtype=torch.long, device=dev)
            x = embed_weight.new_zeros(0, embed_weight.shape[1]) + 0.0 * self.log_tau
            pairs = MicroPairs(empty, empty, ids=empty[:, None],
                               weights=torch.zeros(0, 1, device=dev))
        else:
            x = visual_tokens.reshape(-1, visual_tokens.shape[-1]).index_select(0, pairs.token)
        if multi:
            x, ids, weights = gather(x, pairs.ids, pairs.weights)
            words, q = (torch.from_numpy(a).to(dev) for a in multi_targets(_host(ids), _host(weights)))
            t = self._features(embed_weight, words)
            return multi_info_nce(x, t, q, self.log_tau, self.min_tau), int(x.shape[0])
        x, words = gather(x, pairs.words)
        prio = torch.rand(words.shape[0], generator=shared_gen).numpy()
        keep = torch.from_numpy(dedupe(_host(words), prio)).to(dev)
        t = self._features(embed_weight, words[keep])
        return info_nce(x, t, self.log_tau, self.min_tau, index=keep), int(keep.numel())
