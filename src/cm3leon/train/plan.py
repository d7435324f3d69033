"""The plan of a pretraining run, without a GPU (`cm3leon pretrain --dry-run`).

The model is built on the `meta` device (no memory), and FSDP2's sharding is computed from
its parameter list the way `apply_parallelism` applies it: one group per block, one for the
rest (embeddings, tied head); each parameter split on dim 0 into `world_size` equal, padded
pieces (`torch.chunk` rows). Memory per rank is then counted, not measured:

- weights, gradients and AdamW's two moments of this rank's shard in fp32 (16 bytes per
  parameter, as FSDP2 with a bf16 `MixedPrecisionPolicy` keeps them);
- the working copies FSDP2 gathers: the root group's and two blocks' parameters (the one
  running and the one prefetched) in the compute dtype, with their unsharded gradients in fp32;
- activations of one micro-batch, Korthikanti et al. 2022 (arXiv:2205.05198, Sec. 4.1):
  34 * s * b * h bytes per layer in 16-bit with fused attention (no s x s scores kept; their
  count includes dropout masks, which this model has none of, so it is an upper bound);
  with activation checkpointing only each block's input (2 * s * b * h) is kept, plus one
  block recomputed at a time;
- the output head's logits: s * b * vocab in the compute dtype, their fp32 copy and fp32
  log-probabilities kept for the backward of the cross-entropy.

Speed is the FLOPs formula (`flops_per_token`: 6N + 12 L d s, PaLM App. B) at an MFU that the
caller assumes and the output states; nothing is timed.
"""

from __future__ import annotations

import math

from cm3leon.errors import CM3LeonError
from cm3leon.model.config import ModelConfig
from cm3leon.train.config import TrainConfig

GIB = 1024**3
ACTIVATION_BYTES_PER_LAYER_16BIT = 34  # x s * b * h (Korthikanti et al. 2022, Sec. 4.1)


def _shard_elements(shape: tuple[int, ...], world_size: int) -> int:
    """Elements of one rank's FSDP2 shard of a parameter: ceil(dim0 / world) rows."""
    rows = math.ceil(shape[0] / world_size)
    return rows * math.prod(shape[1:])


