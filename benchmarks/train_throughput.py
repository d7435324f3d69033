"""Training throughput: tokens per second of one optimizer step (forward, backward, AdamW) for
the model presets, in fp32 and under bf16 autocast, optionally with torch.compile per block
(the training loop's `--compile`), and MFU against a peak you pass.

    python benchmarks/train_throughput.py                                   # demo-small, demo on CPU
    python benchmarks/train_throughput.py --presets 350m --seq-len 4096 --batch 4 --device cuda \\
        --peak-tflops 989 --compile

MFU = tokens/s x training FLOPs per token (`cm3leon.model.transformer.flops_per_token`: 6N plus
attention) / peak FLOP/s. No hardware peak is built in: without --peak-tflops MFU is not shown.
Random weights and tokens (speed does not depend on them). Prints a markdown table and writes
JSON (--out, default benchmarks/results/train_throughput.json).
"""

from __future__ import annotations

import argparse
import platform
import time
from contextlib import nullcontext

import torch

from cm3leon.eval.report import markdown_table
from cm3leon.model.config import PRESETS, ModelConfig
from cm3leon.model.transformer import CM3LeonTransformer, flops_per_token
from cm3leon.utils.io import write_json


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(preset: str, seq_len: int, batch: int, dtype: str, compile: bool, device: torch.device,
            vocab_size: int, steps: int, warmup: int, max_seconds: float) -> dict:
    """Time `steps` optimizer steps after `warmup` untimed ones (compilation happens there);
    stops early after `max_seconds` of timed steps. Returns one table row."""
    overrides = {"vocab_size": PRESETS[preset].get("vocab_size", vocab_size)}
    if seq_len > PRESETS[preset].get("max_seq_len", 4096):
        overrides["max_seq_len"] = seq_len
    cfg = ModelConfig.from_preset(preset, **overrides)
    torch.manual_seed(0)
    model = CM3LeonTransformer(cfg).to(device)
    if compile:
        for block in model.blocks:  # as the training loop does: per block, in place
            block.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), device=device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()

    def step() -> None:
        with autocast:
            _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    _sync(device)
    done, t0 = 0, time.perf_counter()
    while done < steps:
        step()
        done += 1
        _sync(device)
        if time.perf_counter() - t0 > max_seconds:
            break
    sec = time.perf_counter() - t0
    tps = done * batch * seq_len / sec
    return {"preset": preset, "params": sum(p.numel() for p in model.parameters()), "seq_len": seq_len,
            "batch": batch, "dtype": dtype, "compile": compile, "steps": done, "s_per_step": round(sec / done, 4),
            "tokens_per_s": round(tps, 1), "tflops": round(tps * flops_per_token(cfg, seq_len) / 1e12, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="demo-small,demo", help=f"comma-separated, of {', '.join(PRESETS)}")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--dtypes", default="fp32,bf16", help="fp32 and/or bf16 (autocast)")
    ap.add_argument("--compile", action="store_true", help="also measure with torch.compile per block")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (fewer if --max-seconds runs out)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation)")
    ap.add_argument("--max-seconds", type=float, default=30.0, help="time limit per measurement")
    ap.add_argument("--vocab-size", type=int, default=1398, help="for presets without one (demo data: 1398)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s of the device for MFU")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", default="benchmarks/results/train_throughput.json")
    args = ap.parse_args()

    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [p for p in presets if p not in PRESETS] + [d for d in dtypes if d not in ("fp32", "bf16")]
    if bad:
        ap.error(f"unknown preset(s) / dtype(s): {bad}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for preset in presets:
        for dtype in dtypes:
            for comp in ([False, True] if args.compile else [False]):
                r = measure(preset, args.seq_len, args.batch, dtype, comp, device, args.vocab_size, args.steps,
                            args.warmup, args.max_seconds)
                if args.peak_tflops:
                    r["mfu"] = round(r["tflops"] / args.peak_tflops, 4)
                rows.append(r)
                print(f"{preset} {dtype}{' compiled' if comp else ''}: {r['tokens_per_s']:.0f} tokens/s", flush=True)
    info = {"benchmark": "train_throughput", "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.platform(),
            "peak_tflops": args.peak_tflops, "rows": rows}
    print(markdown_table(rows))
    write_json(args.out, info)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
