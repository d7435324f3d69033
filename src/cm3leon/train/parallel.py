"""Processes, devices and model parallelism.

`apply_parallelism` applies everything to the model in one place and a fixed order, as in
torchtitan: activation checkpointing -> torch.compile -> FSDP2 (per block, then the root)
or DDP. Under `torchrun` the process group comes from the environment (NCCL on GPUs, gloo
on CPUs); a plain `python` run is one process with no group.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from cm3leon.errors import CM3LeonError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False  # this code opened the process group (and closes it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str | None = None) -> DistInfo:
    """Join the torchrun process group if there is one; pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    initialized_here = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        initialized_here = True
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank, world, local_rank, dev, initialized_here)


def teardown_distributed(info: DistInfo) -> None:
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def resolve_parallel(parallel: str, world_size: int) -> str:
    """'auto' -> 'fsdp2' with several processes, 'none' with one; refuse impossible mixes."""
    if parallel == "auto":
        return "fsdp2" if world_size > 1 else "none"
    if parallel == "none" and world_size > 1:
        raise CM3LeonError(f"parallel='none' under {world_size} processes; use 'ddp' or 'fsdp2' with torchrun")
    if parallel in ("ddp", "fsdp2") and world_size == 1:
        return "none"  # one process: nothing to shard or synchronise
    return parallel


def apply_parallelism(model: nn.Module, info: DistInfo, parallel: str, activation_checkpointing: bool = False,
                      compile: bool = False, bf16: bool = False) -> nn.Module:
    """Activation checkpointing -> compile -> FSDP2 / DDP, in that order; returns the module
    to train (the same object for FSDP2 and 'none', a DDP wrapper for DDP)."""
    if activation_checkpointing:
        if not hasattr(model, "gradient_checkpointing"):
            raise CM3LeonError(f"{type(model).__name__} has no gradient_checkpointing flag")
        model.gradient_checkpointing = True
    if compile:
        # Per block and in place, so parameter names (and checkpoints) stay unchanged.
        for block in model.blocks:
            block.compile()
    if parallel == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # The model returns sliced (view) logits and never edits them in place.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        mesh = init_device_mesh(info.device.type, (info.world_size,))
        # bf16 compute and all-gathers, fp32 gradient reduction (torchtitan's default).
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
        for i, block in enumerate(model.blocks):
            # The last block stays gathered for backward: it is needed again at once.
            fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=i < len(model.blocks) - 1)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The CM3LeonTransformer inside a DDP wrapper (FSDP2 shards in place: no wrapper)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    """Sum floats over ranks (float64 so token counts stay exact)."""
    if not info.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device(info))
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(value: int, info: DistInfo) -> int:
    if not info.distributed:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_comm_device(info))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_gather_object(obj, info: DistInfo) -> list:
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, info: DistInfo):
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def _comm_device(info: DistInfo) -> torch.device:
    return info.device if dist.get_backend() == "nccl" else torch.device("cpu")
