"""Atomic, resumable training checkpoints that work the same for one process, DDP and FSDP2.

    checkpoints/step-00000100/
        model.safetensors   full (unsharded) fp32 weights
        optimizer.pt        full optimizer state (tensors only; loaded with weights_only=True)
        rng.pt              torch RNG state of every rank
        trainer_state.json  step, tokens seen, data-stream positions per rank, configs

Full state dicts are gathered on rank 0 through `torch.distributed.checkpoint.state_dict`
(keys are parameter names, whatever the wrapping), written to a temporary directory and
renamed into place, so a crash never leaves a half-written checkpoint and any world size
can resume from it.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch
from torch import nn

from cm3leon.errors import CM3LeonError
from cm3leon.train.parallel import DistInfo, all_gather_object, barrier, broadcast_object
from cm3leon.utils.io import atomic_path, read_json, write_json

STEP_DIR = re.compile(r"^step-(\d+)$")


def full_model_state(model: nn.Module, info: DistInfo) -> dict[str, torch.Tensor]:
    """Unsharded CPU weights on rank 0 ({} elsewhere). Collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if info.is_main else {}


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def save_checkpoint(root: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict, info: DistInfo, keep: int = 2) -> Path:
    """Write `root/step-N` atomically (rank 0 writes; every rank must call) and keep the
    newest `keep`. `state["data"]` may differ per rank: all ranks' values are stored."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = full_model_state(model, info)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=opts)
    per_rank = all_gather_object({"data": state.get("data"), "rng": torch.get_rng_state()}, info)
    path = Path(root) / f"step-{step:08d}"
    if info.is_main:
        with atomic_path(path) as tmp:
            tmp.mkdir()
            save_file({k: v.contiguous() for k, v in model_sd.items()}, str(tmp / "model.safetensors"))
            torch.save(optim_sd, tmp / "optimizer.pt")
            torch.save([r["rng"] for r in per_rank], tmp / "rng.pt")
            write_json(tmp / "trainer_state.json",
                       {**state, "step": step, "world_size": info.world_size, "data": [r["data"] for r in per_rank]})
        for _, old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(info)
    return path


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    info: DistInfo) -> dict:
    """Restore weights, optimizer and RNG from `path` (rank 0 reads, the others receive);
    returns the trainer state with `data` set to this rank's data-stream state."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    path = Path(path)
    state = read_json(path / "trainer_state.json", "checkpoint state")
    model_sd, optim_sd = {}, {}
    if info.is_main or not info.distributed:
        model_sd = load_file(str(path / "model.safetensors"))
        optim_sd = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=info.distributed)
    try:
        set_model_state_dict(model, model_sd, options=opts)
    except RuntimeError as e:
        raise CM3LeonError(f"{path}: checkpoint weights do not fit the model ({e})") from None
    set_optimizer_state_dict(model, optimizer, optim_sd, options=opts)
    rngs = broadcast_object(torch.load(path / "rng.pt", weights_only=True) if info.is_main else None, info)
    data = state.get("data") or []
    if int(state.get("world_size", 1)) == info.world_size:
        torch.set_rng_state(rngs[info.rank])
        state["data"] = data[info.rank] if info.rank < len(data) else None
    else:
        # Another world size re-shards the data: every stream starts the epoch after the
        # furthest one saved, so no sample is seen twice within an epoch.
        epochs = [int(p[0]) for d in data if d for p in d.get("positions", {}).values()]
        state["data"] = {"batches": 0, "positions": {}, "start_epoch": max(epochs) + 1 if epochs else 0}
    return state
