"""The training loop: any dataset of (tokens, targets) blocks, one process or torchrun.

Used by pretraining (CM3 + retrieval blocks) and instruction tuning alike. What it does per
optimizer step (`train_step`): `grad_accum_steps` micro-batches per rank, the per-token
losses summed and divided by the step's target tokens on all ranks (so the step's loss is
the mean over all of them), clip, AdamW, LR from `schedule.lr_at`. The same per-token losses
give the text-token and image-token losses (the targets' kind in the `Vocab`) with no second
pass. Around it: metrics.jsonl (losses, perplexities, tokens/s, MFU against a given or
measured peak), validation, atomic checkpoints with automatic resume, and the final model
directory.
"""

from __future__ import annotations

import inspect
import math
import os
import shutil
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from cm3leon.objectives.sequences import BlockStream, MapBlockStream
from cm3leon.errors import CM3LeonError
from cm3leon.objectives.cm3 import IGNORE_INDEX
from cm3leon.tokenizers.vocab import Vocab
from cm3leon.train import checkpoint as ckpt
from cm3leon.train.config import TrainConfig
from cm3leon.train.flops import fastest_dtype, measure_matmul_tflops, mfu
from cm3leon.train.parallel import (DistInfo, all_reduce_max, all_reduce_sum, apply_parallelism, barrier,
                                    resolve_parallel, setup_distributed, teardown_distributed, unwrap)
from cm3leon.train.schedule import lr_at
from cm3leon.utils.io import atomic_path, remove_stale_temporaries, write_json
from cm3leon.utils.logging import MetricsLogger, progress, read_metrics, trim_metrics

METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
VAL, VAL_QUERY = "val", "val_query"  # validation sets: all CM3 targets / the query pair only


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
            net = _load_model_dir(Path(model))
        else:
            raise CM3LeonError(f"model must be a ModelConfig, a model directory or a module, got {type(model).__name__}")
    size = getattr(getattr(net, "config", None), "vocab_size", None)
    if size is not None and size < vocab.size:
        raise CM3LeonError(f"the model's vocab_size {size} is smaller than the vocabulary ({vocab.size} ids)")
    return net.train()


def _load_model_dir(path: Path) -> nn.Module:
    """`CM3LeonTransformer.from_pretrained`, with a missing, truncated or mismatched file
    reported as a CM3LeonError naming it."""
    from cm3leon.model.transformer import CONFIG_NAME, WEIGHTS_NAME, CM3LeonTransformer

    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (path / name).is_file():
            raise CM3LeonError(f"{path / name}: missing (not a model directory)")
    return CM3LeonTransformer.from_pretrained(path)  # a damaged file: a CM3LeonError naming it


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
                               "dataset or a cm3leon.objectives.sequences.BlockStream")
        return data  # resumed by skipping the batches already consumed
    stream = MapBlockStream(data, seed=cfg.seed, shuffle=shuffle, epochs=epochs)
    stream.set_shard(info.rank, info.world_size)
    return stream


def set_stream_positions(data, cfg: TrainConfig, model_config) -> None:
    """Packed streams carry position ids (documents kept apart) with document masking or
    segment positions; a stream that cannot is an error rather than silently wrong positions."""
    wanted = cfg.document_masking or bool(getattr(model_config, "segment_positions", 0))
    if not wanted or data is None:
        return
    if not hasattr(data, "set_positions"):
        raise CM3LeonError(f"document_masking / segment_positions need packed streams that carry position ids "
                           f"(cm3leon.objectives.sequences.PackedStream); got {type(data).__name__}")
    data.set_positions(model_config)


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
        tokens, targets, positions = _unpack(batch)
        if not isinstance(batch, dict) and len(batch) > 2:
            pos = batch[2][-1].tolist()  # (logical worker, epoch, cursor) after this batch
            self.state["positions"][str(pos[0])] = pos[1:]
        self.state["batches"] += 1
        return tokens, targets, positions


