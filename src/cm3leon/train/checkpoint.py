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

import json
import re
from pathlib import Path

import torch
from torch import nn

from cm3leon.errors import CM3LeonError
from cm3leon.train.parallel import DistInfo, all_gather_object, barrier, broadcast_object
from cm3leon.utils.io import atomic_path, load_safetensors, read_json, remove_tree, write_json

STEP_DIR = re.compile(r"^step-(\d+)$")
# TrainConfig fields a resume may change (the rest shape the trajectory: a resume that
# changes them is refused unless TrainConfig.override_config; `steps` may only grow).
RESUME_MAY_CHANGE = ("steps", "log_every", "eval_every", "eval_batches", "val_loss_on", "peak_tflops", "ckpt_every",
                     "keep_checkpoints", "activation_checkpointing", "compile", "parallel", "override_config")


class DamagedCheckpoint(CM3LeonError):
    """A checkpoint whose files are missing, truncated or corrupt (an older one may load)."""


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
            remove_tree(old)  # whole or gone, even when killed midway
    barrier(info)
    return path


def _read_torch(path: Path, what: str):
    if not path.is_file():
        raise DamagedCheckpoint(f"{path}: {what} file missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises many kinds on garbage (unpickling, zip, ...)
        raise DamagedCheckpoint(f"{path}: {what} file truncated or corrupt "
                                f"({type(e).__name__}: {str(e).split('. ')[0][:200]})") from None


def read_trainer_state(path: str | Path) -> dict:
    """`trainer_state.json` of a checkpoint directory (DamagedCheckpoint naming it when
    missing, unreadable or without its step)."""
    file = Path(path) / "trainer_state.json"
    try:
        state = read_json(file, "checkpoint state")
    except (FileNotFoundError, ValueError) as e:
        raise DamagedCheckpoint(f"{file}: checkpoint state missing or unreadable ({e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) \
            or not isinstance(state.get("tokens_seen"), int):
        raise DamagedCheckpoint(f"{file}: checkpoint state without an integer step and tokens_seen")
    return state


def _json_normal(v):
    return json.loads(json.dumps(v))


def train_config_differences(saved: dict, current: dict) -> list[str]:
    """The differences between a checkpoint's training config and this run's that a resume
    may not make silently (fields outside RESUME_MAY_CHANGE)."""
    keys = (set(saved) | set(current)) - set(RESUME_MAY_CHANGE)
    saved, current = _json_normal({k: saved.get(k) for k in keys}), _json_normal({k: current.get(k) for k in keys})
    return config_differences(saved, current)


def config_differences(saved: dict, current: dict) -> list[str]:
    """'field: saved -> current' for every field that differs between two config dicts."""
    return [f"{k}: {saved.get(k)!r} in the checkpoint, {current.get(k)!r} now"
            for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    info: DistInfo, model_config: dict | None = None, train_config: dict | None = None,
                    override_config: bool = False) -> dict:
    """Restore weights, optimizer and RNG from `path` (rank 0 reads, the others receive);
    returns the trainer state with `data` set to this rank's data-stream state.

    Checked before any weight is touched, on every rank: a missing, truncated or corrupt file
    is a DamagedCheckpoint naming it (an older checkpoint may still load); a checkpoint of
    another `model_config`, or of a `train_config` that differs outside RESUME_MAY_CHANGE
    (unless `override_config`), or with `steps` below its step, is a CM3LeonError."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    path = Path(path)
    state = read_trainer_state(path)
    saved_config = state.get("model_config")
    if model_config is not None and saved_config and saved_config != model_config:
        raise CM3LeonError(f"{path}: checkpoint of a different model config ("
                           + "; ".join(config_differences(saved_config, model_config))
                           + f"); use a new run directory or delete {path.parent}")
    saved_train = state.get("train_config")
    if train_config is not None and isinstance(saved_train, dict):
        if int(train_config.get("steps", state["step"])) < state["step"]:
            raise CM3LeonError(f"{path}: steps {train_config.get('steps')} is below the checkpoint's step "
                               f"{state['step']}; give steps >= {state['step']}, or use a new run directory")
        diff = train_config_differences(saved_train, train_config)
        if diff and not override_config:
            raise CM3LeonError(f"{path}: resuming with another training config (" + "; ".join(diff)
                               + "): pass --override-config to resume anyway, or use a new run directory")
    model_sd, optim_sd, rngs, error = {}, {}, None, None
    if info.is_main:
        try:
            model_sd = load_safetensors(path / "model.safetensors", "checkpoint weights")
            optim_sd = _read_torch(path / "optimizer.pt", "optimizer state")
            rngs = _read_torch(path / "rng.pt", "RNG state")
            if not isinstance(optim_sd, dict):
                raise DamagedCheckpoint(f"{path / 'optimizer.pt'}: not an optimizer state")
            if not (isinstance(rngs, list) and rngs and all(isinstance(r, torch.Tensor) and r.dtype == torch.uint8
                                                             for r in rngs)):
                raise DamagedCheckpoint(f"{path / 'rng.pt'}: not a list of RNG states")
            if int(state.get("world_size", 1)) == info.world_size and len(rngs) < info.world_size:
                raise DamagedCheckpoint(f"{path / 'rng.pt'}: {len(rngs)} RNG state(s) for {info.world_size} rank(s)")
        except CM3LeonError as e:
            error = str(e)
    error = broadcast_object(error, info)  # every rank fails the same way instead of hanging
    if error:
        raise DamagedCheckpoint(error)
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
