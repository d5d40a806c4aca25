"""Query latency of the LoRA embedding index at 10k, 100k and 1M entries: exact and approximate (FAISS IVF),
with the approximation's recall@10 against exact search.

python -m bench.retrieval_index [--sizes 10000,100000,1000000] [--dim 128] [--queries 200]

Synthetic unit embeddings (512 Gaussian clusters, like LoRAs of related concepts), queries drawn the same way;
each query is timed alone (p50 / p99 over the queries, milliseconds), exact and approximate interleaved.
Issue 21's goal: p99 <= 10 ms at 1M on this CPU.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bench.common import emit
from retrieval.index import VectorIndex


def embeddings(n: int, dim: int, rng: np.random.Generator, centres: np.ndarray) -> np.ndarray:
    picks = rng.integers(0, len(centres), n)
    out = centres[picks] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((512, args.dim)).astype(np.float32)
    queries = embeddings(args.queries, args.dim, rng, centres)
    figures: dict = {}
    for n in (int(s) for s in args.sizes.split(",")):
        index = VectorIndex(args.dim, approximate_from=min(n, 50_000))
        started = time.perf_counter()
        for start in range(0, n, 100_000):  # in chunks, as imports arrive
            chunk = embeddings(min(100_000, n - start), args.dim, rng, centres)
            index.add(np.arange(start, start + len(chunk)), chunk)
        build = time.perf_counter() - started
        times: dict[str, list[float]] = {"exact": [], "approximate": []}
        recall = []
        for q in queries:
            found = {}
            for mode in ("exact", "approximate"):
                t = time.perf_counter()
                found[mode] = {i for i, _ in index.search(q, 10, exact=mode == "exact")}
                times[mode].append((time.perf_counter() - t) * 1e3)
            recall.append(len(found["exact"] & found["approximate"]) / 10)
        figures[f"n={n}"] = {
            **{
                f"{mode} ms": {
                    "p50": round(float(np.percentile(ts, 50)), 3),
                    "p99": round(float(np.percentile(ts, 99)), 3),
                }
                for mode, ts in times.items()
            },
            "recall@10 approximate vs exact": round(float(np.mean(recall)), 4),
            "build seconds (adds and IVF training)": round(build, 2),
            "approximate": index.approximate,
        }
    emit("retrieval_index", figures, {"p99 at 1M": "<= 10 ms"}, {"dim": args.dim, "queries": args.queries})


if __name__ == "__main__":
    main()
