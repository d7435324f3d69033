"""A stored short loss curve: 20 pretraining steps of the `tiny` preset (fixed seed, fp32, CPU)
on a small synthetic dataset must reproduce tests/data/tiny_loss_curve.json.

The run goes through the whole pretraining path (code shards, retrieved neighbours, the CM3
masked documents, packing, model init, AdamW, the LR schedule), so a change that moves code
around without meaning to change the numerics keeps this curve.

When a change is *meant* to alter the numerics, regenerate the file and commit it with the
change that explains why:

    CM3LEON_UPDATE_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_loss_curve.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from cm3leon.data.codes import CodeShardWriter
from cm3leon.train.cli import pretrain
from cm3leon.utils.logging import read_metrics

GOLDEN = Path(__file__).parent / "data" / "tiny_loss_curve.json"
UPDATE = os.environ.get("CM3LEON_UPDATE_GOLDEN") == "1"
# Bit-identical on one machine; other CPUs pick other fp32 kernels (AVX2 / AVX-512 sum in other
# orders), whose rounding 20 AdamW steps can grow past 1e-5. A real change of the numerics (an
# init, a mask, a learning rate 0.1% off) moves the curve by more than this.
RTOL = 1e-3
SETTINGS = dict(preset="tiny", steps=20, seed=1234, dtype="fp32", batch_tokens=512, peak_tflops=1.0,
                eval_every=0, ckpt_every=0)


def synthetic_codes(root: Path, n: int = 50) -> Path:
    """Code shards of n captioned records whose image codes follow from the caption (so the loss
    falls), every 10th in val, and a neighbors.npy of 2 neighbours each."""
    rng = np.random.default_rng(0)
    for name in ("text_tokenizer", "image_tokenizer"):
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "config.json").write_text('{"stand_in": true}')
    w = CodeShardWriter(root / "codes", grid=(4, 4), codebook_size=32, text_vocab_size=40, shard_size=20,
                        extra_meta={"text_tokenizer": str(root / "text_tokenizer"),
                                    "image_tokenizer": str(root / "image_tokenizer")})
    for i in range(n):
        text = rng.integers(0, 40, size=int(rng.integers(3, 8)))
        codes = (np.arange(16) * (1 + text[0] % 3) + text[0]) % 32
        w.add(f"r{i}", "val" if i % 10 == 0 else "train", "caption", text, codes)
    w.close()
    neighbors = np.stack([(np.arange(n) + j) % n for j in (1, 2)], 1).astype(np.int64)
    np.save(root / "codes" / "neighbors.npy", neighbors)
    return root / "codes"


def test_tiny_preset_reproduces_the_stored_loss_curve(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one summation order, whatever the machine's core count
    try:
        pretrain(synthetic_codes(tmp_path), tmp_path / "run", **SETTINGS)
    finally:
        torch.set_num_threads(threads)
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    curve = {"steps": [r["step"] for r in rows], "loss": [r["loss"] for r in rows]}
    assert curve["steps"] == list(range(1, SETTINGS["steps"] + 1))
    assert all(np.isfinite(curve["loss"])) and curve["loss"][-1] < curve["loss"][0]
    if UPDATE:
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text("{\n" + ",\n".join([
            f' "settings": {json.dumps(SETTINGS)}', f' "torch": {json.dumps(torch.__version__)}',
            f' "steps": {json.dumps(curve["steps"])}',
            ' "loss": [\n' + ",\n".join(f"  {x!r}" for x in curve["loss"]) + "\n ]"]) + "\n}\n")
        pytest.skip(f"wrote {GOLDEN}")
    stored = json.loads(GOLDEN.read_text())
    assert stored["settings"] == SETTINGS and stored["steps"] == curve["steps"]
    for step, got, want in zip(curve["steps"], curve["loss"], stored["loss"]):
        assert got == pytest.approx(want, rel=RTOL, abs=0.0), f"step {step}: loss {got!r}, stored {want!r}"
