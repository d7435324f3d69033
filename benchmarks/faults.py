"""Fault injection, the long version: every resumable stage SIGKILLed at random points many
times, resumed after each kill, and compared with an uninterrupted run of the same settings.

Stages: pretraining (mid-step, mid-checkpoint save), instruction tuning (sft), VQ image
tokenizer training (vq), `cm3leon tokenize` (mid-shard, mid-meta), and the memory bank
(index: `cm3leon index build` mid-chunk and mid-output, then `cm3leon index neighbors`).
Prints per stage: kills, resumes, states a kill left that fail to load, bytes of the final
outputs that differ from the uninterrupted run, duplicated and missing rows (metrics steps,
code records, index documents) and temporaries left behind; all but kills and resumes should
be 0. Writes benchmarks/results/faults.json.

    python benchmarks/faults.py [--stage all|pretrain|sft|vq|tokenize|index] [--kills 20] [--seed 0]

`--kills` is the total, shared evenly by the stages run. `tests/test_faults.py` runs the same
helpers on tinier inputs with a few kills per stage.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

STEPS = 24
CLI = [sys.executable, "-m", "cm3leon.cli"]


# ---------------------------------------------------------------------------- commands

def pretrain_cmd(codes: Path, out: Path, steps: int = STEPS) -> list[str]:
    """A tiny pretraining run that checkpoints every 2 steps and logs every step."""
    return [*CLI, "pretrain", "--data", str(codes), "--out", str(out),
            "--preset", "tiny", "--steps", str(steps), "--seed", "5", "--dtype", "fp32", "--batch-tokens", "512",
            "--peak-tflops", "2", "--set", "ckpt_every=2", "--set", "eval_every=0", "--set", "log_every=1"]


def sft_cmd(init: Path, data: Path, out: Path, steps: int = 16) -> list[str]:
    """A tiny SFT run on the built-in data's tasks that checkpoints every 2 steps."""
    call = (f"from cm3leon.sft.cli import run_sft; run_sft({str(init)!r}, {str(data)!r}, {str(out)!r}, "
            f"preset='tiny', steps={steps}, seed=5, dtype='fp32', batch_tokens=512, peak_tflops=2.0, "
            "ckpt_every=2, eval_every=0, log_every=1, response_only=True)")
    return [sys.executable, "-c", call]


def vq_cmd(data: Path, out: Path, steps: int = 16) -> list[str]:
    """A tiny VQGAN training run that checkpoints every 2 steps and logs every step."""
    call = ("from dataclasses import replace; "
            "from cm3leon.tokenizers.image_train import TRAIN_PRESETS, train_image_tokenizer; "
            f"tc = replace(TRAIN_PRESETS['tiny'], steps={steps}, ckpt_every=2, log_every=1, roundtrip_steps=0); "
            f"train_image_tokenizer({str(data)!r}, {str(out)!r}, preset='tiny', train_config=tc, seed=5, threads=1)")
    return [sys.executable, "-c", call]


def tokenize_cmd(data: Path, vq: Path, text: Path, out: Path, batch_size: int, shard_size: int,
                 workers: int = 1) -> list[str]:
    return [*CLI, "tokenize", "--data", str(data), "--image-tokenizer", str(vq), "--text-tokenizer", str(text),
            "--out", str(out), "--batch-size", str(batch_size), "--shard-size", str(shard_size),
            "--workers", str(workers)]


def index_cmd(data: Path, retriever: Path, codes: Path, out: Path, batch_size: int, chunk_size: int,
              workers: int = 1) -> list[str]:
    return [*CLI, "index", "build", "--data", str(data), "--retriever", str(retriever), "--codes", str(codes),
            "--out", str(out), "--batch-size", str(batch_size), "--chunk-size", str(chunk_size),
            "--workers", str(workers)]


def neighbors_cmd(index: Path, codes: Path, workers: int = 1, batch_size: int = 256) -> list[str]:
    return [*CLI, "index", "neighbors", "--index", str(index), "--codes", str(codes), "--k", "2",
            "--workers", str(workers), "--batch-size", str(batch_size)]


