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
from faults import make_codes as make_shapes_codes  # noqa: E402
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


def sft_cmd(init: Path, data: Path, out: Path, steps: int = 16) -> list[str]:
    """A tiny SFT run on the built-in data's tasks that checkpoints every 2 steps."""
    call = (f"from cm3leon.sft.cli import run_sft; run_sft({str(init)!r}, {str(data)!r}, {str(out)!r}, "
            f"preset='tiny', steps={steps}, seed=5, dtype='fp32', batch_tokens=512, peak_tflops=2.0, "
            "ckpt_every=2, eval_every=0, log_every=1, response_only=True)")
    return [sys.executable, "-c", call]


@pytest.mark.slow
def test_sft_killed_mid_run_resumes_to_the_uninterrupted_weights(tmp_path):
    """The same guarantee for instruction tuning: its task cache, mixture stream position and
    checkpoints survive SIGKILLs, and the resumed run ends on the uninterrupted run's bytes."""
    codes = make_shapes_codes(tmp_path)  # the built-in data (with its SFT tasks) under tmp_path / "data"
    init = tmp_path / "pretrained"
    subprocess.run(pretrain_cmd(codes, init, steps=4), check=True, capture_output=True)
    data = tmp_path / "data"
    straight = tmp_path / "sft_straight"
    subprocess.run(sft_cmd(init, data, straight), check=True, capture_output=True)

    run = tmp_path / "sft_killed"
    rng = random.Random(1)
    kills = sum(kill_at_random(sft_cmd(init, data, run), run, rng, steps=16) for _ in range(2))
    assert kills == 2 and unloadable_checkpoints(run) == []
    done = subprocess.run(sft_cmd(init, data, run), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (run / "model.safetensors").read_bytes() == (straight / "model.safetensors").read_bytes()
    assert logged_steps(run) == list(range(1, 17))


def vq_cmd(data: Path, out: Path, steps: int = 16) -> list[str]:
    """A tiny VQGAN training run that checkpoints every 2 steps and logs every step."""
    call = ("from dataclasses import replace; "
            "from cm3leon.tokenizers.image_train import TRAIN_PRESETS, train_image_tokenizer; "
            f"tc = replace(TRAIN_PRESETS['tiny'], steps={steps}, ckpt_every=2, log_every=1, roundtrip_steps=0); "
            f"train_image_tokenizer({str(data)!r}, {str(out)!r}, preset='tiny', train_config=tc, seed=5, threads=1)")
    return [sys.executable, "-c", call]


@pytest.mark.slow
def test_image_tokenizer_killed_mid_run_resumes_to_the_uninterrupted_weights(tmp_path):
    """VQ training killed with SIGKILL resumes from its checkpoint to the same weights."""
    make_shapes_codes(tmp_path)
    data = tmp_path / "data"
    straight = tmp_path / "vq_straight"
    subprocess.run(vq_cmd(data, straight), check=True, capture_output=True)
    run = tmp_path / "vq_killed"
    rng = random.Random(2)
    kills = sum(kill_at_random(vq_cmd(data, run), run, rng, steps=16) for _ in range(2))
    assert kills == 2
    done = subprocess.run(vq_cmd(data, run), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (run / "model.safetensors").read_bytes() == (straight / "model.safetensors").read_bytes()
    assert logged_steps(run) == logged_steps(straight)  # each step once, in order
