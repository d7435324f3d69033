"""The training loop: any dataset of (tokens, targets) blocks, one process or torchrun.

Used by pretraining (CM3 + retrieval blocks) and instruction tuning alike. What it does per
optimizer step: `grad_accum_steps` micro-batches per rank, loss weighted by each
micro-batch's share of the step's target tokens (so the step's loss is the mean over all
its tokens on all ranks), clip, AdamW, LR from `schedule.lr_at`. Around it: metrics.jsonl,
validation, atomic checkpoints with automatic resume, and the final model directory.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from cm3leon.data.sequences import BlockStream, MapBlockStream
from cm3leon.errors import CM3LeonError
from cm3leon.objectives.cm3 import IGNORE_INDEX
from cm3leon.tokenizers.vocab import Vocab
from cm3leon.train import checkpoint as ckpt
from cm3leon.train.config import TrainConfig
from cm3leon.train.parallel import (DistInfo, all_reduce_min, all_reduce_sum, apply_parallelism, barrier,
                                    resolve_parallel, setup_distributed, teardown_distributed, unwrap)
from cm3leon.train.schedule import lr_at
from cm3leon.utils.io import atomic_path, write_json, write_jsonl
from cm3leon.utils.logging import MetricsLogger, progress, read_metrics

METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"


def build_model(model: Any, vocab: Vocab) -> nn.Module:
    """A CM3LeonTransformer from a ModelConfig, a model directory (to continue training
    from) or an nn.Module (used as is)."""
    if isinstance(model, nn.Module):
        net = model
    else:
        from cm3leon.model.config import ModelConfig
        from cm3leon.model.transformer import CM3LeonTransformer

        if isinstance(model, ModelConfig):
            net = CM3LeonTransformer(model)
        elif isinstance(model, (str, os.PathLike)):
            net = CM3LeonTransformer.from_pretrained(model)
        else:
            raise CM3LeonError(f"model must be a ModelConfig, a model directory or a module, got {type(model).__name__}")
    size = getattr(getattr(net, "config", None), "vocab_size", None)
    if size is not None and size < vocab.size:
        raise CM3LeonError(f"the model's vocab_size {size} is smaller than the vocabulary ({vocab.size} ids)")
    return net.train()


def _as_stream(data, cfg: TrainConfig, info: DistInfo, epochs: int | None, shuffle: bool):
    """Wrap a dataset so that it is sharded over ranks and resumable."""
    if data is None:
        return None
    if isinstance(data, BlockStream):
        data.set_shard(info.rank, info.world_size)
        return data
    if isinstance(data, IterableDataset) or not hasattr(data, "__getitem__"):
        if info.distributed:
            raise CM3LeonError("a plain iterable dataset cannot be sharded over ranks; use a map-style "
                               "dataset or a cm3leon.data.sequences.BlockStream")
        return data  # resumed by skipping the batches already consumed
    stream = MapBlockStream(data, seed=cfg.seed, shuffle=shuffle, epochs=epochs)
    stream.set_shard(info.rank, info.world_size)
    return stream


class _Batches:
    """Micro-batches from a DataLoader, remembering the stream position for checkpoints."""

    def __init__(self, data, cfg: TrainConfig, state: dict | None):
        self.data, self.cfg = data, cfg
        workers = cfg.num_workers or 1
        self.state = state or {"batches": 0, "num_workers": workers, "positions": {}}
        if "start_epoch" in self.state:  # resumed under another world size (see load_checkpoint)
            epoch = self.state.pop("start_epoch")
            self.state.update(num_workers=workers, positions={str(w): [epoch, 0] for w in range(workers)})
        if isinstance(data, BlockStream):
            data.resume(self.state if self.state["positions"] else None)
        loader = DataLoader(data, batch_size=cfg.micro_batch_size, num_workers=cfg.num_workers,
                            persistent_workers=cfg.num_workers > 0)
        self.it = iter(loader)
        if not isinstance(data, BlockStream):
            for _ in range(self.state["batches"]):  # plain iterable: fast-forward (restarts on a world-size change)
                next(self.it)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            batch = next(self.it)
        except StopIteration:
            raise CM3LeonError("the training data ran out; use an infinite stream or a map-style dataset") from None
        tokens, targets = (batch["tokens"], batch["targets"]) if isinstance(batch, dict) else batch[:2]
        if not isinstance(batch, dict) and len(batch) > 2:
            pos = batch[2][-1].tolist()  # (logical worker, epoch, cursor) after this batch
            self.state["positions"][str(pos[0])] = pos[1:]
        self.state["batches"] += 1
        return tokens, targets


def _check_block(tokens: torch.Tensor, targets: torch.Tensor, seq_len: int, max_len: int | None) -> None:
    if tokens.shape != targets.shape or tokens.dim() != 2:
        raise CM3LeonError(f"a batch must be tokens and targets of the same shape (B, T); got "
                           f"{tuple(tokens.shape)} and {tuple(targets.shape)}")
    if max_len is not None and tokens.shape[1] > max_len:
        raise CM3LeonError(f"blocks of {tokens.shape[1]} tokens exceed the model's context ({max_len}); "
                           "lower seq_len")


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices and embeddings; never vectors (the model has no biases or LayerNorm
    weights, but a module passed in might)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], info: DistInfo,
             autocast) -> float | None:
    """Mean loss per target token over the given micro-batches and all ranks."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    for tokens, targets in batches:
        n = float((targets != IGNORE_INDEX).sum())
        with autocast():
            _, loss = model(tokens.to(info.device), targets.to(info.device))
        total += float(loss) * n
        count += n
    total, count = all_reduce_sum([total, count], info)
    model.train(was_training)
    return total / count if count else None


