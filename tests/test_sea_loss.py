"""The SEA loss and sampler against hand-written references."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.shards import SENTINEL
from trainer.sea_loss import (
    AlignmentLoss,
    WordTokens,
    dedupe,
    draw_labels,
    info_nce,
    multi_info_nce,
    multi_targets,
    num_windows,
    sample_step,
    tokenize_words,
    window_patches,
)


def _one(ids, scores, grid, k, seed=0, objective="sampled"):
    """sample_step for a single micro-batch -> its MicroPairs."""
    step = sample_step([(ids, scores)], grid, k, [torch.Generator().manual_seed(seed)], objective)
    return step, step.micro[0]


def _hand_infonce(x, t, tau):
    """Eq. 9 written term by term."""
    n = len(x)
    phi = lambda a, b: float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))  # noqa: E731
    total = 0.0
    for i in range(n):
        num = math.exp(phi(x[i], t[i]) / tau)
        total += math.log(num / sum(math.exp(phi(x[i], t[j]) / tau) for j in range(n)))
        num = math.exp(phi(t[i], x[i]) / tau)
        total += math.log(num / sum(math.exp(phi(t[i], x[j]) / tau) for j in range(n)))
    return -total / (2 * n)


@pytest.mark.parametrize("tau", [1.0, 0.07, 2.5])
def test_info_nce_matches_hand_written_eq9(tau):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, generator=g, dtype=torch.float64)
    t = torch.randn(5, 7, generator=g, dtype=torch.float64)
    got = info_nce(x, t, torch.tensor(tau, dtype=torch.float64).log())
    assert float(got) == pytest.approx(_hand_infonce(x.numpy(), t.numpy(), tau), rel=1e-6)
    # asymmetric inputs: swapping x and t gives the same value (both directions are in)
    assert float(info_nce(t, x, torch.tensor(tau).log())) == pytest.approx(float(got), rel=1e-5)


def test_one_direction_alone_is_not_the_loss():
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    logits = F.normalize(x, dim=-1) @ F.normalize(t, dim=-1).T
    one_way = F.cross_entropy(logits, torch.arange(4))
    assert not torch.isclose(info_nce(x, t, torch.tensor(0.0)), one_way)


def test_gradients_reach_adapter_and_temperature_only():
    emb = torch.nn.Embedding(20, 6)
    emb.weight.requires_grad_(True)
    adapter = torch.nn.Linear(4, 6)
    wt = WordTokens(torch.tensor([1, 2, 3, 4, 5, 6, 7, 8]), torch.tensor([0, 2, 3, 5, 6, 7]))
    loss_mod = AlignmentLoss(wt, grid=(2, 2), window=1)
    feats = torch.randn(3, 4, 4, requires_grad=False)
    ids = torch.tensor([[[0, 1], [2, SENTINEL], [3, 4], [5, 0]]] * 3)
    scores = torch.ones(3, 4, 2)
    step = loss_mod.sample([(ids, scores)], [torch.Generator().manual_seed(0)])
    x = adapter(feats)
    loss, n = loss_mod(x, emb.weight, step, 0)
    assert n > 1
    # the step-table path gives Eq. 9 over the picked tokens and their words' Eq. 8 features
    mp = step.micro[0]
    feats_w = wt.features(emb.weight.detach())[mp.words]
    want = _hand_infonce(x[mp.img, mp.pat].detach().double().numpy(), feats_w.double().numpy(), 1.0)
    assert float(loss.detach()) == pytest.approx(want, rel=1e-5)
    loss.backward()
    assert adapter.weight.grad is not None and adapter.weight.grad.abs().sum() > 0
    assert loss_mod.log_tau.grad is not None and loss_mod.log_tau.grad != 0
    assert emb.weight.grad is None  # label features are targets
    assert float(loss_mod.tau.detach()) == pytest.approx(1.0)  # log tau initialised at 0


def test_label_feature_is_mean_of_token_embeddings():
    w = torch.randn(10, 3)
    wt = WordTokens(torch.tensor([4, 7, 9, 2, 2]), torch.tensor([0, 3, 4]))
    table = wt.features(w)
    torch.testing.assert_close(table[0], (w[4] + w[7] + w[9]) / 3)
    torch.testing.assert_close(table[1], w[2])
    torch.testing.assert_close(table[2], w[2])
    torch.testing.assert_close(wt.features(w, torch.tensor([2, 0])), table[[2, 0]])


def test_window_sampling_one_patch_per_window():
    gen = torch.Generator().manual_seed(0)
    for grid, k in [((24, 24), 2), ((27, 27), 2), ((8, 8), 3), ((5, 7), 2)]:
        p = window_patches(torch.rand(50, num_windows(grid, k), 2, generator=gen).numpy(), grid, k)
        ys, xs = p // grid[1], p % grid[1]
        wins = (ys // k) * (-(-grid[1] // k)) + xs // k
        n_win = (-(-grid[0] // k)) * (-(-grid[1] // k))
        assert p.shape == (50, n_win)
        for row in wins:  # every window exactly once
            assert sorted(row.tolist()) == list(range(n_win))
    # every position inside a window gets drawn (uniform, not a fixed corner)
    p = window_patches(torch.rand(4000, 1, 2, generator=gen).numpy(), (2, 2), 2)
    counts = np.bincount(p.flatten(), minlength=4) / 4000
    assert np.all(np.abs(counts - 0.25) < 0.03)


def test_label_draw_follows_normalised_scores():
    """Chi-square goodness of fit over 20,000 seeded draws at significance 1e-4: the statistic
    must stay below 21.108, the chi-square(3 dof) quantile at 1 - 1e-4."""
    scores = np.array([[0.5, 0.3, 0.15, 0.05, 0.0]], dtype=np.float32)
    ids = np.array([[10, 11, 12, 13, SENTINEL]])
    gen = torch.Generator().manual_seed(123)
    n = 20_000
    words, valid = draw_labels(np.repeat(ids, n, 0), np.repeat(scores, n, 0), torch.rand(n, generator=gen).numpy())
    assert valid.all()
    counts = np.bincount(words - 10, minlength=4)
    expected = scores[0, :4] / scores[0, :4].sum() * n
    stat = float(((counts - expected) ** 2 / expected).sum())
    assert stat < 21.108, stat
    assert np.abs(counts / n - expected / n).max() < 0.015  # and within 1.5 points each
    # no kept label -> skipped; all-zero scores -> uniform over the kept ones
    ids2 = np.array([[SENTINEL, SENTINEL], [5, 6]])
    w2, v2 = draw_labels(ids2, np.zeros((2, 2), np.float32), torch.rand(2, generator=gen).numpy())
    assert v2.tolist() == [False, True] and int(w2[1]) in (5, 6)


def test_duplicates_reduced_to_one_random_pair():
    gen = torch.Generator().manual_seed(0)
    words = np.array([3, 7, 3, 3, 9, 7])
    picks = []
    for _ in range(300):
        keep = dedupe(words, torch.rand(len(words), generator=gen).numpy())
        assert sorted(words[keep].tolist()) == [3, 7, 9]
        picks.append(int(keep[words[keep] == 3][0]))
    assert set(picks) == {0, 2, 3}  # which duplicate survives is random


def test_sample_pairs_skip_unlabelled_and_dedupe():
    ids = torch.full((2, 16, 3), SENTINEL)
    ids[0, :, 0] = torch.arange(16)
    ids[1, :, 0] = 3  # every patch of image 1 has the same label
    scores = torch.ones(2, 16, 3)
    _, mp = _one(ids, scores, (4, 4), 2, seed=5)
    img, pat, words = mp.img, mp.pat, mp.words
    assert len(set(words.tolist())) == len(words)  # one pair per word
    assert (img == 1).sum() <= 1
    assert torch.equal(ids[img, pat, 0], words)


def test_step_sampling_is_per_micro_batch_and_vectorised_alike():
    """Sampling a whole step at once gives each micro-batch exactly the pairs it gets alone
    (same generator), and de-duplicates within a micro-batch only."""
    g = torch.Generator().manual_seed(9)
    labs = []
    for _ in range(3):
        ids = torch.randint(0, 6, (2, 16, 3), generator=g)
        ids[:, :, 2] = SENTINEL
        labs.append((ids, torch.rand(2, 16, 3, generator=g)))
    gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(3)]  # noqa: E731
    step = sample_step(labs, (4, 4), 2, gens())
    for i in range(3):
        alone = sample_step([labs[i]], (4, 4), 2, [gens()[i]]).micro[0]
        mp = step.micro[i]
        assert torch.equal(mp.img, alone.img) and torch.equal(mp.pat, alone.pat)
        assert torch.equal(mp.words, alone.words)
        # the step's label table is the micro-batches' target words, in order
        assert torch.equal(step.words[step.offsets[i]:step.offsets[i + 1]], mp.words)
        assert len(set(mp.words.tolist())) == len(mp.words)
    # a word may repeat across micro-batches (each is its own InfoNCE)
    assert len(set(step.words.tolist())) < len(step.words)
    # a micro-batch without labels gets None
    assert sample_step([None, labs[0]], (4, 4), 2, gens()[:2]).micro[0] is None


def _hand_multi(x, ids, sc, feats, tau):
    """The multi-label objective written out term by term (README, "sea.objective=multi")."""
    n = len(x)
    phi = lambda a, b: float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))  # noqa: E731
    q = []  # each token's target: its kept labels, s / sum(s)
    for i in range(n):
        kept = {}  # a word in two slots counts with both scores
        for w, s in zip(ids[i], sc[i]):
            if w != SENTINEL:
                kept[int(w)] = kept.get(int(w), 0.0) + max(float(s), 0.0)
        tot = sum(kept.values())
        if tot == 0:  # all-zero scores: uniform over the kept slots
            slots = [int(w) for w in ids[i] if w != SENTINEL]
            kept = {w: slots.count(w) for w in slots}
            tot = len(slots)
        q.append({w: v / tot for w, v in kept.items() if v > 0})
    words = sorted({w for d in q for w in d})
    logit = [[phi(x[i], feats[w]) / tau for w in words] for i in range(n)]
    to_words = 0.0
    for i in range(n):
        z = sum(math.exp(v) for v in logit[i])
        to_words -= sum(q[i].get(w, 0.0) * (logit[i][j] - math.log(z)) for j, w in enumerate(words))
    to_tokens = 0.0
    for j, w in enumerate(words):
        tot = sum(q[i].get(w, 0.0) for i in range(n))
        z = sum(math.exp(logit[i][j]) for i in range(n))
        to_tokens -= sum(q[i].get(w, 0.0) / tot * (logit[i][j] - math.log(z)) for i in range(n))
    return 0.5 * (to_words / n + to_tokens / len(words))


@pytest.mark.parametrize("tau", [1.0, 0.1])
def test_multi_objective_matches_hand_written_reference(tau):
    g = torch.Generator().manual_seed(4)
    n, k, vocab, d = 6, 3, 9, 5
    ids = torch.randint(0, vocab, (n, k), generator=g)
    ids[:, 0] = torch.randperm(vocab, generator=g)[:n]  # distinct first labels
    ids[1, 1:] = SENTINEL
    ids[2, 2] = ids[2, 1] = (ids[2, 0] + 1) % vocab  # a word repeated within one token's labels
    sc = torch.rand(n, k, generator=g, dtype=torch.float64)
    sc[3] = 0  # all-zero scores: uniform over the kept labels
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    feats = torch.randn(vocab, d, generator=g, dtype=torch.float64)
    from trainer.sea_loss import label_weights

    words, q = multi_targets(ids.numpy(), label_weights(ids.numpy(), sc.numpy()))
    got = multi_info_nce(x, feats[words], torch.from_numpy(q), torch.tensor(tau, dtype=torch.float64).log())
    want = _hand_multi(x.numpy(), ids.numpy(), sc.numpy(), feats.numpy(), tau)
    assert float(got) == pytest.approx(want, rel=1e-5)  # the loss computes in fp32


def test_multi_objective_gradients_reach_adapter_and_temperature_only():
    emb = torch.nn.Embedding(20, 6)
    adapter = torch.nn.Linear(4, 6)
    wt = WordTokens(torch.tensor([1, 2, 3, 4, 5, 6, 7, 8]), torch.tensor([0, 2, 3, 5, 6, 7]))
    loss_mod = AlignmentLoss(wt, grid=(2, 2), window=1, objective="multi")
    ids = torch.tensor([[[0, 1], [2, SENTINEL], [3, 4], [5, 0]]] * 3)
    scores = torch.rand(3, 4, 2, generator=torch.Generator().manual_seed(1))
    step = loss_mod.sample([(ids, scores)], [torch.Generator().manual_seed(0)])
    assert step.micro[0].ids.shape == (12, 2)  # every patch (window 1), all its labels
    x = adapter(torch.randn(3, 4, 4))
    loss, n = loss_mod(x, emb.weight, step, 0)
    assert n == 12
    mp = step.micro[0]
    want = _hand_multi(x[mp.img, mp.pat].detach().double().numpy(), mp.ids.numpy(),
                       mp.weights.double().numpy(), wt.features(emb.weight.detach()).double().numpy(), 1.0)
    assert float(loss.detach()) == pytest.approx(want, rel=1e-5)
    loss.backward()
    assert adapter.weight.grad is not None and adapter.weight.grad.abs().sum() > 0
    assert loss_mod.log_tau.grad is not None and loss_mod.log_tau.grad != 0
    assert emb.weight.grad is None


def test_space_rule_gives_mid_sentence_tokens(tiny_llm):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llm)
    wt = tokenize_words(tok, ["cat", "aardvark"], "space")
    first = wt.flat_ids[: int(wt.offsets[1])].tolist()
    assert first == tok(" cat", add_special_tokens=False)["input_ids"]
    bare = tokenize_words(tok, ["cat"], "bare")
    assert bare.flat_ids.tolist() == tok("cat", add_special_tokens=False)["input_ids"]


@pytest.mark.slow
def test_gathered_negatives_hold_each_word_once(tmp_path):
    """2 gloo ranks whose pairs share words: after gathering, each word once over all ranks,
    the same loss on every rank, and each rank's tokens get their gradient of that loss."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import _gather_worker as w

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "gather.pt"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc-per-node=2", str(repo / "tests" / "_gather_worker.py"), str(out)],
                       cwd=repo, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    ranks = torch.load(out, weights_only=False)
    all_words = [wd for rk in ranks for wd in rk["words"]]
    assert len(all_words) > len(set(all_words))  # the ranks' pairs do share words
    assert ranks[0]["pairs"] == ranks[1]["pairs"] == len(set(all_words))
    assert ranks[0]["loss"] == ranks[1]["loss"]
    # one process, by hand: the gathered rows in rank order, one per word by the shared draw
    toks = [w.rank_inputs(k)[2].requires_grad_(True) for k in range(2)]
    x = torch.cat([toks[k][ranks[k]["img"], ranks[k]["pat"]] for k in range(2)])
    words = torch.tensor(all_words)
    keep = dedupe(words.numpy(), torch.rand(len(words), generator=torch.Generator().manual_seed(77)).numpy())
    assert sorted(words[keep].tolist()) == sorted(set(all_words))
    mod = w.loss_module()
    loss = info_nce(x[keep], mod._features(w.embed(), words[keep]), mod.log_tau, mod.min_tau)
    assert float(loss.detach()) == pytest.approx(ranks[0]["loss"], rel=1e-12)
    loss.backward()
    for k in range(2):  # each rank holds world x its slice (DDP then averages over ranks)
        torch.testing.assert_close(ranks[k]["grad"], 2 * toks[k].grad)
    # multi, rank 1 without labels: both ranks get the loss of rank 0's pairs alone
    token, ids, weights = ranks[0]["multi_pick"]
    assert ranks[1]["multi_pick"] is None
    assert ranks[0]["multi_pairs"] == ranks[1]["multi_pairs"] == len(token) > 0
    words, q = multi_targets(ids.numpy(), weights.numpy())
    m = w.loss_module("multi")
    want = multi_info_nce(w.rank_inputs(0)[2].reshape(-1, 5)[token], m._features(w.embed(), torch.from_numpy(words)),
                          torch.from_numpy(q), m.log_tau, m.min_tau)
    assert ranks[0]["multi_loss"] == ranks[1]["multi_loss"] == pytest.approx(float(want.detach()), rel=1e-12)
    assert all("differ in shape" in (rk["width_error"] or "") for rk in ranks)


