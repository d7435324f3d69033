"""Image tokenizer speed: images per second to encode (pixels -> codes) and to decode (codes ->
pixels), batched, for the paper's `cm3leon` preset (256 px -> 32x32 = 1,024 codes from 8,192,
CM3Leon Sec. 2.1) and the small CPU presets.

    python benchmarks/vq_speed.py                                   # cm3leon:2 demo32:64 demo64:64, CPU
    python benchmarks/vq_speed.py --presets cm3leon:32 demo32:512 --device cuda --dtype bfloat16

Presets are `name[:batch]` (default batch: --batch). Random weights: speed does not depend on
them. Every run also checks the shapes: codes [B, h, w] in [0, codebook_size) and decoded
images [B, 3, H, W]; for `cm3leon` that is 256x256 -> exactly 1,024 codes in [0, 8192) -> 256x256.
Prints a markdown table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch

# the decode benchmark's timing helpers (same folder, on sys.path when run as a script)
from decode_speed import _sync, _time

from cm3leon.errors import CM3LeonError
from cm3leon.tokenizers.image import VQModel, get_preset
from cm3leon.utils.io import write_json

# The paper's tokenizer: 256x256 -> 32x32 = 1,024 codes from 8,192 (Sec. 2.1, Make-A-Scene).
PAPER_TOKENS_PER_IMAGE = 1024
PAPER_CODEBOOK_SIZE = 8192


def parse_preset(spec: str, default_batch: int) -> tuple[str, int]:
    """`name` or `name:batch` -> (name, batch)."""
    name, _, batch = spec.partition(":")
    try:
        b = int(batch) if batch else default_batch
    except ValueError:
        raise CM3LeonError(f"--presets: {spec!r} is not NAME or NAME:BATCH") from None
    if b < 1:
        raise CM3LeonError(f"--presets: batch in {spec!r} must be >= 1")
    get_preset(name)  # unknown names fail here, listing the known ones
    return name, b


def check_round_trip(name: str, vq: VQModel, codes: torch.Tensor, images: torch.Tensor, batch: int) -> str:
    """Assert the tokenizer's shapes and code range; return a one-line report."""
    cfg = vq.config
    h, w = cfg.grid
    assert tuple(codes.shape) == (batch, h, w), f"{name}: codes {tuple(codes.shape)}, expected {(batch, h, w)}"
    assert codes.dtype == torch.long
    lo, hi = codes.min().item(), codes.max().item()
    assert 0 <= lo and hi < cfg.codebook_size, f"{name}: codes span [{lo}, {hi}], outside [0, {cfg.codebook_size})"
    side = cfg.resolution
    assert tuple(images.shape) == (batch, cfg.in_channels, side, side), f"{name}: decoded {tuple(images.shape)}"
    if name == "cm3leon":
        assert side == 256 and h * w == PAPER_TOKENS_PER_IMAGE and cfg.codebook_size == PAPER_CODEBOOK_SIZE
    return (f"{name}: {side}x{side} -> {h * w} codes ({h}x{w}) in [0, {cfg.codebook_size}) "
            f"-> {images.shape[-2]}x{images.shape[-1]}: ok")


def bench_preset(name: str, batch: int, device: torch.device, dtype: torch.dtype, repeats: int) -> tuple[dict, str]:
    torch.manual_seed(0)
    vq = VQModel(get_preset(name)).to(device, dtype).eval()
    cfg = vq.config
    images = (torch.rand(batch, cfg.in_channels, cfg.resolution, cfg.resolution) * 2 - 1).to(device, dtype)
    codes = vq.encode(images)
    decoded = vq.decode(codes)
    _sync(device)
    check = check_round_trip(name, vq, codes, decoded, batch)
    enc_s = _time(lambda: vq.encode(images), device, repeats)
    dec_s = _time(lambda: vq.decode(codes), device, repeats)
    row = {"preset": name, "resolution": cfg.resolution, "tokens_per_image": cfg.tokens_per_image,
           "codebook_size": cfg.codebook_size, "params_m": round(vq.num_parameters / 1e6, 2), "batch": batch,
           "encode_s": round(enc_s, 4), "encode_images_per_s": round(batch / enc_s, 2),
           "decode_s": round(dec_s, 4), "decode_images_per_s": round(batch / dec_s, 2)}
    return row, check


def markdown_table(rows: list[dict]) -> str:
    head = ("| preset | px | codes/img | codebook | params (M) | batch | encode img/s | decode img/s |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|")
    lines = [f"| {r['preset']} | {r['resolution']} | {r['tokens_per_image']} | {r['codebook_size']} | "
             f"{r['params_m']} | {r['batch']} | {r['encode_images_per_s']:.2f} | {r['decode_images_per_s']:.2f} |"
             for r in rows]
    return "\n".join([head, *lines])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["cm3leon:2", "demo32:64", "demo64:64"],
                    help="image tokenizer presets as NAME or NAME:BATCH")
    ap.add_argument("--batch", type=int, default=16, help="batch for presets given without :BATCH")
    ap.add_argument("--repeats", type=int, default=2, help="timed calls per measurement (best is kept)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--out", default="benchmarks/results/vq_speed.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.repeats < 1:
        raise CM3LeonError("--repeats must be >= 1")

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    specs = [parse_preset(s, args.batch) for s in args.presets]
    rows, checks = [], []
    for name, batch in specs:
        row, check = bench_preset(name, batch, device, dtype, args.repeats)
        rows.append(row)
        checks.append(check)
    info = {
        "device": str(device), "dtype": args.dtype, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "weights": "random", "repeats": args.repeats, "results": rows, "checks": checks,
    }
    print(f"image tokenizer speed, {device} {args.dtype}, {torch.get_num_threads()} threads, random weights")
    print(markdown_table(rows))
    for c in checks:
        print("check:", c)
    out = Path(args.out)
    write_json(out, info)
    print(f"wrote {out}")
    return info


if __name__ == "__main__":
    main()
