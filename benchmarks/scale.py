"""The pipeline at scale on one machine: synthetic webdataset shards -> tokenize (1 and 2
worker processes) -> embed + IVF-PQ index (1 and 2 worker processes) -> neighbours (1 and 2 worker processes) -> 50
pretraining steps, each stage a `cm3leon` command in its own process, timed, with its peak memory.

    python benchmarks/scale.py --records 20000 --shard-size 2000      # ~5 min on 2 busy cores
    python benchmarks/scale.py                                       # 250,000 records (the scale test)

Per stage: records and records/s (wall time of the command, its start-up included) and peak
RSS (`ru_maxrss` of the stage's process from `os.wait4`: the largest of the process and the
workers it waited for, not their sum; Linux counts a child's peak from its parent's RSS when it
starts, so this script keeps its own memory small). Besides the chain:
- `tokenize --workers 2` must write byte-identical shards to `--workers 1` (checked),
  `index build --workers 2` the same vectors.npy, metadata.jsonl and index.faiss (checked), and
  `index neighbors --workers 2` the same neighbors.npy and neighbors.json (checked; it writes
  them beside the 2-worker codes, which are the 1-worker codes' bytes);
- index recall@10: the IVF-PQ index (with its exact re-rank, as the neighbours stage searches
  it) against exact inner-product search, over 1,000 stored document vectors as queries;
- training memory does not grow with the data: the same 50 steps on the codes of the first
  input shard alone (no retrieved documents in either, so only the data size differs).
The tokenizers and the retriever are fitted on the first shard beforehand (not timed).
Writes benchmarks/results/scale.json and scale.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CLI = [sys.executable, "-m", "cm3leon.cli"]
RESULTS = Path(__file__).parent / "results"
TRAIN = ["--preset", "tiny", "--steps", "50", "--seq-len", "512", "--set", "model.max_seq_len=512",
         "--batch-tokens", "2048", "--micro-batch-size", "4", "--set", "train.eval_every=0",
         "--set", "train.eval_batches=2", "--set", "train.ckpt_every=0", "--set", "train.log_every=10"]


def run_stage(args: list, log: Path) -> dict:
    """Run `cm3leon ARGS` to the end; wall seconds and peak RSS (MiB) of its process tree."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen([*CLI, *map(str, args)], stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"cm3leon {' '.join(map(str, args[:2]))} failed; see {log}:\n{log.read_text()[-3000:]}")
    return {"seconds": round(seconds, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024)}


