"""A vector index over unit-length LoRA embeddings by integer id (the catalog's adapter ids): exact inner-product
search while the index is small, FAISS's inverted-file index (IVF, inner product) beyond `approximate_from`.

Entries are added, replaced and removed one by one as the catalog changes (import, edit, delete); the IVF's
centroids are retrained when the index has doubled since they were trained, so they keep describing the data.
Exact search stays available (`search(..., exact=True)`) to measure the approximation's recall.
"""

from __future__ import annotations

import math

import numpy as np

APPROXIMATE_FROM = 50_000  # entries from which searches use the IVF (exact below)
TRAIN_SAMPLE = 50_000  # vectors the IVF's centroids are trained on (at least 39 per list)
NPROBE = 32  # IVF lists visited per query


class VectorIndex:
    """Embeddings of dimension `dim` by id. Vectors are normalised on the way in; scores are cosines."""

    def __init__(
        self, dim: int, approximate_from: int = APPROXIMATE_FROM, nprobe: int = NPROBE, seed: int = 0
    ):
        self.dim = dim
        self.approximate_from = approximate_from
        self.nprobe = nprobe
        self.seed = seed
        self._ids = np.zeros(0, dtype=np.int64)
        self._vectors = np.zeros((0, dim), dtype=np.float32)
        self._row: dict[int, int] = {}
        self._ivf = None
        self._trained_at = 0

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, ids, vectors) -> None:
        """Add or replace entries: ids (n,), vectors (n, dim)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        vectors = _unit(np.asarray(vectors, dtype=np.float32).reshape(len(ids), -1))
        if vectors.shape[1] != self.dim:
            raise ValueError(f"vectors of dimension {vectors.shape[1]}, the index holds {self.dim}")
        if len(set(ids.tolist())) != len(ids):
            raise ValueError("an id given twice in one add")
        self.remove([i for i in ids.tolist() if i in self._row])
        start = len(self._ids)
        self._ids = np.concatenate([self._ids, ids])
        self._vectors = np.concatenate([self._vectors, vectors])
        self._row.update({int(i): start + j for j, i in enumerate(ids)})
        if self._ivf is not None:
            self._ivf.add_with_ids(vectors, ids)
        self._maybe_train()

    def remove(self, ids) -> None:
        """Drop entries (unknown ids are ignored)."""
        gone = [int(i) for i in ids if int(i) in self._row]
        if not gone:
            return
        keep = np.ones(len(self._ids), dtype=bool)
        keep[[self._row[i] for i in gone]] = False
        self._ids, self._vectors = self._ids[keep], self._vectors[keep]
        self._row = {int(i): j for j, i in enumerate(self._ids)}
        if self._ivf is not None and len(self._ids) < self.approximate_from:
            self._ivf, self._trained_at = None, 0  # small again: exact
        elif self._ivf is not None:
            self._ivf.remove_ids(np.asarray(gone, dtype=np.int64))

    def search(self, query, k: int = 10, exact: bool = False) -> list[tuple[int, float]]:
        """The k entries nearest to `query` (dim,), best first, as (id, cosine)."""
        query = _unit(np.asarray(query, dtype=np.float32).reshape(1, -1))
        k = min(k, len(self._ids))
        if k <= 0:
            return []
        if exact or self._ivf is None:
            scores = self._vectors @ query[0]
            top = np.argpartition(-scores, k - 1)[:k]
            top = top[np.argsort(-scores[top])]
            return [(int(self._ids[i]), float(scores[i])) for i in top]
        scores, ids = self._ivf.search(query, k)
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, unit vectors) of every entry, in insertion order (copies)."""
        return self._ids.copy(), self._vectors.copy()

    @property
    def approximate(self) -> bool:
        return self._ivf is not None

    def _maybe_train(self) -> None:
        n = len(self._ids)
        if n < self.approximate_from or (self._ivf is not None and n < 2 * self._trained_at):
            return
        import faiss

        lists = max(1, int(math.sqrt(n)))
        quantizer = faiss.IndexFlatIP(self.dim)
        ivf = faiss.IndexIVFFlat(quantizer, self.dim, lists, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(self.seed)
        sample = self._vectors[rng.choice(n, size=min(n, max(TRAIN_SAMPLE, 39 * lists)), replace=False)]
        ivf.train(sample)
        ivf.add_with_ids(self._vectors, self._ids)
        ivf.nprobe = self.nprobe
        self._ivf, self._trained_at = ivf, n


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError("a zero vector has no direction")
    return np.ascontiguousarray(vectors / norms, dtype=np.float32)