# ---------------------------------------------------------------------------- progress and state

def logged_steps(out: Path) -> list[int]:
    from cm3leon.utils.logging import read_metrics

    return [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def count_logged_steps(out: Path) -> int:
    return len(logged_steps(out))


def _count(folder: Path, pattern: str) -> int:
    """Files matching `pattern` in `folder`, polled while a job writes there: the job may
    remove the folder (its work is merged) between the existence check and the listing."""
    try:
        return len(list(folder.glob(pattern)))
    except FileNotFoundError:
        return 0


def count_shards(out: Path) -> int:
    return _count(out, "shard-*")


def count_chunks(out: Path) -> int:
    return _count(out / "embeddings", "chunk-*.npy")


def count_neighbor_parts(out: Path) -> int:
    return _count(out / "neighbors.parts", "unit-*.npz")


def unloadable_checkpoints(run: Path) -> list[str]:
    """Checkpoints in `run` that fail to load (what a kill must never leave)."""
    from cm3leon.errors import CM3LeonError
    from cm3leon.train.checkpoint import list_checkpoints, read_trainer_state
    from cm3leon.utils.io import load_safetensors

    bad = []
    for _, ckpt in list_checkpoints(run / "checkpoints"):
        try:
            read_trainer_state(ckpt)
            load_safetensors(ckpt / "model.safetensors")
        except CM3LeonError as e:
            bad.append(str(e))
    return bad


def unloadable_codes(out: Path) -> list[str]:
    """Shards of a tokenized directory that fail to load or whose records.jsonl does not fit
    them, and a meta.json that does not load with its shards."""
    from cm3leon.data.codes import CodeDataset, load_shard
    from cm3leon.errors import CM3LeonError

    bad = []
    for shard in sorted(out.glob("shard-*")):
        try:
            n = len(load_shard(shard)["split"])
            rows = (shard / "records.jsonl").read_text(encoding="utf-8").splitlines()
            if len(rows) != n or not all(json.loads(r).get("key") for r in rows):
                bad.append(f"{shard / 'records.jsonl'}: {len(rows)} rows for {n} records")
        except (CM3LeonError, OSError, json.JSONDecodeError) as e:
            bad.append(str(e))
    if (out / "meta.json").is_file():
        try:
            CodeDataset(out)
        except (CM3LeonError, OSError) as e:
            bad.append(str(e))
    return bad


def unloadable_index(out: Path) -> list[str]:
    """Embedding chunks of an index build that fail to load or whose rows do not fit them,
    and an index.json whose memory bank does not load."""
    from cm3leon.errors import CM3LeonError
    from cm3leon.retrieval.index import MemoryBank
    from cm3leon.utils.io import load_npy

    bad = []
    for chunk in sorted((out / "embeddings").glob("chunk-*.npy")):
        try:
            n = load_npy(chunk, "embedding chunk").shape[0]
            rows = chunk.with_suffix(".jsonl").read_text(encoding="utf-8").splitlines()
            if len(rows) != n:
                bad.append(f"{chunk.with_suffix('.jsonl')}: {len(rows)} rows for {n} vectors")
        except (CM3LeonError, OSError) as e:
            bad.append(str(e))
    if (out / "index.json").is_file():
        try:
            MemoryBank.load(out)
        except (CM3LeonError, OSError) as e:
            bad.append(str(e))
    return bad


def unloadable_neighbors(codes: Path) -> list[str]:
    """A neighbours part, neighbors.npy or neighbors.json that fails to load or does not fit
    the codes."""
    from cm3leon.data.codes import CodeDataset
    from cm3leon.errors import CM3LeonError
    from cm3leon.retrieval.index import load_neighbors_part
    from cm3leon.utils.io import load_npy, read_json

    try:
        for part in sorted((codes / "neighbors.parts").glob("unit-*.npz")):
            load_neighbors_part(part.parent, int(part.stem.split("-")[1]))
        if (codes / "neighbors.npy").is_file():
            n = load_npy(codes / "neighbors.npy", "neighbours").shape[0]
            if n != len(CodeDataset(codes)):
                return [f"{codes / 'neighbors.npy'}: {n} rows for {len(CodeDataset(codes))} records"]
        if (codes / "neighbors.json").is_file():
            read_json(codes / "neighbors.json")
    except (CM3LeonError, OSError) as e:
        return [str(e)]
    return []


def record_keys(out: Path) -> list[str]:
    return [json.loads(line)["key"] for shard in sorted(out.glob("shard-*"))
            for line in (shard / "records.jsonl").read_text(encoding="utf-8").splitlines()]


def document_keys(out: Path) -> list[str]:
    path = out / "metadata.jsonl"
    return [json.loads(line)["key"] for line in path.read_text(encoding="utf-8").splitlines()] if path.is_file() else []


def temporaries(folder: Path) -> list[str]:
    """Dot-files an interrupted write leaves (atomic_path's `.NAME.XXXX.tmp`, `.NAME.old`)."""
    return sorted(str(p) for p in folder.rglob(".*")) if folder.is_dir() else []


def differing_bytes(a: Path, b: Path, names: list[str]) -> int:
    """Bytes that differ between the files `names` (relative paths) under `a` and `b`; a
    file missing on one side counts all its bytes."""
    total = 0
    for name in names:
        x = (a / name).read_bytes() if (a / name).is_file() else b""
        y = (b / name).read_bytes() if (b / name).is_file() else b""
        total += sum(p != q for p, q in zip(x, y)) + abs(len(x) - len(y))
    return total


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------- kill and resume

@dataclass
class Stage:
    """A resumable command and how to watch it: `cmd(out)` runs it into `out`; `progress(out)`
    counts its units done (steps logged, shards, chunks; None: kill after a random time);
    `check(out)` lists what fails to load; `rows(out)` are rows each expected once;
    `outputs(out)` the files compared with the uninterrupted run; `finished(out)` whether a
    run completed."""
    name: str
    cmd: Callable[[Path], list[str]]
    total: int  # units of progress in a run
    check: Callable[[Path], list[str]]
    outputs: Callable[[Path], list[str]]
    finished: Callable[[Path], bool]
    progress: Callable[[Path], int] | None = None
    rows: Callable[[Path], list] = field(default=lambda out: [])
    margin: int = 0  # kill before the last `margin` units
    temporaries_in: str = "."  # where a finished run must have left no temporaries


def kill_at_random(cmd: list[str], out: Path, rng: random.Random, steps: int = STEPS, timeout: float = 300.0,
                   progress: Callable[[Path], int] | None = count_logged_steps, margin: int = 4,
                   max_delay: float = 0.05) -> bool:
    """Start `cmd`, SIGKILL it once `progress(out)` has grown by a random number of units
    (up to steps - margin in all), after a random delay of up to `max_delay` s (so kills also
    land inside saves); without `progress`, after a random delay alone. False if it finished
    (or timed out) first."""
    before = progress(out) if progress is not None and out.exists() else 0
    target = before + rng.randint(1, max(1, steps - margin - before))
    delay = rng.uniform(0.0, max_delay)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    start = time.time()
    try:
        while proc.poll() is None and time.time() < start + timeout:
            if progress is None or progress(out) >= target:
                time.sleep(delay)
                if proc.poll() is not None:
                    return False
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.005)
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def run_to_end(cmd: list[str]) -> float:
    """Run `cmd` to completion (raising with its stderr on failure); seconds taken."""
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... exited {done.returncode}:\n{done.stderr[-3000:]}")
    return time.perf_counter() - t0


