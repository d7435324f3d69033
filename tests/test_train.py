"""Trainer: LR schedule, a tiny pretraining run, exact resume, checkpoints, torchrun DDP/FSDP2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cm3leon.errors import CM3LeonError
from cm3leon.model.config import ModelConfig
from cm3leon.model.transformer import CM3LeonTransformer
from cm3leon.objectives.cm3 import IGNORE_INDEX
from cm3leon.tokenizers.vocab import Vocab
from cm3leon.train import loop
from cm3leon.train.cli import pretrain
from cm3leon.train.config import TRAIN_PRESETS, TrainConfig
from cm3leon.train.schedule import lr_at
from cm3leon.utils.logging import read_metrics

sys.path.insert(0, str(Path(__file__).parent))
from test_sequences import make_codes  # noqa: E402


def losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def test_lr_warmup_then_linear_and_cosine_decay_to_ten_percent():
    assert lr_at(0, 1.0, 10, 110) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 10, 110) == pytest.approx(1.0)
    assert lr_at(10, 1.0, 10, 110) == pytest.approx(1.0)
    assert lr_at(60, 1.0, 10, 110, "linear") == pytest.approx(0.55)
    assert lr_at(60, 1.0, 10, 110, "cosine") == pytest.approx(0.55)  # the cosine's midpoint
    assert lr_at(35, 1.0, 10, 110, "cosine") > lr_at(35, 1.0, 10, 110, "linear")
    assert lr_at(110, 1.0, 10, 110) == pytest.approx(0.1)
    assert lr_at(500, 1.0, 10, 110, "cosine") == pytest.approx(0.1)


def test_presets_match_model_presets_and_paper_values():
    from cm3leon.model.config import PRESETS

    assert set(TRAIN_PRESETS) <= set(PRESETS)
    for name, lr in (("350m", 6e-4), ("760m", 5e-4), ("7b", 1.2e-4)):
        cfg = TrainConfig.from_preset(name)
        assert (cfg.lr, cfg.warmup_steps, cfg.betas, cfg.grad_clip) == (lr, 1500, (0.9, 0.98), 1.0)
        assert cfg.grad_accum_steps(world_size=8) * cfg.micro_batch_size * cfg.seq_len * 8 == 8 * 2**20
    with pytest.raises(CM3LeonError, match="unknown train preset"):
        TrainConfig.from_preset("huge")
    with pytest.raises(CM3LeonError, match="parallel"):
        TrainConfig(parallel="tp")


def test_tiny_pretrain_loss_decreases_and_writes_a_loadable_model_dir(tmp_path):
    codes = make_codes(tmp_path)
    out = tmp_path / "run"
    summary = pretrain(codes, out, preset="tiny", steps=30)
    curve = [loss for _, loss in losses(out)]
    assert len(curve) == 30 and all(np.isfinite(curve))
    assert np.mean(curve[-5:]) < np.mean(curve[:5]) - 0.3
    assert summary["num_retrieved"] == 2 and summary["final_val_loss"] < curve[0]
    model = CM3LeonTransformer.from_pretrained(out)
    assert Vocab.load(out) == Vocab(40, 32, 16)
    assert model.config.vocab_size == Vocab.load(out).size
    for name in ("text_tokenizer/config.json", "image_tokenizer/config.json", "train_summary.json", "loss.png"):
        assert (out / name).is_file(), name
    val_rows = [r for r in read_metrics(out / "metrics.jsonl") if "val_loss" in r]
    assert [r["step"] for r in val_rows] == [10, 20, 30]
    # The exported weights are the trained ones: they reproduce the final validation loss.
    from cm3leon.data.sequences import CM3PretrainStream

    val = CM3PretrainStream(codes, "val", seq_len=128, num_retrieved=2, vocab=Vocab.load(out), shuffle=False, epochs=1)
    batches = loop._val_batches(val, TrainConfig.from_preset("tiny"), loop.setup_distributed())
    assert loop.evaluate(model, batches, loop.setup_distributed(), loop.nullcontext) == pytest.approx(
        summary["final_val_loss"], rel=1e-5)
    # Checkpoints: the newest two, each complete.
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step-00000020", "step-00000030"]
    # Running again finds the finished run and does not train again.
    again = pretrain(codes, out, preset="tiny", steps=30)
    assert again["resumed_from_step"] == 30 and len(losses(out)) == 30
    # --init starts a new run from these weights: its first loss is the trained model's.
    pretrain(codes, tmp_path / "continued", preset="tiny", steps=1, init=out)
    assert losses(tmp_path / "continued")[0][1] < np.mean(curve[:5]) - 0.3


def test_resume_after_interruption_reproduces_the_losses_bit_for_bit(tmp_path, monkeypatch):
    codes = make_codes(tmp_path)
    settings = dict(preset="tiny", steps=16, ckpt_every=5, seed=7, dtype="fp32", batch_tokens=1024)
    pretrain(codes, tmp_path / "straight", **settings)

    real_lr_at = loop.lr_at

    def crash_at_step_13(step, *a, **k):
        if step == 13:
            raise KeyboardInterrupt
        return real_lr_at(step, *a, **k)

    monkeypatch.setattr(loop, "lr_at", crash_at_step_13)
    with pytest.raises(KeyboardInterrupt):
        pretrain(codes, tmp_path / "resumed", **settings)
    monkeypatch.setattr(loop, "lr_at", real_lr_at)
    assert len(losses(tmp_path / "resumed")) == 13
    summary = pretrain(codes, tmp_path / "resumed", **settings)
    assert summary["resumed_from_step"] == 10  # the newest checkpoint before the crash
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")  # exact floats


def test_trains_a_map_style_dataset_of_blocks(tmp_path):
    """The loop is generic: any (tokens, targets) blocks, e.g. instruction-tuning data."""
    vocab = Vocab(32, 32, num_sentinels=4)
    rng = np.random.default_rng(0)
    blocks = []
    for _ in range(16):
        start = int(rng.integers(vocab.text_offset, vocab.size - 17))
        tokens = torch.arange(start, start + 16)  # predictable: next id = id + 1
        targets = torch.cat([tokens[1:], torch.tensor([IGNORE_INDEX])])
        blocks.append((tokens, targets))
    cfg = TrainConfig.from_preset("tiny", steps=40, lr=1e-2, seq_len=16, batch_tokens=64, eval_every=0,
                                 ckpt_every=0)
    model_cfg = ModelConfig.from_preset("tiny", vocab_size=vocab.size)
    summary = loop.train(model_cfg, blocks, blocks[:4], cfg, tmp_path / "m", vocab)
    curve = [loss for _, loss in losses(tmp_path / "m")]
    assert curve[-1] < curve[0] - 1.0 and summary["final_val_loss"] < curve[0]
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_rejects_blocks_longer_than_the_model_context(tmp_path):
    with pytest.raises(CM3LeonError, match="max_seq_len"):
        pretrain(make_codes(tmp_path, neighbors=0), tmp_path / "run", preset="tiny", seq_len=256, steps=1)


def _torchrun(codes: Path, out: Path, parallel: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "cm3leon.cli", "pretrain", "--data", str(codes), "--out", str(out), "--preset", "tiny",
           "--steps", "8", "--parallel", parallel, "--num-retrieved", "1"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.slow
def test_torchrun_two_processes_fsdp2_and_ddp_agree_and_export_a_model(tmp_path):
    codes = make_codes(tmp_path)
    curves = {}
    for parallel in ("fsdp2", "ddp"):
        out = tmp_path / parallel
        proc = _torchrun(codes, out, parallel)
        assert proc.returncode == 0, proc.stderr[-3000:]
        summary = json.loads((out / "train_summary.json").read_text())
        assert (summary["world_size"], summary["parallel"]) == (2, parallel)
        curves[parallel] = [loss for _, loss in losses(out)]
        assert len(curves[parallel]) == 8 and all(np.isfinite(curves[parallel]))
        assert curves[parallel][-1] < curves[parallel][0]
        CM3LeonTransformer.from_pretrained(out)
        assert (out / "vocab.json").is_file() and (out / "checkpoints" / "step-00000008").is_dir()
    # Same data, same init, same maths: sharding the model must not change the losses.
    np.testing.assert_allclose(curves["fsdp2"], curves["ddp"], rtol=1e-5)
