"""Model FLOPs utilisation (MFU): model FLOPs per second over a peak measured on this device.

The peak is never a table of hardware numbers: it is either given by the user
(`TrainConfig.peak_tflops`, `--peak-tflops`) or measured once as the throughput of a large
square matmul in the run's dtype, i.e. the best a dense GEMM reaches here. MFU against a
measured GEMM peak is comparable across machines and precisions (PaLM, Chowdhery et al.
2022, App. B, defines MFU against the peak; on CPUs no datasheet peak is meaningful).
"""

from __future__ import annotations

import functools
import time

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def matmul_size(device: torch.device | str) -> int:
    """Side of the timed square matmul: large enough to saturate the device, small enough
    to take well under a second (CPU: 2 GFLOP; GPU: 1.1 TFLOP)."""
    return 8192 if torch.device(device).type == "cuda" else 1024


@functools.cache
def _measure(device: str, dtype: torch.dtype, size: int, min_seconds: float) -> float:
    dev = torch.device(device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(dev, dtype)
    b = torch.randn(size, size, generator=gen).to(dev, dtype)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    for _ in range(2):  # warm-up: kernel selection, caches
        a @ b
    sync()
    reps, t0 = 0, time.perf_counter()
    while True:
        a @ b
        reps += 1
        if reps % 4 == 0 or dev.type != "cuda":
            sync()
            elapsed = time.perf_counter() - t0
            if elapsed >= min_seconds:
                break
    return 2.0 * size**3 * reps / elapsed / 1e12


def measure_matmul_tflops(device: torch.device | str = "cpu", dtype: torch.dtype | str = torch.float32,
                          size: int | None = None, min_seconds: float = 0.25) -> float:
    """Achieved TFLOP/s of `size` x `size` matmuls in `dtype` on `device`, timed for at
    least `min_seconds` after a warm-up. Cached per (device, dtype, size) in this process."""
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    size = size or matmul_size(device)
    return _measure(str(torch.device(device)), dtype, int(size), float(min_seconds))


def fastest_dtype(device: torch.device | str = "cpu", size: int = 512, margin: float = 1.1) -> tuple[str, dict]:
    """"bf16" or "fp32", whichever multiplies `size` x `size` matrices faster on `device`
    (bf16 must win by `margin`: it also rounds), and the measured GFLOP/s of each.

    CPUs differ: some have bf16 matrix units (several times fp32), on others bf16 is
    emulated and slower than fp32; GPUs with bf16 support take it without measuring."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return ("bf16" if torch.cuda.is_bf16_supported() else "fp32"), {}
    rates = {name: measure_matmul_tflops(dev, DTYPES[name], size=size, min_seconds=0.05) * 1e3
             for name in ("fp32", "bf16")}
    return ("bf16" if rates["bf16"] > margin * rates["fp32"] else "fp32"), {
        f"{k}_gflops": round(v, 1) for k, v in rates.items()}


def mfu(flops_per_token: float, tokens_per_second: float, peak_tflops: float, num_devices: int = 1) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over `num_devices` x the peak."""
    return flops_per_token * tokens_per_second / (peak_tflops * 1e12 * num_devices)


# ---- training FLOPs, counted --------------------------------------------------------------------


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def forward_flops(module: torch.nn.Module, *args, **kwargs) -> int:
    """FLOPs of one forward call `module(*args, **kwargs)`, counted by torch's FlopCounterMode
    on the operators it runs: matrix products, convolutions and attention (2 FLOPs per
    multiply-add; the full T x T attention scores also under a causal mask, as 6N + 12 L d T
    counts them). Norms, activations and other elementwise operators are not counted, as no
    FLOP budget in the literature counts them. Run without gradients."""
    from torch.utils.flop_counter import FlopCounterMode

    # CPU's fused attention kernel is missing from torch's table of formulas: it counts as SDPA
    extra = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=extra) as counter:
        module(*args, **kwargs)
    return int(counter.get_total_flops())


def training_flops_per_sample(module: torch.nn.Module, *args, **kwargs) -> float:
    """Training FLOPs of one sample: 3x the counted forward FLOPs of a batch of ONE sample
    (`args`), since the backward pass costs twice the forward (Kaplan et al. 2020,
    arXiv:2001.08361, Sec. 2.1). The one count the baselines comparison applies to every model
    (`cm3leon ablate --baselines`): a sample is a training block of seq_len tokens for a
    transformer (which reproduces `flops_per_token` x seq_len, 6N + attention, exactly) and one
    image latent for the diffusion U-Net. The frozen parts (the text encoder and the image
    tokenizer, run once over the data beforehand) are not counted for any model."""
    return 3.0 * forward_flops(module, *args, **kwargs)