def kill_and_resume(stage: Stage, root: Path, kills: int, rng: random.Random, straight_s: float | None = None) -> dict:
    """Run `stage` uninterrupted into root/NAME-straight and, into root/NAME-killed, SIGKILL it
    `kills` times (a run that finishes before its kill starts over from scratch) checking the
    state each kill leaves, then resume it to the end. Returns the counts of the module
    docstring."""
    straight, run = root / f"{stage.name}-straight", root / f"{stage.name}-killed"
    if straight_s is None:
        straight_s = run_to_end(stage.cmd(straight))
    done, resumes, bad, restarts = 0, 0, [], 0
    for _ in range(kills * 4):
        if done == kills:
            break
        if stage.finished(run):
            shutil.rmtree(run)  # finished: start a new run so every kill interrupts one
            restarts += 1
        resumes += run.exists() and any(run.iterdir())
        done += kill_at_random(stage.cmd(run), run, rng, stage.total, progress=stage.progress, margin=stage.margin,
                               max_delay=0.05 if stage.progress else straight_s)
        bad += stage.check(run)
    resumes += run.exists() and any(run.iterdir())
    resumed_s = run_to_end(stage.cmd(run))
    bad += stage.check(run)
    rows, want = stage.rows(run), stage.rows(straight)
    return {"kills": done, "resumes": int(resumes), "restarts_after_finishing": restarts,
            "corrupt_states": len(bad), "corrupt_examples": bad[:3],
            "bytes_differing": differing_bytes(run, straight, stage.outputs(straight)),
            "files_compared": len(stage.outputs(straight)),
            "duplicated_rows": len(rows) - len(set(rows)), "missing_rows": len(set(want) - set(rows)),
            "temporaries_left": len(temporaries(run / stage.temporaries_in)),
            "uninterrupted_s": round(straight_s, 1), "final_resume_s": round(resumed_s, 1)}