def _unpack(batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(tokens, targets, position ids or None) of a DataLoader batch: a dict, or a
    BlockStream's (tokens, targets, stream position[, position ids])."""
    if isinstance(batch, dict):
        return batch["tokens"], batch["targets"], batch.get("position_ids")
    return batch[0], batch[1], batch[3] if len(batch) > 3 else None


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


def build_optimizer(net: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with the config's betas / eps, weight decay on matrices only (LR set per step);
    the fused kernel (one pass over each parameter) where every parameter is a plain float
    tensor on the CPU or a CUDA device, else the multi-tensor one."""
    params = [p for p in net.parameters() if p.requires_grad]
    fused = bool(params) and all(type(p.data) is torch.Tensor and p.device.type in ("cpu", "cuda")
                                 and p.dtype in (torch.float32, torch.bfloat16, torch.float16) for p in params)
    return torch.optim.AdamW(_param_groups(net, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                             **({"fused": True} if fused else {"foreach": True}))


def train_step(net: nn.Module, optimizer: torch.optim.Optimizer, micro: list[tuple[torch.Tensor, torch.Tensor]],
               info: DistInfo, autocast=nullcontext, grad_clip: float = 1.0, vocab: Vocab | None = None,
               parallel: str = "none", per_token: bool | None = None) -> dict[str, float | None]:
    """One optimizer step over the micro-batches (gradient accumulation): forward + backward
    each, clip, optimizer step. Returns the step's mean `loss` over all its target tokens on
    all ranks, `text_loss` / `image_loss` (with `vocab`), perplexities and `grad_norm`."""
    per_token = _per_token(net) if per_token is None else per_token
    kinds, counts = zip(*(_counts(m[1], vocab) for m in micro))
    step_counts = all_reduce_sum([sum(c[j] for c in counts) for j in range(3)], info)
    # The step's loss is the mean over all its target tokens on all ranks; ranks' gradients
    # are averaged by DDP / FSDP, hence the world_size factor.
    scale = info.world_size / max(step_counts[0], 1.0)
    sums = torch.zeros(3, dtype=torch.float64, device=info.device)
    partial = per_token and getattr(unwrap(net), "partial_head", False)
    for i, (tokens, targets, *positions) in enumerate(micro):
        # The output head only where a loss is taken (SFT: the responses), indices from the
        # host copy of the targets: no device sync.
        index = _loss_index(targets) if partial else None
        with _grad_sync(net, parallel, i == len(micro) - 1):
            with autocast():
                total, s = _loss_sums(net, tokens.to(info.device), targets.to(info.device),
                                      kinds[i].to(info.device), per_token, *positions,
                                      loss_index=None if index is None else index.to(info.device, non_blocking=True))
            (total * scale).backward()
        sums += s.double()
    grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    step_sums = all_reduce_sum(sums.tolist(), info)  # the step's one device sync
    return {**_means(step_sums, step_counts), "grad_norm": float(grad_norm), "target_tokens": step_counts[0]}


def _loss_index(targets: torch.Tensor) -> torch.Tensor | None:
    """Flat indices of the positions with a target, or None when every position has one
    (then the whole head runs: nothing to skip)."""
    from cm3leon.model.transformer import loss_positions

    index = loss_positions(targets.cpu(), IGNORE_INDEX)
    return None if index.numel() == targets.numel() else index


def _per_token(net: nn.Module) -> bool:
    """Whether the model returns per-token losses (`reduction="none"`), needed to split the
    loss by modality; any module with forward(tokens, targets) -> (logits, loss) still trains."""
    try:
        return "reduction" in inspect.signature(unwrap(net).forward).parameters
    except (TypeError, ValueError):
        return False


def _counts(targets: torch.Tensor, vocab: Vocab | None) -> tuple[torch.Tensor, list[float]]:
    """Per-position kind of the predicted token, (B, T) int8: 1 text, 2 image, 0 other
    (specials, sentinels, ignored); and the counts [targets, text targets, image targets]."""
    counted = targets != IGNORE_INDEX
    kinds = torch.zeros(targets.shape, dtype=torch.int8)
    if vocab is not None:
        kinds[torch.from_numpy(vocab.is_text(targets.cpu()))] = 1
        kinds[torch.from_numpy(vocab.is_image(targets.cpu()))] = 2
    return kinds, [float(counted.sum()), float((kinds == 1).sum()), float((kinds == 2).sum())]


def _loss_sums(net: nn.Module, tokens: torch.Tensor, targets: torch.Tensor, kinds: torch.Tensor,
               per_token: bool, positions: torch.Tensor | None = None,
               loss_index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward: (sum of the token losses, with grad; detached [sum, text sum, image sum]).
    The modality sums come from the same per-token losses: no second pass. With `positions`
    (packed documents, each from position 0) every document attends only to itself."""
    extra = {}
    if positions is not None:
        from cm3leon.model.positions import document_mask

        positions = positions.to(tokens.device)
        extra = {"position_ids": positions, "attn_mask": document_mask(positions)}
    if loss_index is not None:
        extra["loss_index"] = loss_index  # (per-token losses only)
    if per_token:
        _, losses = net(tokens, targets, reduction="none", **extra)  # (B, T), 0 where ignored
        total = losses.sum()
        d = losses.detach()
        # Masked sums rather than boolean indexing: no device sync.
        sums = torch.stack([total.detach(), (d * (kinds == 1)).sum(), (d * (kinds == 2)).sum()])
        return total, sums
    _, loss = net(tokens, targets, **extra)
    total = loss * (targets != IGNORE_INDEX).sum()
    nan = torch.full((), float("nan"), device=total.device)
    return total, torch.stack([total.detach().float(), nan, nan])


def _means(sums: list[float], counts: list[float], prefix: str = "") -> dict[str, float | None]:
    """{loss, text_loss, image_loss} (mean per target token, None where no such target) and
    their perplexities, keys prefixed by `prefix`."""
    out: dict[str, float | None] = {}
    for name, s, n in zip(("loss", "text_loss", "image_loss"), sums, counts):
        value = s / n if n and math.isfinite(s) else None
        out[prefix + name] = value
        out[prefix + name.replace("loss", "ppl")] = math.exp(value) if value is not None and value < 50 else None
    return out


@torch.no_grad()
def evaluate_losses(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], info: DistInfo,
                    autocast, vocab: Vocab | None = None, prefix: str = "") -> dict[str, float | None]:
    """Mean loss per target token over the given micro-batches and all ranks (`loss`), with
    `vocab` also over text targets (`text_loss`) and image targets (`image_loss`), and the
    perplexities (`ppl`, `text_ppl`, `image_ppl`). Keys are prefixed by `prefix`."""
    was_training = model.training
    model.eval()
    per_token = _per_token(model)
    sums, counts = torch.zeros(3, dtype=torch.float64), [0.0, 0.0, 0.0]
    for tokens, targets, *positions in batches:
        kinds, c = _counts(targets, vocab)
        with autocast():
            _, s = _loss_sums(model, tokens.to(info.device), targets.to(info.device), kinds.to(info.device),
                              per_token, *positions)
        sums += s.double().cpu()
        counts = [a + b for a, b in zip(counts, c)]
    reduced = all_reduce_sum(sums.tolist() + counts, info)
    model.train(was_training)
    return _means(reduced[:3], reduced[3:], prefix)


def evaluate(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], info: DistInfo,
             autocast) -> float | None:
    """Mean loss per target token over the given micro-batches and all ranks."""
    return evaluate_losses(model, batches, info, autocast)["loss"]


