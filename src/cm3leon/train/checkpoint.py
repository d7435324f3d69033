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


def read_safetensors(path: str | Path, what: str = "weights") -> dict[str, torch.Tensor]:
    """Load a safetensors file; a missing, truncated or corrupt one is a CM3LeonError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CM3LeonError(f"{path}: {what} file missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CM3LeonError(f"{path}: {what} file truncated or corrupt ({e})") from None


def _read_torch(path: Path, what: str):
    if not path.is_file():
        raise CM3LeonError(f"{path}: {what} file missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError) as e:
        raise CM3LeonError(f"{path}: {what} file truncated or corrupt ({str(e).split('. ')[0]})") from None


def read_trainer_state(path: str | Path) -> dict:
    """`trainer_state.json` of a checkpoint directory (CM3LeonError naming it when missing/bad)."""
    file = Path(path) / "trainer_state.json"
    try:
        return read_json(file, "checkpoint state")
    except (FileNotFoundError, ValueError) as e:
        raise CM3LeonError(f"{file}: checkpoint state missing or unreadable ({e})") from None


def config_differences(saved: dict, current: dict) -> list[str]:
    """'field: saved -> current' for every field that differs between two config dicts."""
    return [f"{k}: {saved.get(k)!r} in the checkpoint, {current.get(k)!r} now"
            for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    info: DistInfo, model_config: dict | None = None) -> dict:
    """Restore weights, optimizer and RNG from `path` (rank 0 reads, the others receive);
    returns the trainer state with `data` set to this rank's data-stream state.

    A missing or truncated file, or a checkpoint saved for another `model_config` (checked
    before any weight is touched), is a CM3LeonError naming the file, on every rank."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    path = Path(path)
    state = read_trainer_state(path)
    saved_config = state.get("model_config")
    if model_config is not None and saved_config and saved_config != model_config:
        raise CM3LeonError(f"{path}: checkpoint of a different model config ("
                           + "; ".join(config_differences(saved_config, model_config))
                           + f"); use a new run directory or delete {path.parent}")
    model_sd, optim_sd, rngs, error = {}, {}, None, None
    if info.is_main:
        try:
            model_sd = read_safetensors(path / "model.safetensors", "checkpoint weights")
            optim_sd = _read_torch(path / "optimizer.pt", "optimizer state")
            rngs = _read_torch(path / "rng.pt", "RNG state")
        except CM3LeonError as e:
            error = str(e)
    error = broadcast_object(error, info)  # every rank fails the same way instead of hanging
    if error:
        raise CM3LeonError(error)
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=info.distributed)
    try:
        set_model_state_dict(model, model_sd, options=opts)
        set_optimizer_state_dict(model, optimizer, optim_sd, options=opts)
    except (RuntimeError, KeyError, ValueError) as e:
        raise CM3LeonError(f"{path}: checkpoint does not fit the model ({e})") from None
    rngs = broadcast_object(rngs, info)
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