def ok(result: dict) -> bool:
    return result["kills"] > 0 and not any(result[k] for k in ("corrupt_states", "bytes_differing", "duplicated_rows",
                                                               "missing_rows", "temporaries_left"))


# ---------------------------------------------------------------------------- stages

def training_stage(name: str, cmd: Callable[[Path], list[str]], steps: int) -> Stage:
    return Stage(name, cmd, steps, check=unloadable_checkpoints, outputs=lambda out: ["model.safetensors"],
                 finished=lambda out: (out / "model.safetensors").is_file(), progress=count_logged_steps,
                 rows=logged_steps, margin=4, temporaries_in="checkpoints")


def tokenize_stage(data: Path, vq: Path, text: Path, num_shards: int, batch_size: int, shard_size: int,
                   workers: int = 1) -> Stage:
    from cm3leon.data.codes import is_complete

    return Stage("tokenize", lambda out: tokenize_cmd(data, vq, text, out, batch_size, shard_size, workers),
                 num_shards, check=unloadable_codes, outputs=files_under,
                 finished=is_complete, progress=count_shards, rows=record_keys)


def index_stage(data: Path, retriever: Path, codes: Path, num_docs: int, batch_size: int, chunk_size: int,
                workers: int = 1) -> Stage:
    return Stage("index", lambda out: index_cmd(data, retriever, codes, out, batch_size, chunk_size, workers),
                 math.ceil(num_docs / chunk_size), check=unloadable_index,
                 outputs=files_under,
                 finished=lambda out: (out / "index.json").is_file() and not (out / "embeddings").exists(),
                 progress=count_chunks, rows=document_keys)


def neighbors_stage(index: Path, codes: Path, num_units: int = 1, workers: int = 1, batch_size: int = 256) -> Stage:
    """`cm3leon index neighbors` writes into a copy of `codes` (made when missing). Over one
    unit (a captions folder) kills land after a random time; over several, after a random
    number of finished unit parts (`neighbors.parts/unit-*.npz`)."""
    def cmd(out: Path) -> list[str]:
        if not (out / "meta.json").is_file():
            shutil.copytree(codes, out, dirs_exist_ok=True)
        return neighbors_cmd(index, out, workers, batch_size)

    return Stage("neighbors", cmd, num_units, check=unloadable_neighbors,
                 outputs=lambda out: ["neighbors.npy", "neighbors.json"],
                 finished=lambda out: (out / "neighbors.json").is_file() and not (out / "neighbors.parts").exists(),
                 progress=count_neighbor_parts if num_units > 1 else None, margin=1 if num_units > 1 else 0)