def _val_batches(val_data, cfg: TrainConfig, info: DistInfo, limit: int | None = None) -> list:
    """A fixed list of validation micro-batches (at most `limit`, default `eval_batches`).
    Every rank runs the same number of forwards (FSDP needs every rank in each): a rank with
    fewer batches adds empty ones (every target ignored), so no rank's data is dropped."""
    if val_data is None:
        return []
    limit = cfg.eval_batches if limit is None else limit
    loader = DataLoader(val_data, batch_size=cfg.micro_batch_size, num_workers=0)
    out = []
    for batch in loader:
        if len(out) >= limit:
            break
        out.append(_unpack(batch))
    n = all_reduce_max(len(out), info)
    while len(out) < n:
        shape = out[0][0].shape if out else (cfg.micro_batch_size, cfg.seq_len)
        out.append((torch.zeros(shape, dtype=torch.long), torch.full(shape, IGNORE_INDEX, dtype=torch.long), None))
    return out


def _val_sets(val_data, cfg: TrainConfig) -> dict:
    """Named validation sets: `val_data` is one dataset (-> "val") or a dict of them
    ("val", "val_query"), matching `cfg.val_loss_on`."""
    sets = dict(val_data) if isinstance(val_data, dict) else {VAL: val_data}
    unknown = sorted(set(sets) - {VAL, VAL_QUERY})
    if unknown:
        raise CM3LeonError(f"validation sets must be named {VAL!r} or {VAL_QUERY!r}, got {unknown}")
    if cfg.val_loss_on in ("query", "both") and sets.get(VAL_QUERY) is None:
        raise CM3LeonError(f"val_loss_on={cfg.val_loss_on!r} needs a {VAL_QUERY!r} validation set (the query "
                           "pair of each document; `cm3leon pretrain` builds it)")
    if cfg.val_loss_on == "query":
        sets.pop(VAL, None)
    return {k: v for k, v in sets.items() if v is not None}


