"""Pretraining throughput of the real trainer on the demo's documents: how many positions with
a loss it trains per second under each setting, side by side in one run.

    python benchmarks/pretrain_tokens.py                    # builds a small shapes dataset first
    python benchmarks/pretrain_tokens.py --codes runs/demo/tokenize --steps 60

Each setting runs `cm3leon.train.cli.pretrain` for `--steps` steps on the same code shards
(with k = 2 retrieved documents, as the demo preset) and reports, from its train summary:
- step tok/s: block positions per second of training steps (padding included);
- target tok/s: positions with a loss per second, what packing and masking leave of it;
- target fraction: the share of block positions with a loss;
- the dtype the run used ("auto": the faster of bf16 and fp32, measured at start).

The settings: the earlier CPU recipe's 512-token blocks in fp32; blocks of 448 tokens, which
hold the same three ~135-token documents with less padding and a shorter attention span;
and the same with `dtype: auto` (bf16 on CPUs whose bf16 matmuls beat fp32, fp32 elsewhere).
Compare the ratios within one run: absolute rates differ between machines.
Prints a markdown table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch

from cm3leon.eval.report import markdown_table
from cm3leon.utils.io import write_json

SETTINGS = {
    "blocks 512, fp32": dict(seq_len=512, dtype="fp32"),
    "blocks 448, fp32": dict(seq_len=448, dtype="fp32"),
    "blocks 448, dtype auto": dict(seq_len=448, dtype="auto"),
}


def build_codes(root: Path, scenes: int) -> Path:
    """A small shapes dataset, tokenized as the demo does (patch48, BPE), with random
    neighbours standing in for retrieval (speed does not depend on which documents)."""
    from cm3leon.data.shapes import synthesize
    from cm3leon.tokenizers.image_train import train_image_tokenizer
    from cm3leon.tokenizers.text import train_text_tokenizer
    from cm3leon.tokenizers.tokenize import tokenize_dataset

    data = root / "data"
    synthesize(data, num=scenes, size=48, max_objects=1, seed=0)
    train_text_tokenizer(data, root / "text_tokenizer", vocab_size="small")
    train_image_tokenizer(data, root / "image_tokenizer", preset="patch48")
    codes = root / "codes"
    meta = tokenize_dataset(data, root / "image_tokenizer", root / "text_tokenizer", codes)
    n = int(meta["num_records"])
    rng = np.random.default_rng(0)
    np.save(codes / "neighbors.npy", np.stack([rng.permutation(n) for _ in range(2)], 1).astype(np.int64))
    return codes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--codes", default=None, help="tokenized code shards (default: build a small shapes set)")
    ap.add_argument("--scenes", type=int, default=1000, help="scenes to synthesize when --codes is not given")
    ap.add_argument("--steps", type=int, default=40, help="training steps per setting")
    ap.add_argument("--batch-tokens", type=int, default=1024)
    ap.add_argument("--out", default="benchmarks/results/pretrain_tokens.json")
    args = ap.parse_args()

    from cm3leon.train.cli import pretrain

    with tempfile.TemporaryDirectory() as tmp:
        codes = Path(args.codes) if args.codes else build_codes(Path(tmp), args.scenes)
        rows, probe = [], {}
        for name, setting in SETTINGS.items():
            s = pretrain(codes, Path(tmp) / name.replace(" ", "_").replace(",", ""), preset="demo-small",
                         steps=args.steps, batch_tokens=args.batch_tokens, micro_batch_size=2, num_retrieved=2,
                         order="text_first", poisson_lambda=0.0, whole_segment_prob=0.5, document_masking=True,
                         eval_every=0, ckpt_every=0, warmup_steps=5, **setting)
            probe = s["dtype_probe"] or probe  # the "auto" run's own measurement
            rows.append({"setting": name, "seq_len": setting["seq_len"], "dtype": s["dtype"],
                         "step_tokens_per_second": s["step_tokens_per_second"],
                         "target_tokens_per_second": s["target_tokens_per_second"],
                         "target_fraction": s["target_fraction"], "mfu": s["mfu"]})
    base = rows[0]["target_tokens_per_second"]
    for r in rows:
        r["target_speedup"] = round(r["target_tokens_per_second"] / base, 3)
    table = markdown_table([{"setting": r["setting"], "dtype": r["dtype"],
                             "step tok/s": round(r["step_tokens_per_second"]),
                             "target tok/s": round(r["target_tokens_per_second"]),
                             "target fraction": round(r["target_fraction"], 3),
                             "speed-up": f"{r['target_speedup']:.2f}x"} for r in rows])
    print(table)
    print(f"\ndtype probe of the auto run: {json.dumps(probe)} -> {rows[-1]['dtype']}")
    write_json(Path(args.out), {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                                "steps": args.steps, "batch_tokens": args.batch_tokens, "dtype_probe": probe,
                                "rows": rows})


if __name__ == "__main__":
    main()