def same_files(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    return files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) and \
        all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def index_recall(index_dir: Path, num_queries: int = 1000, k: int = 10, batch: int = 4096) -> dict:
    """recall@k of the bank's search (IVF-PQ + exact re-rank) against exact inner product: of
    the ids (`recall_at_10`), and of the scores (`recall_at_10_ties`: a hit counts when its exact
    score reaches the 10th best; the built-in scenes repeat, so many documents tie)."""
    from cm3leon.retrieval.index import MemoryBank

    bank = MemoryBank.load(index_dir)
    vectors = np.load(index_dir / "vectors.npy", mmap_mode="r")
    rng = np.random.default_rng(0)
    queries = np.asarray(vectors[np.sort(rng.choice(len(vectors), min(num_queries, len(vectors)), replace=False))])
    scores = np.concatenate([queries @ np.asarray(vectors[s:s + batch]).T for s in range(0, len(vectors), batch)], 1)
    exact = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    _, found = bank.search(queries, k)
    hits = sum(len(set(e) & set(f)) for e, f in zip(exact.tolist(), found.tolist()))
    kth = np.take_along_axis(scores, exact[:, -1:], 1)  # (Q, 1)
    found_scores = np.where(found >= 0, np.take_along_axis(scores, np.maximum(found, 0), 1), -np.inf)
    return {"recall_at_10": round(hits / exact.size, 4),
            "recall_at_10_ties": round(float((found_scores >= kth - 1e-5).mean()), 4),
            "queries": len(queries), "index_type": bank.info["index_type"], "params": bank.info["params"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=250_000)
    ap.add_argument("--shard-size", type=int, default=10_000, help="records per input .tar shard")
    ap.add_argument("--size", type=int, default=48, help="image side (the patch48 tokenizer: 36 codes)")
    ap.add_argument("--work", default=None, help="working folder (default: a temporary one, deleted)")
    ap.add_argument("--out", default=str(RESULTS / "scale.json"))
    ap.add_argument("--recall-of", default=None, help=argparse.SUPPRESS)  # print index_recall(DIR) only
    args = ap.parse_args()
    if args.recall_of:
        print(json.dumps(index_recall(Path(args.recall_of))))
        return 0

    tmp = None if args.work else tempfile.TemporaryDirectory()
    work = Path(args.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    data, first = work / "data", work / "data" / "00000.tar"
    stages, n = [], args.records

    def stage(name: str, processes: int, records: int, cmd: list, train_out: Path | None = None) -> dict:
        row = {"stage": name, "processes": processes, "records": records,
               **run_stage(cmd, work / f"{name.replace(' ', '_').replace(',', '')}-{processes}.log")}
        if train_out is None:
            row["records_per_s"] = round(records / row["seconds"], 1)
        else:  # 50 steps see a few thousand records of any data set: tokens/s of the steps instead
            row["tokens_per_s"] = round(json.loads((train_out / "train_summary.json").read_text())["tokens_per_second"])
        stages.append(row)
        print(json.dumps(row), flush=True)
        return row

    t_all = time.perf_counter()
    stage("synth", 1, n, ["data", "synth", "--format", "webdataset", "--out", data, "--num", n, "--size", args.size,
                          "--shard-size", args.shard_size])
    for cmd in (["tokenizer", "text", "--data", first, "--out", work / "text", "--vocab-size", "tiny",
                 "--captions-only"],
                ["tokenizer", "image", "--data", first, "--out", work / "vq", "--preset", "patch48"],
                ["retriever", "train", "--data", first, "--out", work / "retriever", "--steps", "60",
                 "--batch-size", "64", "--size", "32", "--dim", "32"]):
        run_stage(cmd, work / f"setup-{cmd[0]}-{cmd[1]}.log")
    tok = ["--image-tokenizer", work / "vq", "--text-tokenizer", work / "text", "--batch-size", "256",
           "--shard-size", "4096"]
    stage("tokenize", 1, n, ["tokenize", "--data", data, "--out", work / "codes", *tok, "--workers", "1"])
    stage("tokenize", 2, n, ["tokenize", "--data", data, "--out", work / "codes2", *tok, "--workers", "2"])
    identical = same_files(work / "codes", work / "codes2")
    train_records = json.loads((work / "codes" / "meta.json").read_text())["splits"]["train"]
    stage("embed + index (ivfpq)", 1, train_records,
          ["index", "build", "--data", data, "--retriever", work / "retriever", "--out", work / "index",
           "--index-type", "ivfpq", "--codes", work / "codes", "--chunk-size", "8192"])
    stage("embed + index (ivfpq)", 2, train_records,
          ["index", "build", "--data", data, "--retriever", work / "retriever", "--out", work / "index2",
           "--index-type", "ivfpq", "--codes", work / "codes", "--chunk-size", "8192", "--workers", "2"])
    index_identical = all((work / "index" / f).read_bytes() == (work / "index2" / f).read_bytes()
                          for f in ("vectors.npy", "metadata.jsonl", "image_codes.npy", "index.faiss"))
    # in a process of its own: a child's peak RSS starts at its parent's, so this one stays small
    recall = json.loads(subprocess.run([sys.executable, __file__, "--recall-of", str(work / "index")], check=True,
                                       capture_output=True, text=True).stdout)
    stage("neighbours (k=2)", 1, n, ["index", "neighbors", "--index", work / "index", "--codes", work / "codes"])
    stage("neighbours (k=2)", 2, n, ["index", "neighbors", "--index", work / "index", "--codes", work / "codes2",
                                     "--workers", "2"])
    neighbours_identical = all((work / "codes" / f).read_bytes() == (work / "codes2" / f).read_bytes()
                               for f in ("neighbors.npy", "neighbors.json"))
    for name, codes, out, k in (("train 50 steps, k=2", work / "codes", work / "run", "2"),
                                ("train 50 steps, k=0", work / "codes", work / "run0", "0")):
        stage(name, 1, train_records, ["pretrain", "--data", codes, "--out", out, "--num-retrieved", k, *TRAIN], out)
    run_stage(["tokenize", "--data", first, "--out", work / "codes_small", *tok], work / "setup-small.log")
    small = json.loads((work / "codes_small" / "meta.json").read_text())["splits"]["train"]
    stage("train 50 steps, k=0", 1, small, ["pretrain", "--data", work / "codes_small", "--out", work / "run_small",
                                            "--num-retrieved", "0", *TRAIN], work / "run_small")
    total_s = time.perf_counter() - t_all

    import torch

    report = {"records": n, "shard_size": args.shard_size, "image_size": args.size, "stages": stages,
              "tokenize_workers_identical": identical,
              "index_workers_identical": index_identical, "neighbours_workers_identical": neighbours_identical,
              "index": recall, "total_s": round(total_s, 1),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__}}
    md = [f"{n:,} synthetic records ({-(-n // args.shard_size)} shards of {args.shard_size:,}, {args.size} px), "
          f"{os.cpu_count()} CPU cores; whole run {total_s / 60:.1f} min.", "",
          "| stage | processes | records | s | records/s | peak RSS (MiB) |", "|---|---:|---:|---:|---:|---:|"]
    md += [f"| {r['stage']} | {r['processes']} | {r['records']:,} | {r['seconds']} | "
           + (f"{r['records_per_s']:,}" if "records_per_s" in r else f"({r['tokens_per_s']:,} tokens/s)")
           + f" | {r['peak_rss_mib']:,} |" for r in stages]
    md += ["", f"tokenize with 2 workers byte-identical to 1: {'yes' if identical else 'NO'}; embed + index "
               f"with 2 workers byte-identical to 1: {'yes' if index_identical else 'NO'}; neighbours with 2 "
               f"workers byte-identical to 1: {'yes' if neighbours_identical else 'NO'}; index recall@10 "
               f"({recall['index_type']}, {json.dumps(recall['params'])}) against exact search over "
               f"{recall['queries']} stored vectors as queries: {recall['recall_at_10_ties']:.3f} counting a hit "
               f"that ties the 10th best score ({recall['recall_at_10']:.3f} by ids; many scenes repeat, so many "
               f"documents tie). Training rows give the steps' tokens/s. The last row trains on the "
               f"first shard's codes alone ({small:,} train records)."]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    Path(args.out).with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    if tmp is not None:
        tmp.cleanup()
    return 0 if identical and index_identical and neighbours_identical else 1


if __name__ == "__main__":
    sys.exit(main())