def train(model: Any, train_data, val_data, config: TrainConfig, out_dir: str | Path, vocab: Vocab,
          extra_files: dict[str, str | Path] | None = None, extra_summary: dict | None = None) -> dict:
    """Train `model` (a ModelConfig, a model directory to start from, or a module) on blocks.

    train_data / val_data: a `BlockStream` (resumable, sharded), a map-style dataset of
    (tokens, targets) (wrapped into one), or, for one process, any iterable dataset.
    val_data may also be a dict {"val": ..., "val_query": ...}: "val_query" holds blocks
    whose targets are the query pair only (`cm3leon.objectives.sequences.query_pair_cm3`),
    evaluated in full every pass and logged as val_query_loss (see TrainConfig.val_loss_on).
    out_dir receives metrics.jsonl (loss, text_loss, image_loss, perplexities, tokens_per_s,
    mfu; validation rows val_*), checkpoints/ (resumed from automatically), and at the
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


def _last(rows: list[dict], key: str):
    return next((r[key] for r in reversed(rows) if r.get(key) is not None), None)


def resolve_dtype(dtype: str, info: DistInfo) -> tuple[str, dict]:
    """The run's autocast dtype: `dtype`, or for "auto" the faster one measured here (every
    rank must agree: bf16 only where all ranks measured it faster)."""
    if dtype != "auto":
        return dtype, {}
    choice, probe = fastest_dtype(info.device)
    (votes,) = all_reduce_sum([float(choice == "bf16")], info)
    return ("bf16" if votes == info.world_size else "fp32"), probe


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
    dtype, dtype_probe = resolve_dtype(cfg.dtype, info)
    bf16 = dtype == "bf16"
    per_token = _per_token(net)
    val_sets = _val_sets(val_data, cfg)
    net = apply_parallelism(net, info, parallel, cfg.activation_checkpointing, cfg.compile, bf16)
    optimizer = build_optimizer(net, cfg)

    def autocast():
        return torch.autocast(info.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    # MFU: model FLOPs per token (6N + attention, PaLM App. B) over a peak that is given or
    # measured here, in the run's dtype (averaged over ranks).
    from cm3leon.model.transformer import flops_per_token

    fpt = flops_per_token(model_config, cfg.seq_len) if model_config is not None else None
    peak = cfg.peak_tflops
    if not peak:
        (peak,) = all_reduce_sum([measure_matmul_tflops(info.device, torch.bfloat16 if bf16 else torch.float32)],
                                 info)
        peak /= info.world_size

    # --- resume ------------------------------------------------------------------------
    ckpt_root = out_dir / CHECKPOINTS
    if info.is_main:
        for p in remove_stale_temporaries(ckpt_root):  # what a kill mid-save left behind
            warnings.warn(f"cleaned up {p} (left by an interrupted checkpoint save)", stacklevel=2)
    barrier(info)
    start_step, tokens_seen, data_state, state = 0, 0, None, None
    for _, path in reversed(ckpt.list_checkpoints(ckpt_root)):  # the newest one that loads
        try:
            state = ckpt.load_checkpoint(path, net, optimizer, info,
                                         model_config.to_dict() if model_config is not None else None,
                                         train_config=cfg.to_dict(), override_config=cfg.override_config)
            break
        except ckpt.DamagedCheckpoint as e:
            if info.is_main:
                warnings.warn(f"skipping damaged checkpoint {path}: {e}", stacklevel=2)
    if state is not None:
        start_step, tokens_seen, data_state = int(state["step"]), int(state["tokens_seen"]), state["data"]
    if info.is_main:  # metrics written after the checkpoint (or before the first): trained again
        trim_metrics(out_dir / METRICS, start_step)
    barrier(info)

    accum = cfg.grad_accum_steps(info.world_size)
    stream = _as_stream(train_data, cfg, info, epochs=None, shuffle=True)
    for data in [stream, *val_sets.values()]:
        set_stream_positions(data, cfg, model_config)
    batches = _Batches(stream, cfg, data_state) if start_step < cfg.steps else None
    # The query-pair set is scored in full (its records are fixed by the caller), so runs
    # with different numbers of retrieved documents score the same tokens.
    val = {name: _val_batches(_as_stream(data, cfg, info, epochs=1, shuffle=False), cfg, info,
                              limit=None if name == VAL_QUERY else cfg.eval_batches)
           for name, data in val_sets.items()}
    val = {name: b for name, b in val.items() if b}
    tokens_per_step = accum * cfg.micro_batch_size * cfg.seq_len * info.world_size

    logger = MetricsLogger(out_dir / METRICS if info.is_main else None)
    bar = progress(total=cfg.steps * tokens_per_step, desc="train", unit="tok", unit_scale=True,
                   initial=start_step * tokens_per_step, disable=not info.is_main)
    last: dict[str, float | None] = {"loss": float("nan")}
    val_last: dict[str, float | None] = {}
    t_start = time.time()
    step_seconds, time_log, tok_log, targets_seen = 0.0, 0.0, 0, 0.0
    try:
        for step in range(start_step, cfg.steps):
            lr = lr_at(step, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.decay, cfg.min_lr_ratio)
            for g in optimizer.param_groups:
                g["lr"] = lr
            t0 = time.perf_counter()  # a step's time includes its data, not validation or checkpoints
            micro = [batches.next() for _ in range(accum)]
            for tokens, targets, _ in micro:
                _check_block(tokens, targets, cfg.seq_len, max_len)
            last = train_step(net, optimizer, micro, info, autocast, cfg.grad_clip, vocab, parallel, per_token)
            grad_norm = last.pop("grad_norm")
            targets_seen += last.pop("target_tokens")
            if last["loss"] is None or not math.isfinite(last["loss"]):
                raise CM3LeonError(f"loss is not finite at step {step + 1}; lower the learning rate (--lr)")
            dt = time.perf_counter() - t0
            step_seconds += dt
            time_log += dt
            tokens_seen += tokens_per_step
            tok_log += tokens_per_step
            done = step + 1
            rate = tok_log / max(time_log, 1e-9)
            step_mfu = mfu(fpt, rate, peak, info.world_size) if fpt else None
            bar.update(tokens_per_step)
            bar.set_postfix(step=done, loss=f"{last['loss']:.3f}",
                            **{k: f"{last[k + '_loss']:.3f}" for k in ("text", "image") if last[k + "_loss"] is not None},
                            lr=f"{lr:.2e}", **({"mfu": f"{step_mfu:.1%}"} if step_mfu else {}))
            if done % cfg.log_every == 0 or done == cfg.steps:
                logger.log(step=done, **last, lr=lr, grad_norm=grad_norm, tokens=tokens_seen,
                           tokens_per_s=rate, mfu=step_mfu)
                time_log, tok_log = 0.0, 0
            if val and ((cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps):
                val_last = {}
                for name, vb in val.items():
                    val_last.update(evaluate_losses(net, vb, info, autocast, vocab, prefix=name + "_"))
                logger.log(step=done, **val_last)
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
        last = {k: _last(rows, k) for k in ("loss", "text_loss", "image_loss")}
        val_last = {f"{name}_{k}": _last(rows, f"{name}_{k}") for name in val_sets
                    for k in ("loss", "text_loss", "image_loss")}
    train_seconds = time.time() - t_start
    trained_tokens = (cfg.steps - start_step) * tokens_per_step
    step_rate = trained_tokens / step_seconds if step_seconds else None
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
        "final_train_loss": last.get("loss") if last.get("loss") is not None and math.isfinite(last["loss"]) else None,
        "final_text_loss": last.get("text_loss"),
        "final_image_loss": last.get("image_loss"),
        "final_val_loss": val_last.get("val_loss"),
        "final_val_text_loss": val_last.get("val_text_loss"),
        "final_val_image_loss": val_last.get("val_image_loss"),
        "final_val_query_loss": val_last.get("val_query_loss"),
        "final_val_query_text_loss": val_last.get("val_query_text_loss"),
        "final_val_query_image_loss": val_last.get("val_query_image_loss"),
        "train_seconds": round(train_seconds, 2),
        "tokens_per_second": round(trained_tokens / max(train_seconds, 1e-9), 1),
        # Throughput of the training steps alone (no validation, checkpoints, start-up).
        "step_tokens_per_second": round(step_rate, 1) if step_rate else None,
        # Positions with a loss (not padding, not context-only) per second of training steps:
        # what packing and masking leave of the throughput.
        "target_tokens_per_second": round(targets_seen / step_seconds, 1) if step_seconds else None,
        "target_fraction": round(targets_seen / max(trained_tokens, 1), 4),
        "flops_per_token": fpt,
        "dtype": dtype,
        "dtype_probe": dtype_probe,
        "peak_tflops": peak,
        "peak_tflops_measured": not cfg.peak_tflops,
        "mfu": mfu(fpt, step_rate, peak, info.world_size) if fpt and step_rate else None,
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
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if train_rows:
        ax.plot(*zip(*train_rows), label="train")
    for key, label in (("val_loss", "validation"), ("val_query_loss", "validation, query pair")):
        val_rows = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if val_rows:
            ax.plot(*zip(*val_rows), "o-", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