def training_plan(model_config: ModelConfig, train_config: TrainConfig, world_size: int,
                  assumed_mfu: float = 0.4, peak_tflops: float | None = None,
                  gpu_memory_gib: float | None = None) -> dict:
    """Parameters, memory per rank, steps, tokens and (given a peak) speed of a run of
    `train_config` on `world_size` ranks; see the module docstring for what is counted."""
    import torch

    from cm3leon.model.transformer import CM3LeonTransformer, flops_per_token
    from cm3leon.train.parallel import resolve_parallel

    if world_size < 1:
        raise CM3LeonError(f"--world-size must be >= 1, got {world_size}")
    if not 0 < assumed_mfu <= 1:
        raise CM3LeonError(f"--assumed-mfu must be in (0, 1], got {assumed_mfu}")
    if train_config.seq_len > model_config.max_seq_len:
        raise CM3LeonError(f"train.seq_len {train_config.seq_len} exceeds model.max_seq_len {model_config.max_seq_len}")
    with torch.device("meta"):
        net = CM3LeonTransformer(model_config)
    parallel = resolve_parallel(train_config.parallel, world_size)
    shard_world = world_size if parallel == "fsdp2" else 1  # DDP / one process: every rank holds it all
    block = list(net.blocks[0].parameters())
    block_elements = sum(p.numel() for p in block)
    block_ids = {id(p) for b in net.blocks for p in b.parameters()}
    root = [p for p in net.parameters() if id(p) not in block_ids]
    root_elements = sum(p.numel() for p in root)
    total = sum(p.numel() for p in net.parameters())
    shard = sum(_shard_elements(tuple(p.shape), shard_world) for p in net.parameters())

    compute_bytes = 2 if train_config.dtype in ("bf16", "auto") else 4
    s, b, h, layers = train_config.seq_len, train_config.micro_batch_size, model_config.d_model, model_config.n_layer
    per_layer = ACTIVATION_BYTES_PER_LAYER_16BIT * s * b * h * compute_bytes // 2
    if train_config.activation_checkpointing:
        activations = layers * s * b * h * compute_bytes + per_layer
    else:
        activations = layers * per_layer
    logits = s * b * model_config.padded_vocab_size * (compute_bytes + 4 + 4)
    gathered = (compute_bytes + 4) * (root_elements + 2 * block_elements) if shard_world > 1 else 0
    memory = {
        "weights_fp32": 4 * shard,
        "gradients_fp32": 4 * shard,
        "adamw_moments_fp32": 8 * shard,
        "gathered_working_copies": gathered,
        "activations": activations,
        "logits_and_loss": logits,
    }
    memory_total = sum(memory.values())

    accum = train_config.grad_accum_steps(world_size)
    tokens_per_step = accum * b * s * world_size
    fpt = flops_per_token(model_config, s)
    plan = {
        "parameters": total,
        "parameters_without_embeddings": total - root_elements,
        "parallel": parallel,
        "world_size": world_size,
        "fsdp2_groups": {"blocks": layers, "parameters_per_block": block_elements, "root_parameters": root_elements},
        "parameters_per_rank": shard,
        "memory_per_rank_gib": {k: round(v / GIB, 3) for k, v in memory.items()},
        "memory_per_rank_total_gib": round(memory_total / GIB, 3),
        "dtype": train_config.dtype,
        "activation_checkpointing": train_config.activation_checkpointing,
        "micro_batch_size": b,
        "seq_len": s,
        "grad_accum_steps": accum,
        "tokens_per_step": tokens_per_step,
        "steps": train_config.steps,
        "tokens": tokens_per_step * train_config.steps,
        "flops_per_token": fpt,
        "training_flops": fpt * tokens_per_step * train_config.steps,
        "assumed_mfu": assumed_mfu,
    }
    if gpu_memory_gib is not None:
        plan["gpu_memory_gib"] = gpu_memory_gib
        plan["fits"] = memory_total / GIB <= gpu_memory_gib
    if peak_tflops:
        tps = assumed_mfu * peak_tflops * 1e12 / fpt
        plan.update({"peak_tflops": peak_tflops, "tokens_per_second_per_gpu": round(tps),
                     "tokens_per_second": round(tps * world_size),
                     "hours": round(plan["tokens"] / (tps * world_size) / 3600, 1)})
    return plan


def format_plan(plan: dict) -> str:
    """The plan as a few readable lines (what `cm3leon pretrain --dry-run` prints)."""
    mem = plan["memory_per_rank_gib"]
    lines = [
        f"model: {plan['parameters'] / 1e6:.1f}M parameters ({plan['parameters_without_embeddings'] / 1e6:.1f}M "
        f"without embeddings), {plan['fsdp2_groups']['blocks']} blocks of "
        f"{plan['fsdp2_groups']['parameters_per_block'] / 1e6:.2f}M",
        f"parallel: {plan['parallel']} over {plan['world_size']} rank(s): {plan['parameters_per_rank'] / 1e6:.1f}M "
        f"parameters per rank",
        f"memory per rank: {plan['memory_per_rank_total_gib']:.2f} GiB = "
        + " + ".join(f"{k} {v:.2f}" for k, v in mem.items())
        + f"  ({plan['dtype']}, activation checkpointing {'on' if plan['activation_checkpointing'] else 'off'}, "
          f"micro-batch {plan['micro_batch_size']} x {plan['seq_len']})",
    ]
    if "fits" in plan:
        lines.append(f"  {'fits' if plan['fits'] else 'DOES NOT FIT'} in {plan['gpu_memory_gib']:g} GiB per GPU")
    lines.append(f"steps: {plan['steps']:,} of {plan['tokens_per_step']:,} tokens ({plan['grad_accum_steps']} "
                 f"micro-batches per rank per step): {plan['tokens']:.3e} tokens, {plan['training_flops']:.3e} FLOPs")
    if "tokens_per_second_per_gpu" in plan:
        lines.append(f"speed at an assumed MFU of {plan['assumed_mfu']:.0%} of {plan['peak_tflops']:g} TFLOP/s: "
                     f"{plan['tokens_per_second_per_gpu']:,} tokens/s per GPU, {plan['tokens_per_second']:,} in all, "
                     f"{plan['hours']:,} h")
    else:
        lines.append("speed: give --peak-tflops (the GPU's dense peak in the run's dtype) for tokens/s and hours")
    return "\n".join(lines)
