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
    dedupe_words,
    draw_labels,
    info_nce,
    sample_pairs,
    tokenize_words,
    window_patches,
)


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
    got = info_nce(x, t, torch.tensor(tau, dtype=torch.float64))
    assert float(got) == pytest.approx(_hand_infonce(x.numpy(), t.numpy(), tau), rel=1e-6)
    # asymmetric inputs: swapping x and t gives the same value (both directions are in)
    assert float(info_nce(t, x, torch.tensor(tau))) == pytest.approx(float(got), rel=1e-5)


def test_one_direction_alone_is_not_the_loss():
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    logits = F.normalize(x, dim=-1) @ F.normalize(t, dim=-1).T
    one_way = F.cross_entropy(logits, torch.arange(4))
    assert not torch.isclose(info_nce(x, t, torch.tensor(1.0)), one_way)


def test_gradients_reach_adapter_and_temperature_only():
    emb = torch.nn.Embedding(20, 6)
    emb.weight.requires_grad_(True)
    adapter = torch.nn.Linear(4, 6)
    wt = WordTokens(torch.tensor([1, 2, 3, 4, 5, 6, 7, 8]), torch.tensor([0, 2, 3, 5, 6, 7]))
    loss_mod = AlignmentLoss(wt, grid=(2, 2), window=1)
    feats = torch.randn(3, 4, 4, requires_grad=False)
    ids = torch.tensor([[[0, 1], [2, SENTINEL], [3, 4], [5, 0]]] * 3)
    scores = torch.ones(3, 4, 2)
    loss, n = loss_mod(adapter(feats), emb.weight, ids, scores, torch.Generator().manual_seed(0))
    assert n > 1
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
        p = window_patches(50, grid, k, gen)
        ys, xs = p // grid[1], p % grid[1]
        wins = (ys // k) * (-(-grid[1] // k)) + xs // k
        n_win = (-(-grid[0] // k)) * (-(-grid[1] // k))
        assert p.shape == (50, n_win)
        for row in wins:  # every window exactly once
            assert sorted(row.tolist()) == list(range(n_win))
    # every position inside a window gets drawn (uniform, not a fixed corner)
    p = window_patches(4000, (2, 2), 2, gen)
    counts = np.bincount(p.flatten().numpy(), minlength=4) / 4000
    assert np.all(np.abs(counts - 0.25) < 0.03)


def test_label_draw_follows_normalised_scores():
    """Chi-square goodness of fit over 20,000 seeded draws at significance 1e-4: the statistic
    must stay below 21.108, the chi-square(3 dof) quantile at 1 - 1e-4."""
    scores = torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0]])
    ids = torch.tensor([[10, 11, 12, 13, SENTINEL]])
    gen = torch.Generator().manual_seed(123)
    n = 20_000
    words, valid = draw_labels(ids.expand(n, -1), scores.expand(n, -1), gen)
    assert valid.all()
    counts = np.bincount(words.numpy() - 10, minlength=4)
    expected = (scores[0, :4] / scores[0, :4].sum()).numpy() * n
    stat = float(((counts - expected) ** 2 / expected).sum())
    assert stat < 21.108, stat
    assert np.abs(counts / n - expected / n).max() < 0.015  # and within 1.5 points each
    # no kept label -> skipped; all-zero scores -> uniform over the kept ones
    ids2 = torch.tensor([[SENTINEL, SENTINEL], [5, 6]])
    w2, v2 = draw_labels(ids2, torch.zeros(2, 2), gen)
    assert v2.tolist() == [False, True] and int(w2[1]) in (5, 6)


def test_duplicates_reduced_to_one_random_pair():
    gen = torch.Generator().manual_seed(0)
    words = torch.tensor([3, 7, 3, 3, 9, 7])
    picks = []
    for _ in range(300):
        keep = dedupe_words(words, gen)
        assert sorted(words[keep].tolist()) == [3, 7, 9]
        picks.append(int(keep[words[keep] == 3][0]))
    assert set(picks) == {0, 2, 3}  # which duplicate survives is random


def test_sample_pairs_skip_unlabelled_and_dedupe():
    gen = torch.Generator().manual_seed(5)
    ids = torch.full((2, 16, 3), SENTINEL)
    ids[0, :, 0] = torch.arange(16)
    ids[1, :, 0] = 3  # every patch of image 1 has the same label
    scores = torch.ones(2, 16, 3)
    img, pat, words = sample_pairs(ids, scores, (4, 4), 2, gen)
    assert len(set(words.tolist())) == len(words)  # one pair per word
    assert (img == 1).sum() <= 1
    assert torch.equal(ids[img, pat, 0], words)


def test_space_rule_gives_mid_sentence_tokens(tiny_llm):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llm)
    wt = tokenize_words(tok, ["cat", "aardvark"], "space")
    first = wt.flat_ids[: int(wt.offsets[1])].tolist()
    assert first == tok(" cat", add_special_tokens=False)["input_ids"]
    bare = tokenize_words(tok, ["cat"], "bare")
    assert bare.flat_ids.tolist() == tok("cat", add_special_tokens=False)["input_ids"]