def test_step_label_features_equal_eq8_table():
    """Eq. 8 has one implementation (``eq8``: a padded, weighted embedding bag): the loss's
    step features and the word table used by evaluation both equal the mean of each word's
    token embeddings computed word by word."""
    from trainer.sea_loss import AlignmentLoss, WordTokens

    g = torch.Generator().manual_seed(0)
    lens = torch.randint(1, 6, (500,), generator=g)
    flat = torch.randint(0, 300, (int(lens.sum()),), generator=g)
    offs = torch.cumsum(lens, 0) - lens
    mod = AlignmentLoss(WordTokens(flat, offs), (4, 4))
    emb = torch.randn(300, 16, generator=g)
    words = torch.randint(0, 500, (77,), generator=g)
    ref = torch.stack([emb[flat[o:o + n]].mean(0) for o, n in zip(offs[words].tolist(), lens[words].tolist())])
    assert torch.allclose(mod._features(emb, words), ref, atol=1e-6)
    assert torch.allclose(WordTokens(flat, offs).features(emb, words), ref, atol=1e-6)


def _literal_step(labels, grid, k, gens, objective):
    """SEA's sampling written as loops over micro-batches, images, windows, from the same
    uniforms the sampler draws (per window: dy, dx, label draw, de-duplication priority)."""
    gh, gw = grid
    out = []
    for (ids, scores), gen in zip(labels, gens, strict=True):
        nwin = (-(-gh // k)) * (-(-gw // k))
        u = torch.rand(ids.shape[0], nwin, 4, generator=gen).numpy()
        cands = []  # (img, patch, word or (ids, weights), priority)
        for b in range(ids.shape[0]):
            w = 0
            for y0 in range(0, gh, k):
                for x0 in range(0, gw, k):
                    h, wd = min(k, gh - y0), min(k, gw - x0)
                    dy = int(np.float32(u[b, w, 0]) * np.float32(h))
                    dx = int(np.float32(u[b, w, 1]) * np.float32(wd))
                    pat = (y0 + dy) * gw + x0 + dx
                    row_ids = [int(i) for i in ids[b, pat]]
                    row_sc = [float(s) for s in scores[b, pat].float()]
                    kept = [j for j, i in enumerate(row_ids) if i != SENTINEL]
                    if kept:
                        wts = [max(row_sc[j], 0.0) if j in kept else 0.0 for j in range(len(row_ids))]
                        if sum(wts) <= 0:
                            wts = [1.0 if j in kept else 0.0 for j in range(len(row_ids))]
                        tot = sum(wts)
                        wts = [x / tot for x in wts]
                        if objective == "multi":
                            cands.append((b, pat, (row_ids, wts), None))
                        else:  # inverse CDF: the first label whose cumulative weight reaches u
                            acc, pick = 0.0, kept[-1]
                            for j in range(len(row_ids)):
                                acc += wts[j]
                                if wts[j] > 0 and acc >= u[b, w, 2]:
                                    pick = j
                                    break
                            cands.append((b, pat, row_ids[pick], float(u[b, w, 3])))
                    w += 1
        if objective == "sampled":  # one pair per word: the lowest priority
            best = {}
            for c in cands:
                if c[2] not in best or c[3] < best[c[2]][3]:
                    best[c[2]] = c
            cands = [c for c in cands if best[c[2]] is c]
        out.append(cands)
    return out


@pytest.mark.parametrize("objective", ["sampled", "multi"])
@pytest.mark.parametrize("grid,k", [((4, 4), 2), ((5, 7), 2), ((6, 6), 3)])
def test_step_sampling_equals_literal_loops(objective, grid, k):
    """The vectorised step sampler picks exactly the pairs the loop above picks, for several
    micro-batches with unlabelled patches, all-zero and negative scores and repeated words."""
    g = torch.Generator().manual_seed(sum(grid) * 10 + k)
    p = grid[0] * grid[1]
    labels = []
    for b in (3, 1, 2):
        ids = torch.randint(0, 7, (b, p, 3), generator=g)
        ids[torch.rand(b, p, 3, generator=g) < 0.3] = SENTINEL
        sc = (torch.rand(b, p, 3, generator=g) - 0.2).half()  # fp16, as the loader gives
        sc[:, ::5] = 0
        labels.append((ids, sc))
    gens = lambda: [torch.Generator().manual_seed(40 + i) for i in range(3)]  # noqa: E731
    step = sample_step(labels, grid, k, gens(), objective)
    want = _literal_step(labels, grid, k, gens(), objective)
    for mp, cands in zip(step.micro, want, strict=True):
        assert [(int(i), int(q)) for i, q in zip(mp.img, mp.pat)] == [(c[0], c[1]) for c in cands]
        if objective == "sampled":
            assert mp.words.tolist() == [c[2] for c in cands]
        else:
            assert mp.ids.tolist() == [c[2][0] for c in cands]
            np.testing.assert_allclose(np.asarray(mp.weights, dtype=np.float64),
                                       [c[2][1] for c in cands], rtol=1e-6)
            # the targets: the distinct positive words, q over them and r = q / column sums
            pos = {w for c in cands for w, s in zip(*c[2]) if s > 0}
            assert mp.words.tolist() == sorted(pos)
            q = np.zeros((len(cands), len(pos)))
            for i, c in enumerate(cands):
                for w, s in zip(*c[2]):
                    if s > 0:
                        q[i, sorted(pos).index(w)] += s
            np.testing.assert_allclose(mp.q.numpy(), q, rtol=1e-6)
            np.testing.assert_allclose(mp.r.numpy(), q / q.sum(axis=0), rtol=1e-6)


def _plain_soft_infonce(x, t, q, tau):
    """The loss with autograd's own operators (the form before the hand-written backward)."""
    logits = F.normalize(x, dim=-1) @ F.normalize(t, dim=-1).T / tau
    if q is None:
        target = torch.arange(x.shape[0])
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    r = q / q.sum(dim=0, keepdim=True)
    return 0.5 * (-(q * logits.log_softmax(dim=1)).sum(dim=1).mean()
                  - (r * logits.log_softmax(dim=0)).sum(dim=0).mean())


@pytest.mark.parametrize("soft", [False, True])
def test_hand_written_backward_equals_autograd(soft):
    """The one-node loss (the pick of tokens, the temperature, the InfoNCE) gives the plain
    formula's value and gradients for the tokens and log tau (through exp and the clamp), and
    passes gradcheck, in fp64."""
    from trainer.sea_loss import _SymmetricInfoNCE

    g = torch.Generator().manual_seed(3)
    n, u, d = 7, (5 if soft else 7), 6
    tokens = torch.randn(2, 6, d, generator=g, dtype=torch.float64)
    index = torch.tensor([0, 3, 5, 6, 7, 10, 11])  # 7 of the 12 tokens, over both images
    tokens[0, 3] *= 1e-3  # a short row: the normalisation's Jacobian matters
    t = F.normalize(torch.randn(u, d, generator=g, dtype=torch.float64), dim=-1)
    q = None
    if soft:
        q = torch.rand(n, u, generator=g, dtype=torch.float64) * (torch.rand(n, u, generator=g) < 0.6)
        q[:, 0] += 0.1  # every row and column has some weight
        q[0, 1:] += 0.2
        q = q / q.sum(dim=1, keepdim=True)
    for log_tau0, min_tau in ((0.3, 0.01), (-2.0, 0.01), (-5.0, 0.05)):  # the last one clamped
        grads = []
        # the node (for soft targets also with r given, the loader's path), then autograd;
        # the loss is scaled before the backward, as the step scales it (lambda / micro-batches)
        fns = [lambda a, lt, m=min_tau: _SymmetricInfoNCE.apply(a, index, t, q, lt, m)]
        if soft:
            fns.append(lambda a, lt, m=min_tau: _SymmetricInfoNCE.apply(
                a, index, t, q, lt, m, q / q.sum(dim=0, keepdim=True)))
        fns.append(lambda a, lt, m=min_tau: _plain_soft_infonce(a.reshape(-1, d)[index], t, q,
                                                                lt.exp().clamp(min=m)))
        for fn in fns:
            ta = tokens.clone().requires_grad_(True)
            log_tau = torch.tensor(log_tau0, dtype=torch.float64, requires_grad=True)
            loss = fn(ta, log_tau)
            (loss * 0.37).backward()
            grads.append((float(loss.detach()), ta.grad, log_tau.grad))
            with torch.no_grad():  # evaluation (the node skips the gradient): the same value
                assert float(fn(ta, log_tau)) == pytest.approx(float(loss), rel=1e-12)
        l2, gx2, gt2 = grads[-1]
        for l1, gx1, gt1 in grads[:-1]:
            assert l1 == pytest.approx(l2, rel=1e-12)
            torch.testing.assert_close(gx1, gx2, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(gt1, gt2, rtol=1e-9, atol=1e-12)
        gx1, gt1 = grads[0][1:]
        flat = gx1.reshape(-1, d)
        unpicked = [i for i in range(12) if i not in index.tolist()]
        assert flat[unpicked].abs().sum() == 0 and flat[index].abs().sum(dim=1).min() > 0
        if log_tau0 == -5.0:
            assert float(gt1) == 0.0  # clamped temperature: no gradient
    lt = torch.tensor(-1.5, dtype=torch.float64, requires_grad=True)
    ta = tokens.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: _SymmetricInfoNCE.apply(a, index, t, q, b, 0.01), (ta, lt))
    # the gradient is computed in the forward and saved: a second derivative is refused, not
    # silently wrong
    (gx,) = torch.autograd.grad(_SymmetricInfoNCE.apply(ta, index, t, q, lt, 0.01), ta, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        gx.sum().backward()


def test_loss_is_fp32_under_bf16_autocast():
    """Under autocast the visual tokens arrive in bf16; L_a still computes in fp32 and hands
    back a bf16 gradient."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 8, generator=g).bfloat16().requires_grad_(True)
    t = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    tau = torch.tensor(0.07)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = info_nce(x, t, tau.log(), t_unit=True)
    assert loss.dtype == torch.float32
    assert float(loss.detach()) == pytest.approx(float(_plain_soft_infonce(x.detach().float(), t, None, tau)), rel=1e-6)
    loss.backward()
    assert x.grad.dtype == torch.bfloat16 and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="targets"):
        info_nce(x, t.requires_grad_(True), tau.log())