def _val_batches(val_data, cfg: TrainConfig, info: DistInfo) -> list:
    """A fixed list of validation micro-batches, the same count on every rank (FSDP needs
    every rank in every forward)."""
    if val_data is None:
        return []
    loader = DataLoader(val_data, batch_size=cfg.micro_batch_size, num_workers=0)
    out = []
    for batch in loader:
        tokens, targets = (batch["tokens"], batch["targets"]) if isinstance(batch, dict) else batch[:2]
        out.append((tokens, targets))
        if len(out) >= cfg.eval_batches:
            break
    return out[: all_reduce_min(len(out), info)]


def train(model: Any, train_data, val_data, config: TrainConfig, out_dir: str | Path, vocab: Vocab,
          extra_files: dict[str, str | Path] | None = None, extra_summary: dict | None = None) -> dict:
    """Train `model` (a ModelConfig, a model directory to start from, or a module) on blocks.

    train_data / val_data: a `BlockStream` (resumable, sharded), a map-style dataset of
    (tokens, targets) (wrapped into one), or, for one process, any iterable dataset.
    out_dir receives metrics.jsonl, checkpoints/ (resumed from automatically), and at the
    end the model directory: config.json + model.safetensors + vocab.json + copies of
    `extra_files` (name -> source file or folder, e.g. text_tokenizer/) + train_summary.json
    + loss.png. Returns the summary."""
    cfg = config
    out_dir = Path(out_dir)
    info = setup_distributed()
    try:
        return _train(model, train_data, val_data, cfg, out_dir, vocab, extra_files or {}, extra_summary or {}, info)
    finally:
        teardown_distributed(info)


