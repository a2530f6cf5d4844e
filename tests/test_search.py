import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline import search


def _oracle(q, t, k):
    s = q @ t.T
    ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, ids, axis=1), ids


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_search_matches_numpy_brute_force(backend):
    g = torch.Generator().manual_seed(0)
    text = F.normalize(torch.randn(2000, 24, generator=g), dim=-1).numpy()
    q = F.normalize(torch.randn(300, 24, generator=g), dim=-1)
    idx = search.WordIndex(text, backend=backend, query_chunk=128)
    assert idx.backend == backend
    scores, ids = idx.search(q, 10)
    want_s, want_i = _oracle(q.numpy().astype(np.float64), text.astype(np.float64), 10)
    # random floats: no ties, so the ids must agree exactly
    np.testing.assert_array_equal(ids.numpy(), want_i)
    np.testing.assert_allclose(scores.numpy(), want_s, atol=1e-5)


def test_negated_queries_rank_least_similar_words():
    """Mode 'sea': top n by -cos are the n lowest cosines, stored as -cos."""
    g = torch.Generator().manual_seed(1)
    text = F.normalize(torch.randn(500, 16, generator=g), dim=-1).numpy()
    q = F.normalize(torch.randn(20, 16, generator=g), dim=-1)
    scores, ids = search.WordIndex(text, "faiss").search(-q, 5)
    cos = q.numpy() @ text.T
    np.testing.assert_array_equal(ids.numpy(), np.argsort(cos, axis=1)[:, :5])
    np.testing.assert_allclose(scores.numpy(), -np.sort(cos, axis=1)[:, :5], atol=1e-5)


def test_finalize_drops_below_minimum_and_pads():
    scores = torch.tensor([[0.9, 0.2, -0.1], [-0.2, -0.3, -0.4]])
    ids = torch.tensor([[5, 7, 9], [1, 2, 3]])
    out_ids, out_sc = search.finalize(scores, ids, min_score=0.0, n=4)
    assert out_ids.dtype == np.uint16 and out_sc.dtype == np.float16
    np.testing.assert_array_equal(out_ids, [[5, 7, search.SENTINEL, search.SENTINEL],
                                            [search.SENTINEL] * 4])
    np.testing.assert_allclose(out_sc.astype(np.float32), [[0.9, 0.2, 0, 0], [0, 0, 0, 0]],
                               atol=1e-3)


def test_surgery_topk_matches_full_score_matrix():
    from pipeline.dense import surgery_scores

    g = torch.Generator().manual_seed(2)
    patches = F.normalize(torch.randn(2, 9, 8, generator=g), dim=-1)
    cls = F.normalize(torch.randn(2, 8, generator=g), dim=-1)
    text = F.normalize(torch.randn(100, 8, generator=g), dim=-1)
    s, i = search.surgery_topk(patches, cls, text, 4)
    full = surgery_scores(patches, cls, text).reshape(18, 100).numpy()
    np.testing.assert_array_equal(i.numpy(), np.argsort(-full, axis=1)[:, :4])
    np.testing.assert_allclose(s.numpy(), -np.sort(-full, axis=1)[:, :4], atol=1e-6)
