"""Fault injection: pretraining killed with SIGKILL at random points (mid-step, mid-checkpoint
save) and resumed each time ends exactly where an uninterrupted run ends: no state that fails
to load, the same final weights byte for byte, each metrics row once.
(`benchmarks/faults.py` is the long version with many more kills, and holds the helpers.)"""

import random
import subprocess
import sys
from pathlib import Path

import pytest

from cm3leon.utils.logging import read_metrics

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT / "benchmarks"))
from faults import STEPS, kill_at_random, logged_steps, pretrain_cmd, unloadable_checkpoints  # noqa: E402
from test_sequences import make_codes  # noqa: E402


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_matches_an_uninterrupted_run(tmp_path):
    codes = make_codes(tmp_path)
    straight = tmp_path / "straight"
    subprocess.run(pretrain_cmd(codes, straight), check=True, capture_output=True)

    run = tmp_path / "killed"
    rng = random.Random(0)
    kills = 0
    for _ in range(3):
        kills += kill_at_random(pretrain_cmd(codes, run), run, rng)
        assert unloadable_checkpoints(run) == []  # whatever a kill left loads
    assert kills == 3
    done = subprocess.run(pretrain_cmd(codes, run), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]

    assert (run / "model.safetensors").read_bytes() == (straight / "model.safetensors").read_bytes()
    assert logged_steps(run) == list(range(1, STEPS + 1))  # each step once, in order
    assert [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r] == \
        [r["loss"] for r in read_metrics(straight / "metrics.jsonl") if "loss" in r]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # no temporaries left