def _train(model, train_data, val_data, cfg: TrainConfig, out_dir: Path, vocab: Vocab, extra_files: dict,
           extra_summary: dict, info: DistInfo) -> dict:
    parallel = resolve_parallel(cfg.parallel, info.world_size)
    torch.manual_seed(cfg.seed)  # same init on every rank (FSDP2 shards what each rank built)
    net = build_model(model, vocab).to(info.device)
    model_config = getattr(net, "config", None)
    max_len = getattr(model_config, "max_seq_len", None)
    if max_len is not None and cfg.seq_len > max_len:
        raise CM3LeonError(f"seq_len {cfg.seq_len} exceeds the model's context max_seq_len={max_len}")
    num_params = sum(p.numel() for p in net.parameters())
    bf16 = cfg.dtype == "bf16"
    net = apply_parallelism(net, info, parallel, cfg.activation_checkpointing, cfg.compile, bf16)
    optimizer = torch.optim.AdamW(_param_groups(net, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
                                  eps=cfg.eps, foreach=True)

    def autocast():
        return torch.autocast(info.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    # --- resume ------------------------------------------------------------------------
    ckpt_root = out_dir / CHECKPOINTS
    latest = ckpt.latest_checkpoint(ckpt_root)
    start_step, tokens_seen, data_state = 0, 0, None
    if latest is not None:
        state = ckpt.load_checkpoint(latest, net, optimizer, info)
        start_step, tokens_seen, data_state = int(state["step"]), int(state["tokens_seen"]), state["data"]
        saved_model = state.get("model_config")
        if model_config is not None and saved_model and saved_model != model_config.to_dict():
            raise CM3LeonError(f"{latest}: saved for another model config; use a new --out or delete {ckpt_root}")
        if info.is_main:
            # Drop metrics written after the checkpoint: those steps are trained again.
            rows = [r for r in read_metrics(out_dir / METRICS) if r.get("step", 0) <= start_step]
            write_jsonl(out_dir / METRICS, rows)
    barrier(info)

    accum = cfg.grad_accum_steps(info.world_size)
    stream = _as_stream(train_data, cfg, info, epochs=None, shuffle=True)
    val_stream = _as_stream(val_data, cfg, info, epochs=1, shuffle=False)
    batches = _Batches(stream, cfg, data_state) if start_step < cfg.steps else None
    val = _val_batches(val_stream, cfg, info)
    tokens_per_step = accum * cfg.micro_batch_size * cfg.seq_len * info.world_size

    logger = MetricsLogger(out_dir / METRICS if info.is_main else None)
    bar = progress(total=cfg.steps * tokens_per_step, desc="train", unit="tok", unit_scale=True,
                   initial=start_step * tokens_per_step, disable=not info.is_main)
    last_loss, val_loss, t_start = float("nan"), None, time.time()
    t_log, tok_log = time.time(), 0
    try:
        for step in range(start_step, cfg.steps):
            lr = lr_at(step, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.decay, cfg.min_lr_ratio)
            for g in optimizer.param_groups:
                g["lr"] = lr
            micro = [batches.next() for _ in range(accum)]
            for tokens, targets in micro:
                _check_block(tokens, targets, cfg.seq_len, max_len)
            counts = [float((t != IGNORE_INDEX).sum()) for _, t in micro]
            # Weight each micro-batch by its share of all target tokens of this step; ranks'
            # gradients are averaged by DDP / FSDP, hence the world_size factor.
            (n_step,) = all_reduce_sum([sum(counts)], info)
            step_loss = 0.0
            for i, (tokens, targets) in enumerate(micro):
                last = i == accum - 1
                with _grad_sync(net, parallel, last):
                    with autocast():
                        _, loss = net(tokens.to(info.device), targets.to(info.device))
                    weight = counts[i] * info.world_size / max(n_step, 1.0)
                    (loss * weight).backward()
                step_loss += float(loss.detach()) * counts[i]
            grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            (step_loss,) = all_reduce_sum([step_loss], info)
            last_loss = step_loss / max(n_step, 1.0)
            if not math.isfinite(last_loss):
                raise CM3LeonError(f"loss is {last_loss} at step {step + 1}; lower the learning rate (--lr)")
            tokens_seen += tokens_per_step
            tok_log += tokens_per_step
            done = step + 1
            bar.update(tokens_per_step)
            bar.set_postfix(step=done, loss=f"{last_loss:.3f}", lr=f"{lr:.2e}")
            if done % cfg.log_every == 0 or done == cfg.steps:
                now = time.time()
                logger.log(step=done, loss=last_loss, lr=lr, grad_norm=float(grad_norm),
                           tokens=tokens_seen, tokens_per_s=tok_log / max(now - t_log, 1e-9))
                t_log, tok_log = now, 0
            if val and ((cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps):
                val_loss = evaluate(net, val, info, autocast)
                logger.log(step=done, val_loss=val_loss)
            if (cfg.ckpt_every and done % cfg.ckpt_every == 0) or done == cfg.steps:
                ckpt.save_checkpoint(ckpt_root, done, net, optimizer, {
                    "tokens_seen": tokens_seen, "data": batches.state,
                    "model_config": model_config.to_dict() if model_config is not None else None,
                    "train_config": cfg.to_dict()}, info, keep=cfg.keep_checkpoints)
    finally:
        bar.close()
        logger.close()

    if start_step >= cfg.steps:  # already trained: export again, with the last logged losses
        rows = read_metrics(out_dir / METRICS) if info.is_main else []
        last_loss = next((r["loss"] for r in reversed(rows) if "loss" in r), float("nan"))
        val_loss = next((r["val_loss"] for r in reversed(rows) if r.get("val_loss") is not None), None)
    train_seconds = time.time() - t_start
    summary = {
        **extra_summary,
        "steps": cfg.steps,
        "resumed_from_step": start_step,
        "tokens_seen": tokens_seen,
        "tokens_per_step": tokens_per_step,
        "grad_accum_steps": accum,
        "world_size": info.world_size,
        "parallel": parallel,
        "device": str(info.device),
        "num_parameters": num_params,
        "final_train_loss": None if math.isnan(last_loss) else last_loss,
        "final_val_loss": val_loss,
        "train_seconds": round(train_seconds, 2),
        "tokens_per_second": round((cfg.steps - start_step) * tokens_per_step / max(train_seconds, 1e-9), 1),
        "train_config": cfg.to_dict(),
        "vocab": vocab.to_dict(),
    }
    export_model(net, out_dir, vocab, extra_files, info)
    if info.is_main:
        write_json(out_dir / "train_summary.json", summary)
        plot_losses(read_metrics(out_dir / METRICS), out_dir / "loss.png")
    barrier(info)
    return summary


def _grad_sync(net: nn.Module, parallel: str, sync: bool):
    """Skip gradient communication on all but the last micro-batch of a step."""
    if parallel == "ddp" and not sync:
        return net.no_sync()
    if parallel == "fsdp2":
        net.set_requires_gradient_sync(sync)
    return nullcontext()


def export_model(net: nn.Module, out_dir: Path, vocab: Vocab, extra_files: dict, info: DistInfo) -> None:
    """Write the model directory (rank 0): weights + config via `save_pretrained`, vocab.json,
    and copies of `extra_files`. Collective under FSDP2 (weights are gathered)."""
    from cm3leon.train.checkpoint import full_model_state
    from torch.distributed.fsdp import FSDPModule

    inner = unwrap(net)
    if isinstance(inner, FSDPModule):
        state = full_model_state(net, info)  # collective
        if info.is_main:
            # A plain CPU copy holding the gathered weights (the live ones are DTensor shards).
            cls = next(c for c in type(inner).__mro__ if not issubclass(c, FSDPModule))
            with torch.device("meta"):
                inner = cls(inner.config)
            inner.load_state_dict(state, strict=True, assign=True)
    if not info.is_main:
        return
    if not hasattr(inner, "save_pretrained"):
        raise CM3LeonError(f"{type(inner).__name__} has no save_pretrained(dir)")
    inner.save_pretrained(out_dir)
    vocab.save(out_dir / "vocab.json")
    for name, src in extra_files.items():
        src = Path(src)
        if not src.exists():
            raise FileNotFoundError(f"cannot copy {name} into the model directory: {src} does not exist")
        with atomic_path(out_dir / name) as tmp:
            if src.is_dir():
                shutil.copytree(src, tmp)
            else:
                shutil.copy2(src, tmp)


def plot_losses(rows: list[dict], path: Path) -> None:
    """loss.png: training loss per step and validation loss where measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_rows = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val_rows = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if train_rows:
        ax.plot(*zip(*train_rows), label="train")
    if val_rows:
        ax.plot(*zip(*val_rows), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
