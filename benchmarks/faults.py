"""Fault injection, the long version: pretraining SIGKILLed at random points (mid-step,
mid-checkpoint save) many times, resumed after each kill, and compared with an uninterrupted
run of the same settings. Prints kills, resumes, checkpoints that failed to load, bytes of the
final weights that differ and duplicated metric rows (all but kills and resumes should be 0),
and writes benchmarks/results/faults.json.

    python benchmarks/faults.py [--kills 20] [--seed 0]

`tests/test_faults.py` runs the same helpers with three kills.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEPS = 24


def pretrain_cmd(codes: Path, out: Path, steps: int = STEPS) -> list[str]:
    """A tiny pretraining run that checkpoints every 2 steps and logs every step."""
    return [sys.executable, "-m", "cm3leon.cli", "pretrain", "--data", str(codes), "--out", str(out),
            "--preset", "tiny", "--steps", str(steps), "--seed", "5", "--dtype", "fp32", "--batch-tokens", "512",
            "--peak-tflops", "2", "--set", "ckpt_every=2", "--set", "eval_every=0", "--set", "log_every=1"]


def logged_steps(out: Path) -> list[int]:
    from cm3leon.utils.logging import read_metrics

    return [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def kill_at_random(cmd: list[str], out: Path, rng: random.Random, steps: int = STEPS, timeout: float = 300.0) -> bool:
    """Start `cmd`, SIGKILL it once it has logged a random number of steps, after a random
    delay of up to 50 ms (so kills also land inside checkpoint saves); False if it finished
    (or timed out) first."""
    rows = rng.randint(1, max(1, steps - 4))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    deadline = time.time() + timeout
    try:
        while proc.poll() is None and time.time() < deadline:
            if len(logged_steps(out)) >= rows:
                time.sleep(rng.uniform(0.0, 0.05))
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.01)
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


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


def make_codes(root: Path) -> Path:
    """Tokenized built-in shapes data: synth -> text and image tokenizers -> code shards."""
    cli = [sys.executable, "-m", "cm3leon.cli"]
    for args in (["data", "synth", "--out", root / "data", "--num", "300", "--size", "48", "--max-objects", "1"],
                 ["tokenizer", "text", "--data", root / "data", "--out", root / "text", "--vocab-size", "tiny"],
                 ["tokenizer", "image", "--data", root / "data", "--out", root / "vq", "--preset", "patch48"],
                 ["tokenize", "--data", root / "data", "--image-tokenizer", root / "vq", "--text-tokenizer",
                  root / "text", "--out", root / "codes"]):
        subprocess.run([*cli, *map(str, args)], check=True, capture_output=True)
    return root / "codes"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "faults.json"))
    args = ap.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        codes = make_codes(root)
        t0 = time.perf_counter()
        subprocess.run(pretrain_cmd(codes, root / "straight", args.steps), check=True, capture_output=True)
        straight_s = time.perf_counter() - t0
        run, kills, resumes, bad = root / "killed", 0, 0, []
        for _ in range(args.kills * 3):  # a run that finishes before its kill is started again
            if kills == args.kills:
                break
            if (run / "model.safetensors").is_file():
                shutil.rmtree(run)  # finished: start a new run so every kill interrupts training
            resumes += any((run / "checkpoints").glob("step-*"))
            kills += kill_at_random(pretrain_cmd(codes, run, args.steps), run, rng, args.steps)
            bad += unloadable_checkpoints(run)
        done = subprocess.run(pretrain_cmd(codes, run, args.steps), capture_output=True, text=True)
        if done.returncode:
            print(done.stderr[-3000:], file=sys.stderr)
            return 1
        a, b = (run / "model.safetensors").read_bytes(), (root / "straight" / "model.safetensors").read_bytes()
        differing = sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b))
        steps = logged_steps(run)
        result = {"kills": kills, "resumes": resumes, "unloadable_checkpoints": len(bad),
                  "final_weight_bytes_differing": differing, "duplicate_metric_rows": len(steps) - len(set(steps)),
                  "missing_metric_rows": args.steps - len(set(steps)), "steps": args.steps,
                  "uninterrupted_run_s": round(straight_s, 1)}
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    ok = not (bad or differing or result["duplicate_metric_rows"] or result["missing_metric_rows"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