def make_codes(root: Path, shard_size: int = 4096, batch_size: int = 64) -> Path:
    """Tokenized built-in shapes data: synth -> text and image tokenizers -> code shards."""
    for args in (["data", "synth", "--out", root / "data", "--num", "300", "--size", "48", "--max-objects", "1"],
                 ["tokenizer", "text", "--data", root / "data", "--out", root / "text", "--vocab-size", "tiny"],
                 ["tokenizer", "image", "--data", root / "data", "--out", root / "vq", "--preset", "patch48"],
                 ["tokenize", "--data", root / "data", "--image-tokenizer", root / "vq", "--text-tokenizer",
                  root / "text", "--out", root / "codes", "--shard-size", shard_size, "--batch-size", batch_size]):
        subprocess.run([*CLI, *map(str, args)], check=True, capture_output=True)
    return root / "codes"


STAGES = ("pretrain", "sft", "vq", "tokenize", "index")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", choices=("all", *STAGES), default="all")
    ap.add_argument("--kills", type=int, default=20, help="kills in total, shared evenly by the stages")
    ap.add_argument("--steps", type=int, default=60, help="pretraining steps (sft and vq: 16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "faults.json"))
    args = ap.parse_args()
    stages = STAGES if args.stage == "all" else (args.stage,)
    per_stage = max(1, math.ceil(args.kills / len(stages)))
    rng = random.Random(args.seed)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # 300 records in shards of 16 for the tokenize and index stages' resume points
        codes = make_codes(root, shard_size=16, batch_size=8)
        data = root / "data"
        for name in stages:
            t0 = time.perf_counter()
            if name == "pretrain":
                stage = training_stage(name, lambda out: pretrain_cmd(codes, out, args.steps), args.steps)
            elif name == "sft":
                run_to_end(pretrain_cmd(codes, root / "sft-init", steps=4))
                stage = training_stage(name, lambda out: sft_cmd(root / "sft-init", data, out), 16)
            elif name == "vq":
                stage = training_stage(name, lambda out: vq_cmd(data, out), 16)
            elif name == "tokenize":
                stage = tokenize_stage(data, root / "vq", root / "text", math.ceil(len(_keys(codes)) / 16), 8, 16)
            else:
                run_to_end([*CLI, "retriever", "train", "--data", str(data), "--out", str(root / "retriever"),
                            "--steps", "5", "--batch-size", "16", "--size", "32", "--dim", "32"])
                stage = index_stage(data, root / "retriever", codes, len(_keys(codes, "train")), 8, 16)
            results[name] = kill_and_resume(stage, root, per_stage, rng)
            results[name]["stage_s"] = round(time.perf_counter() - t0, 1)
            print(name, json.dumps(results[name]), flush=True)
            if name == "index":  # neighbours from the resumed index, killed and rerun
                results["neighbors"] = kill_and_resume(neighbors_stage(root / "index-killed", codes), root,
                                                       max(1, per_stage // 2), rng)
                print("neighbors", json.dumps(results["neighbors"]), flush=True)
    total = {k: sum(r[k] for r in results.values()) for k in ("kills", "resumes", "corrupt_states", "bytes_differing",
                                                                "duplicated_rows", "missing_rows", "temporaries_left")}
    report = {"total": total, "stages": results, "kills_requested": args.kills, "seed": args.seed,
              "pretrain_steps": args.steps}
    print(json.dumps(total, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all(ok(r) for r in results.values()) else 1


def _keys(codes: Path, split: str | None = None) -> list[str]:
    from cm3leon.data.codes import CodeDataset

    ds = CodeDataset(codes, split)
    return [ds.record_meta(int(g))["key"] for g in ds.indices]


if __name__ == "__main__":
    sys.exit(main())
