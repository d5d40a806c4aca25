"""retrieval.index: exact while small, FAISS IVF beyond the threshold; entries follow adds, replacements and
removals in both; the approximation finds what exact search finds."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.index import VectorIndex


def clustered(n: int, dim: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((64, dim))
    return (centres[rng.integers(0, 64, n)] + 0.3 * rng.standard_normal((n, dim))).astype(np.float32)


def test_exact_search_adds_replaces_and_removes():
    index = VectorIndex(4)
    index.add([1, 2, 3], np.eye(4, dtype=np.float32)[:3])
    assert [i for i, _ in index.search([1, 0.1, 0, 0], k=2)] == [1, 2]
    assert index.search([1, 0, 0, 0], k=1)[0][1] == pytest.approx(1.0)
    index.add([1], [[0, 0, 0, 1]])  # replaced, not added twice
    assert len(index) == 3 and index.search([0, 0, 0, 1], k=1)[0][0] == 1
    index.remove([2, 99])
    assert len(index) == 2 and 2 not in [i for i, _ in index.search([0, 1, 0, 0], k=5)]
    with pytest.raises(ValueError, match="dimension 3, the index holds 4"):
        index.add([5], [[1, 0, 0]])
    with pytest.raises(ValueError, match="zero vector"):
        index.add([5], [[0, 0, 0, 0]])
    assert VectorIndex(4).search([1, 0, 0, 0]) == []


def test_beyond_the_threshold_the_ivf_serves_and_keeps_up_with_changes():
    data = clustered(3000)
    index = VectorIndex(32, approximate_from=2000)
    index.add(np.arange(1500), data[:1500])
    assert not index.approximate
    index.add(np.arange(1500, 3000), data[1500:])
    assert index.approximate
    queries = clustered(50, seed=1)
    hits = [
        len({i for i, _ in index.search(q, 10)} & {i for i, _ in index.search(q, 10, exact=True)}) / 10
        for q in queries
    ]
    assert np.mean(hits) >= 0.9  # recall@10 against exact
    index.remove([int(index.search(queries[0], 1)[0][0])])
    first = index.search(queries[0], 1)[0][0]
    assert first == index.search(queries[0], 1, exact=True)[0][0]  # the removed one is gone from both
    index.add([10_000], [queries[0]])  # a new entry is found at once
    assert index.search(queries[0], 1)[0][0] == 10_000
    index.remove(range(1500))  # below the threshold again: exact
    assert not index.approximate and len(index) == 1501
