"""Memory-bank search: build time, queries per second and recall@10 against exact search, for
exact inner product (flat) vs IVF-PQ (and optionally IVF), on clustered unit vectors.

    python benchmarks/retrieval_index.py                         # 10k and 100k vectors, dim 512
    python benchmarks/retrieval_index.py --sizes 10k,100k,1M --types flat,ivf,ivfpq

The vectors are a mixture of Gaussian clusters on the unit sphere (real CLIP document vectors
cluster; uniform random vectors are the worst case for IVF). Queries are fresh draws from the
same mixture, not database vectors. The indexes are the ones `cm3leon index build` makes
(same defaults: nlist ~ sqrt(n), nprobe 16, PQ with dim/8 sub-quantisers of 8 bits; the
"+refine" row re-ranks refine*k (default 16k) compressed hits exactly with the stored vectors, as
MemoryBank.search does; its size column is the compressed index only, the vectors stay on disk,
memory-mapped; results/retrieval_index.json was measured at the earlier default, refine 4).
Prints a markdown table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np

from cm3leon.retrieval.index import index_params, make_faiss_index, rerank_exact
from cm3leon.utils.io import write_json


def parse_size(s: str) -> int:
    s = s.strip().lower()
    mult = {"k": 1_000, "m": 1_000_000}.get(s[-1], 1)
    return int(float(s[:-1] if s[-1] in "km" else s) * mult)


def clustered(n: int, dim: int, centers: np.ndarray, spread: float, rng: np.random.Generator,
              batch: int = 100_000) -> np.ndarray:
    out = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, batch):
        m = min(batch, n - s)
        x = centers[rng.integers(len(centers), size=m)] + spread * rng.standard_normal((m, dim), dtype=np.float32)
        out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def timed_search(index, queries: np.ndarray, k: int, repeats: int, vectors: np.ndarray | None = None,
                 refine: int = 1) -> tuple[np.ndarray, float]:
    """Best-of-`repeats` time to search all queries; with `refine`, refine*k compressed hits are
    re-ranked exactly against `vectors` (what MemoryBank.search does for IVF-PQ)."""
    index.search(queries[:16], k)  # warm up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        if refine > 1:
            _, ids = index.search(queries, refine * k)
            _, ids = rerank_exact(vectors, queries, ids, k)
        else:
            _, ids = index.search(queries, k)
        best = min(best, time.perf_counter() - t)
    return ids, best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10k,100k", help="database sizes, e.g. 10k,100k,1M (default 10k,100k)")
    ap.add_argument("--types", default="flat,ivfpq", help="index types among flat, ivf, ivfpq")
    ap.add_argument("--dim", type=int, default=512, help="vector dimension (CLIP ViT-B/32: 512)")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--spread", type=float, default=0.04, help="per-dimension std of a cluster (0.04*sqrt(512) ~ 0.9 radius)")
    ap.add_argument("--nprobe", type=int, default=None, help="IVF lists searched (default as `cm3leon index build`: 16)")
    ap.add_argument("--threads", type=int, default=None, help="FAISS OpenMP threads (default: all)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/retrieval_index.json")
    args = ap.parse_args()

    import faiss

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    if "flat" not in types:
        types.insert(0, "flat")  # exact search is the reference for recall
    rng = np.random.default_rng(args.seed)
    centers = rng.standard_normal((args.clusters, args.dim), dtype=np.float32) / np.sqrt(args.dim)
    queries = clustered(args.queries, args.dim, centers, args.spread, rng)
    rows = []
    for n in (parse_size(s) for s in args.sizes.split(",")):
        base = clustered(n, args.dim, centers, args.spread, rng)
        exact = None
        for kind in types:
            params = index_params(n, args.dim, kind, nprobe=args.nprobe)
            t = time.perf_counter()
            index = make_faiss_index(base, kind, params, seed=args.seed)
            build_s = time.perf_counter() - t
            size_mb = faiss.serialize_index(index).nbytes / 2**20
            refine = params.pop("refine", 1)
            variants = [(kind, 1)] + ([(f"{kind}+refine", refine)] if refine > 1 else [])
            for name, r in variants:
                ids, search_s = timed_search(index, queries, args.k, args.repeats, base if r > 1 else None, r)
                if kind == "flat":
                    exact = ids
                recall = float(np.mean([len(set(a) & set(b)) / args.k for a, b in zip(ids, exact)]))
                row = {"n": n, "index": name, "params": {**params, **({"refine": r} if r > 1 else {})},
                       "build_s": round(build_s, 3), "qps": round(args.queries / search_s, 1),
                       "ms_per_query": round(1000 * search_s / args.queries, 4),
                       f"recall@{args.k}": round(recall, 4), "index_mb": round(size_mb, 1)}
                rows.append(row)
                print(f"  n={n:>9,} {name:13s} build {build_s:7.2f}s  {row['qps']:>10,.0f} q/s  "
                      f"recall@{args.k} {recall:.3f}  {size_mb:8.1f} MB", flush=True)
        del base

    print()
    print(f"| vectors | index | params | build (s) | queries/s | recall@{args.k} vs exact | size (MB) |")
    print("|---:|---|---|---:|---:|---:|---:|")
    for r in rows:
        p = ", ".join(f"{k}={v}" for k, v in r["params"].items()) or "-"
        print(f"| {r['n']:,} | {r['index']} | {p} | {r['build_s']:.2f} | {r['qps']:,.0f} | {r[f'recall@{args.k}']:.3f} | {r['index_mb']:.1f} |")
    info = {"benchmark": "retrieval_index", "dim": args.dim, "queries": args.queries, "k": args.k,
            "clusters": args.clusters, "spread": args.spread, "faiss": faiss.__version__,
            "threads": faiss.omp_get_max_threads(), "machine": platform.platform(),
            "processor": platform.processor(), "rows": rows}
    out = Path(args.out)
    write_json(out, info)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
