"""Memory-bank search: build time, queries per second and recall@10 against exact search, for
exact inner product (flat) vs IVF-PQ (and optionally IVF), on clustered unit vectors.

    python benchmarks/retrieval_index.py                         # 100k and 1M vectors, dim 512 (~10 min, 1 core)
    python benchmarks/retrieval_index.py --sizes 10k,100k --types flat,ivf,ivfpq

The vectors are a mixture of Gaussian clusters on the unit sphere (real CLIP document vectors
cluster; uniform random vectors are the worst case for IVF). Queries are fresh draws from the
same mixture, not database vectors. The indexes are the ones `cm3leon index build` makes, with
its defaults (`cm3leon.retrieval.index.index_params`): nlist ~ sqrt(n), nprobe 16, PQ with
m = dim/2 sub-quantisers, at most 64 (at dim 512: 64 sub-quantisers of 8 dimensions, 64-byte
codes), of 8 bits, and refine 16: the "+refine" row re-ranks refine*k compressed hits exactly
with the stored vectors, as MemoryBank.search does (--pq-m / --refine change them). The size
column is the serialized index; the stored vectors IVF-PQ re-ranks with (vectors.npy, dim * 4
bytes a vector) stay on disk, memory-mapped. Exact ground truth is the flat index's top k for
every query (--truth-queries N: for the first N only, at sizes where all would be too slow).
Prints a markdown table and writes JSON (--out) and a markdown summary beside it, with the
memory per vector these sizes imply for CC3M (3.3M vectors) and 100M.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np

from cm3leon.retrieval.index import index_params, make_faiss_index, rerank_exact
from cm3leon.utils.io import write_json, write_text


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


PROJECTED = {"CC3M, 3.3M vectors": 3_300_000, "100M vectors": 100_000_000}  # bank sizes the memory per vector is scaled to


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100k,1M", help="database sizes, e.g. 10k,100k,1M (default 100k,1M)")
    ap.add_argument("--types", default="flat,ivfpq", help="index types among flat, ivf, ivfpq")
    ap.add_argument("--dim", type=int, default=512, help="vector dimension (CLIP ViT-B/32: 512)")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--truth-queries", type=int, default=None,
                    help="queries searched exactly (flat) for the recall ground truth (default: all)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--spread", type=float, default=0.04, help="per-dimension std of a cluster (0.04*sqrt(512) ~ 0.9 radius)")
    ap.add_argument("--nprobe", type=int, default=None, help="IVF lists searched (default as `cm3leon index build`: 16)")
    ap.add_argument("--pq-m", type=int, default=None, help="PQ sub-quantisers (default as `cm3leon index build`: dim/2, at most 64)")
    ap.add_argument("--refine", type=int, default=16, help="IVF-PQ exact re-rank factor (default as `cm3leon index build`: 16)")
    ap.add_argument("--threads", type=int, default=None, help="FAISS OpenMP threads (default: all)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--note", default="", help="a line on the machine for the markdown summary")
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
    truth = min(args.truth_queries or args.queries, args.queries)
    rows = []
    for n in (parse_size(s) for s in args.sizes.split(",")):
        base = clustered(n, args.dim, centers, args.spread, rng)
        exact = None
        for kind in types:
            params = index_params(n, args.dim, kind, nprobe=args.nprobe, pq_m=args.pq_m, refine=args.refine)
            t = time.perf_counter()
            index = make_faiss_index(base, kind, params, seed=args.seed)
            build_s = time.perf_counter() - t
            size_mb = faiss.serialize_index(index).nbytes / 2**20
            refine = params.pop("refine", 1)
            variants = [(kind, 1)] + ([(f"{kind}+refine", refine)] if refine > 1 else [])
            for name, r in variants:
                q = queries[:truth] if kind == "flat" else queries  # exact search: the ground-truth queries
                ids, search_s = timed_search(index, q, args.k, args.repeats, base if r > 1 else None, r)
                if kind == "flat":
                    exact = ids
                recall = float(np.mean([len(set(a) & set(b)) / args.k for a, b in zip(ids[:truth], exact)]))
                row = {"n": n, "index": name, "params": {**params, **({"refine": r} if r > 1 else {})},
                       "build_s": round(build_s, 3), "qps": round(len(q) / search_s, 1),
                       "ms_per_query": round(1000 * search_s / len(q), 4),
                       f"recall@{args.k}": round(recall, 4), "index_mb": round(size_mb, 1),
                       "index_bytes_per_vector": round(size_mb * 2**20 / n, 1),
                       # what IVF-PQ's exact re-rank reads: vectors.npy, memory-mapped
                       "stored_vector_bytes": 4 * args.dim if r > 1 else 0}
                rows.append(row)
                print(f"  n={n:>9,} {name:13s} build {build_s:7.2f}s  {row['qps']:>10,.0f} q/s  "
                      f"recall@{args.k} {recall:.3f}  {size_mb:8.1f} MB", flush=True)
        del base

    table = [f"| vectors | index | params | build (s) | queries/s | recall@{args.k} vs exact | index (MB) |",
             "|---:|---|---|---:|---:|---:|---:|"]
    for r in rows:
        p = ", ".join(f"{k}={v}" for k, v in r["params"].items()) or "-"
        table.append(f"| {r['n']:,} | {r['index']} | {p} | {r['build_s']:.2f} | {r['qps']:,.0f} | "
                     f"{r[f'recall@{args.k}']:.3f} | {r['index_mb']:.1f} |")
    largest = max(r["n"] for r in rows)
    memory = [f"| index | bytes a vector in memory (at {largest:,}) | "
              + " | ".join(PROJECTED)
              + " | + vectors.npy on disk, memory-mapped |", "|---|---:|" + "---:|" * len(PROJECTED) + "---:|"]
    for r in rows:
        if r["n"] == largest:
            memory.append(f"| {r['index']} | {r['index_bytes_per_vector']:,.0f} | "
                          + " | ".join(f"{r['index_bytes_per_vector'] * n / 2**30:,.2f} GiB" for n in PROJECTED.values())
                          + " | " + (" / ".join(f"{r['stored_vector_bytes'] * n / 2**30:,.1f} GiB" for n in PROJECTED.values())
                                     if r["stored_vector_bytes"] else "-") + " |")
    threads = faiss.omp_get_max_threads()
    truth_note = (f"exact ground truth for all {args.queries} queries" if truth == args.queries else
                  f"exact ground truth (and the flat row's queries/s) for the first {truth} of {args.queries} queries")
    md = [f"{args.dim}-dimensional clustered unit vectors ({args.clusters} clusters), {args.queries} fresh queries, "
          f"{truth_note}; FAISS {faiss.__version__}, {threads} thread(s), best of {args.repeats}. "
          f"{args.note}".strip(), "", *table, "",
          f"Memory a vector implies (the index at {largest:,} vectors, scaled):", "", *memory]
    print("\n" + "\n".join(md))
    info = {"benchmark": "retrieval_index", "dim": args.dim, "queries": args.queries, "truth_queries": truth,
            "k": args.k, "clusters": args.clusters, "spread": args.spread, "faiss": faiss.__version__,
            "threads": threads, "machine": platform.platform(), "processor": platform.processor(),
            "note": args.note, "rows": rows}
    out = Path(args.out)
    write_json(out, info)
    write_text(out.with_suffix(".md"), "\n".join(md) + "\n")
    print(f"\nwrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
