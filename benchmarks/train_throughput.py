"""Training throughput: tokens per second of one optimizer step (forward, backward, AdamW) for
the model presets, in fp32 and under bf16 autocast, optionally with torch.compile per block
(the training loop's `--compile`), and MFU; then, in the same run, a GEMM peak and our
trainer's step side by side with `transformers`' OPTForCausalLM built from the same config.

    python benchmarks/train_throughput.py                                   # demo-small, demo on CPU
    python benchmarks/train_throughput.py --presets 350m --seq-len 4096 --batch 4 --device cuda \\
        --compare-preset 350m --compile

Three tables:
1. GEMM peak: TFLOP/s of a large square matmul in fp32 and bf16 (`cm3leon.train.flops`): the
   practical peak of this device, measured, never a hard-coded hardware number.
2. Presets: one plain optimizer step per preset and dtype (`--presets`, `--dtypes`).
3. Ours vs HF: our trainer's own step (`cm3leon.train.loop.train_step`: per-token losses split
   text/image, clip, AdamW with the trainer's parameter groups) against `OPTForCausalLM` with the
   config exported by `cm3leon.convert.hf_opt` and the same weights (logits checked equal), the
   same batch, precision, optimizer and clipping, for `--compare-preset` in fp32 and bf16.

MFU = tokens/s x training FLOPs per token (`cm3leon.model.transformer.flops_per_token`: 6N plus
attention, the same count for both models) / peak FLOP/s; the peak is `--peak-tflops` when given,
else the measured GEMM peak in the row's dtype. Random weights and tokens (speed does not depend
on them). Prints markdown tables and writes JSON (--out, default
benchmarks/results/train_throughput.json).
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
from cm3leon.train.flops import matmul_size, measure_matmul_tflops
from cm3leon.utils.io import write_json

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _autocast(device: torch.device, dtype: str):
    return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if dtype == "bf16" else nullcontext


def _model_config(preset: str, seq_len: int, vocab_size: int) -> ModelConfig:
    overrides = {"vocab_size": PRESETS[preset].get("vocab_size", vocab_size)}
    if seq_len > PRESETS[preset].get("max_seq_len", 4096):
        overrides["max_seq_len"] = seq_len
    return ModelConfig.from_preset(preset, **overrides)


def _time_steps(step, device: torch.device, steps: int, warmup: int, max_seconds: float) -> tuple[int, float]:
    """Run `warmup` untimed steps (compilation happens there), then up to `steps` timed ones,
    stopping early after `max_seconds`. Returns (timed steps, seconds)."""
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
    return done, time.perf_counter() - t0


def _row(tokens_per_step: int, done: int, sec: float, cfg: ModelConfig, seq_len: int, peak: float) -> dict:
    tps = done * tokens_per_step / sec
    tflops = tps * flops_per_token(cfg, seq_len) / 1e12
    return {"steps": done, "s_per_step": round(sec / done, 4), "tokens_per_s": round(tps, 1),
            "tflops": round(tflops, 4), "mfu": round(tflops / peak, 4)}


def measure(preset: str, seq_len: int, batch: int, dtype: str, compile: bool, device: torch.device,
            vocab_size: int, steps: int, warmup: int, max_seconds: float, peak: float) -> dict:
    """Time plain optimizer steps of a preset. Returns one table row."""
    cfg = _model_config(preset, seq_len, vocab_size)
    torch.manual_seed(0)
    model = CM3LeonTransformer(cfg).to(device)
    if compile:
        for block in model.blocks:  # as the training loop does: per block, in place
            block.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), device=device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    autocast = _autocast(device, dtype)

    def step() -> None:
        with autocast():
            _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    done, sec = _time_steps(step, device, steps, warmup, max_seconds)
    return {"preset": preset, "params": sum(p.numel() for p in model.parameters()), "seq_len": seq_len,
            "batch": batch, "dtype": dtype, "compile": compile,
            **_row(batch * seq_len, done, sec, cfg, seq_len, peak)}


def compare_with_hf(preset: str, seq_len: int, batch: int, dtype: str, device: torch.device, vocab_size: int,
                    steps: int, warmup: int, max_seconds: float, peak: float,
                    target_fraction: float = 1.0) -> list[dict]:
    """Our trainer's step vs transformers' OPTForCausalLM: same config, weights, batch,
    precision, optimizer (AdamW, the trainer's parameter groups) and gradient clipping.
    target_fraction < 1: an SFT-like step, the loss on that fraction of the positions only
    (the same positions on both sides, -100 elsewhere)."""
    import transformers

    from cm3leon.convert.hf_opt import opt_config, state_dict_to_hf
    from cm3leon.tokenizers.vocab import Vocab
    from cm3leon.train.config import TrainConfig
    from cm3leon.train.loop import build_optimizer, train_step
    from cm3leon.train.parallel import DistInfo

    cfg = _model_config(preset, seq_len, vocab_size)
    image = cfg.vocab_size // 2  # any text / image split of the ids: only the loss split uses it
    vocab = Vocab(cfg.vocab_size - image - 20, image, num_sentinels=16)
    assert vocab.size == cfg.vocab_size
    train_cfg = TrainConfig(seq_len=seq_len, micro_batch_size=batch, dtype=dtype, lr=1e-4)
    torch.manual_seed(0)
    ours = CM3LeonTransformer(cfg).to(device).train()
    with torch.no_grad():  # the paper init zeroes output projections: give them weights
        for p in ours.parameters():
            p.normal_(0.0, 0.02)
    hf_cfg = {k: v for k, v in opt_config(cfg).items() if k not in ("architectures", "cm3leon", "torch_dtype", "dtype")}
    hf = transformers.OPTForCausalLM(transformers.OPTConfig(**hf_cfg, attn_implementation="sdpa"))
    missing, unexpected = hf.load_state_dict(state_dict_to_hf(ours.state_dict(), cfg), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    hf = hf.to(device).train()
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), device=device)
    x, y = tokens[:, :-1], tokens[:, 1:].clone()
    labels = x.clone()  # HF shifts the labels itself
    if target_fraction < 1.0:  # response-only loss: contiguous response spans at the end of each block
        keep = int(round(seq_len * target_fraction))
        y[:, : seq_len - keep] = -100
        labels[:, : seq_len - keep + 1] = -100
    with torch.no_grad():  # the same model: same logits (fp32)
        diff = (ours(x)[0] - hf(input_ids=x).logits).abs().max().item()
    assert diff < 1e-3, f"our logits and HF's differ by {diff}"
    with torch.no_grad():  # and the same loss over the same targets
        from cm3leon.model.transformer import loss_positions

        y_hf = y.clone()
        y_hf[:, -1] = -100  # HF's shifted labels have no target for the last position
        ours_loss = ours(x, y_hf, loss_index=loss_positions(y_hf).to(device))[1].item()
        hf_loss = hf(input_ids=x, labels=labels).loss.item()
    assert abs(ours_loss - hf_loss) < 1e-4 * max(1.0, abs(hf_loss)), f"losses differ: {ours_loss} vs {hf_loss}"
    autocast = _autocast(device, dtype)
    info = DistInfo(device=device)
    micro = [(x, y)]

    ours_opt = build_optimizer(ours, train_cfg)
    hf_opt = build_optimizer(hf, train_cfg)

    def ours_step() -> None:
        train_step(ours, ours_opt, micro, info, autocast, train_cfg.grad_clip, vocab)

    def hf_step() -> None:
        with autocast():
            loss = hf(input_ids=x, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), train_cfg.grad_clip)
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)

    # Alternate the two, step by step, so a load change on a shared machine hits both alike.
    names, fns = ("cm3leon trainer", "HF OPTForCausalLM"), (ours_step, hf_step)
    for _ in range(warmup):
        for fn in fns:
            fn()
    seconds, done, t_start = [0.0, 0.0], 0, time.perf_counter()
    while done < steps and time.perf_counter() - t_start < 2 * max_seconds:
        for i, fn in enumerate(fns):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            seconds[i] += time.perf_counter() - t0
        done += 1
    rows = [{"model": name, "preset": preset, "step": "pretrain" if target_fraction >= 1.0 else
             f"sft ({target_fraction:.0%} targets)", "dtype": dtype, "seq_len": seq_len, "batch": batch,
             **_row(batch * seq_len, done, sec, cfg, seq_len, peak)} for name, sec in zip(names, seconds)]
    rows[0]["ours_over_hf"] = round(rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"], 3)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="demo-small,demo", help=f"comma-separated, of {', '.join(PRESETS)} "
                    "(empty: skip the preset table)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--dtypes", default="fp32,bf16",
                    help="fp32 and/or bf16 (autocast); auto: fp32, and bf16 too where its measured GEMM peak "
                         "beats fp32's (what `dtype: auto` would train with; emulated bf16 is many times slower)")
    ap.add_argument("--compile", action="store_true", help="also measure with torch.compile per block")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (fewer if --max-seconds runs out)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation)")
    ap.add_argument("--max-seconds", type=float, default=30.0, help="time limit per measurement")
    ap.add_argument("--vocab-size", type=int, default=1398, help="for presets without one (demo data: 1398)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="peak TFLOP/s of the device for MFU (default: the measured GEMM peak per dtype)")
    ap.add_argument("--gemm-size", type=int, default=None, help="side of the timed matmul (default: 1024 CPU, 8192 GPU)")
    ap.add_argument("--compare-preset", default="demo",
                    help="preset of the ours-vs-HF comparison (empty: skip it)")
    ap.add_argument("--sft-target-fraction", type=float, default=0.25,
                    help="the SFT comparison's fraction of positions with a loss (0: skip the SFT rows)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", default="benchmarks/results/train_throughput.json")
    args = ap.parse_args()

    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [p for p in presets + [args.compare_preset] if p and p not in PRESETS]
    bad += [d for d in dtypes if d not in DTYPES and d != "auto"]
    if bad:
        ap.error(f"unknown preset(s) / dtype(s): {bad}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    size = args.gemm_size or matmul_size(device)
    gemm = {d: measure_matmul_tflops(device, DTYPES[d], size=size, min_seconds=1.0) for d in DTYPES}
    gemm_rows = [{"gemm": f"{size}x{size}x{size}", "dtype": d, "tflops": round(t, 4)} for d, t in gemm.items()]
    print(markdown_table(gemm_rows), flush=True)
    peaks = {d: args.peak_tflops or gemm[d] for d in DTYPES}
    if "auto" in dtypes:
        fast_bf16 = gemm["bf16"] > gemm["fp32"]
        dtypes = ["fp32"] + (["bf16"] if fast_bf16 else [])
        print(f"--dtypes auto: {', '.join(dtypes)} (bf16 GEMM {gemm['bf16']:.4f} vs fp32 {gemm['fp32']:.4f} TFLOP/s)",
              flush=True)

    rows = []
    for preset in presets:
        for dtype in dtypes:
            for comp in ([False, True] if args.compile else [False]):
                r = measure(preset, args.seq_len, args.batch, dtype, comp, device, args.vocab_size, args.steps,
                            args.warmup, args.max_seconds, peaks[dtype])
                rows.append(r)
                print(f"{preset} {dtype}{' compiled' if comp else ''}: {r['tokens_per_s']:.0f} tokens/s", flush=True)
    if rows:
        print(markdown_table(rows), flush=True)

    compare = []
    if args.compare_preset:
        fractions = [1.0] + ([args.sft_target_fraction] if 0 < args.sft_target_fraction < 1 else [])
        for dtype in dtypes:
            for fraction in fractions:
                compare += compare_with_hf(args.compare_preset, args.seq_len, args.batch, dtype, device,
                                           args.vocab_size, args.steps, args.warmup, args.max_seconds, peaks[dtype],
                                           fraction)
        print(markdown_table(compare, ["model", "preset", "step", "dtype", "seq_len", "batch", "steps", "s_per_step",
                                       "tokens_per_s", "tflops", "mfu", "ours_over_hf"]))
    info = {"benchmark": "train_throughput", "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.platform(),
            "peak_tflops": args.peak_tflops, "peak_source": "given" if args.peak_tflops else "measured GEMM",
            "gemm": gemm_rows, "rows": rows, "ours_vs_hf": compare}
    write_json(args.out, info)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
