"""Train the bi-encoder contrastively (CLIP: symmetric InfoNCE with a learned temperature,
Radford et al. 2021, arXiv:2103.00020) and measure text<->image recall@k on held-out pairs."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cm3leon.errors import CM3LeonError
from cm3leon.retrieval.encoder import BiEncoder, BiEncoderConfig, encode_bytes, images_to_uint8, save_bi_encoder
from cm3leon.utils.io import write_json
from cm3leon.utils.logging import MetricsLogger, progress


@dataclass
class RetrieverTrainConfig:
    steps: int = 300  # about a minute on two CPU cores at 32 px (recall@1 ~0.85 on shapes)
    batch_size: int = 128
    lr: float = 2e-3  # peak AdamW learning rate
    weight_decay: float = 0.1  # on matrices only (CLIP uses 0.2 at scale)
    warmup_steps: int = 50  # linear warmup, then cosine decay to 0
    grad_clip: float = 1.0
    same_caption_positive: bool = True  # pairs with identical captions are positives of each other (see loss)
    eval_max: int = 1000  # recall@k is measured on up to this many held-out pairs
    log_every: int = 25


# ---------------------------------------------------------------------------- loss and metrics

def contrastive_loss(text_emb: torch.Tensor, image_emb: torch.Tensor, logit_scale: torch.Tensor,
                     group_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of (text, image) pairs (CLIP).

    With `group_ids`, items sharing an id are all positives of one another (the target is
    uniform over them): CLIP assumes every caption in a batch is unique, which web data
    nearly is but a small captioned dataset is not, and a repeated caption would otherwise be
    pushed away from images it describes exactly."""
    logits = logit_scale * text_emb @ image_emb.t()  # (B, B): text i vs image j
    if group_ids is None:
        target = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
    pos = (group_ids[:, None] == group_ids[None, :]).to(logits.dtype)  # symmetric
    target = pos / pos.sum(1, keepdim=True)
    # minus the targets' entropy (a constant): 0 at the optimum, as plain InfoNCE is
    entropy = pos.sum(1).log().mean()
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2 - entropy


def recall_at_k(sim: torch.Tensor, ks: Sequence[int] = (1, 5), positives: torch.Tensor | None = None) -> dict[int, float]:
    """Fraction of queries (rows of `sim` [Nq, Nc]) with a positive among their top-k candidates.

    `positives` is a bool [Nq, Nc] matrix; by default query i's only positive is candidate i."""
    nq, nc = sim.shape
    if positives is None:
        if nq != nc:
            raise CM3LeonError(f"recall_at_k: a {nq}x{nc} similarity needs an explicit positives matrix")
        positives = torch.eye(nq, dtype=torch.bool)
    top = sim.topk(min(max(ks), nc), dim=1).indices  # (Nq, kmax)
    hit = positives.gather(1, top)  # (Nq, kmax) bool
    return {k: float(hit[:, :k].any(1).float().mean()) for k in ks}


def retrieval_metrics(text_emb: torch.Tensor, image_emb: torch.Tensor, texts: Sequence[str],
                      ks: Sequence[int] = (1, 5)) -> dict:
    """Text->image and image->text recall@k of N aligned pairs. A candidate whose caption is
    identical to the query's counts as correct (the caption cannot tell such images apart)."""
    ids = caption_ids(texts)
    positives = ids[:, None] == ids[None, :]
    sim = text_emb @ image_emb.t()
    t2i = recall_at_k(sim, ks, positives)
    i2t = recall_at_k(sim.t(), ks, positives)
    out = {f"text_to_image_recall@{k}": round(t2i[k], 4) for k in ks}
    out.update({f"image_to_text_recall@{k}": round(i2t[k], 4) for k in ks})
    out["num_pairs"] = len(texts)
    out["distinct_captions"] = int(ids.unique().numel())
    return out


def caption_ids(texts: Sequence[str]) -> torch.Tensor:
    table: dict[str, int] = {}
    return torch.tensor([table.setdefault(t, len(table)) for t in texts], dtype=torch.long)


# ---------------------------------------------------------------------------- data

def load_pairs(data: str | Path, size: int) -> tuple[list[str], torch.Tensor, np.ndarray]:
    """All (text, image) pairs of a dataset in memory: texts, uint8 pixels [N, 3, S, S], splits."""
    from cm3leon.data.readers import open_dataset

    texts, images, splits = [], [], []
    for rec in progress(desc=f"reading {Path(data).name}", unit="rec", iterable=open_dataset(str(data), size=size)):
        texts.append(rec.text)
        images.append(images_to_uint8([rec.image], size)[0])
        splits.append(rec.split or "train")
    if not texts:
        raise CM3LeonError(f"{data}: no records to train the retriever on")
    return texts, torch.stack(images), np.asarray(splits)


def eval_indices(splits: np.ndarray, max_items: int, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(train indices, held-out indices, name of the held-out split): test, else val, else the
    last 10% of train held out."""
    train = np.flatnonzero(splits == "train")
    for name in ("test", "val"):
        held = np.flatnonzero(splits == name)
        if len(held):
            break
    else:
        n_hold = max(1, len(train) // 10)
        if len(train) < 2:
            raise CM3LeonError("need at least 2 records to train and evaluate a retriever")
        train, held, name = train[:-n_hold], train[-n_hold:], "train (last 10% held out)"
    if len(train) == 0:
        raise CM3LeonError("the dataset has no train split records to train the retriever on")
    if len(held) > max_items:
        held = np.sort(np.random.default_rng(seed).choice(held, max_items, replace=False))
    return train, held, name


# ---------------------------------------------------------------------------- training

@torch.no_grad()
def _embed_pairs(model: BiEncoder, text_ids, text_mask, pixels, batch: int = 512):
    model.eval()
    dev = next(model.parameters()).device
    t, i = [], []
    for s in range(0, len(pixels), batch):
        ids, m = text_ids[s:s + batch], text_mask[s:s + batch]
        L = int(m.sum(1).max())
        t.append(model.encode_text(ids[:, :L].to(dev), m[:, :L].to(dev)).cpu())
        i.append(model.encode_image(pixels[s:s + batch].to(dev)).cpu())
    model.train()
    return torch.cat(t), torch.cat(i)


def train_retriever(data: str | Path, out: str | Path, steps: int | None = None, batch_size: int | None = None,
                    size: int | None = None, seed: int = 0, dim: int | None = None, lr: float | None = None,
                    config: RetrieverTrainConfig | None = None, device: str | None = None) -> dict:
    """Train a bi-encoder on a dataset's train split; write config.json, model.safetensors,
    metrics.json (recall@1/5 both directions on test, else val) and train_log.jsonl to `out`.
    Returns the metrics."""
    tc = config or RetrieverTrainConfig()
    tc = RetrieverTrainConfig(**{**asdict(tc), **{k: v for k, v in
                                 dict(steps=steps, batch_size=batch_size, lr=lr).items() if v is not None}})
    mc = BiEncoderConfig(**{k: v for k, v in dict(image_size=size, embed_dim=dim).items() if v is not None})
    if tc.steps < 1 or tc.batch_size < 2:
        raise CM3LeonError(f"--steps must be >= 1 and --batch-size >= 2 (got {tc.steps}, {tc.batch_size})")
    if not 8 <= mc.image_size <= 512:
        raise CM3LeonError(f"--size {mc.image_size}: expected 8..512 pixels")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)

    texts, pixels, splits = load_pairs(data, mc.image_size)
    train_idx, held_idx, held_name = eval_indices(splits, tc.eval_max, seed)
    text_ids, text_mask = encode_bytes(texts, mc.text_max_bytes)
    groups = caption_ids(texts)

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = BiEncoder(mc).to(device)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "pos" not in n and "tok" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "pos" not in n and "tok" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr, betas=(0.9, 0.98), eps=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, tc.warmup_steps)) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / max(1, tc.steps)))))

    bs = min(tc.batch_size, len(train_idx))
    order, cursor = rng.permutation(train_idx), 0
    log = MetricsLogger(out / "train_log.jsonl")
    losses, t0, first_loss = [], time.time(), None
    model.train()
    bar = progress(total=tc.steps, desc="retriever", unit="step")
    for step in range(tc.steps):
        if cursor + bs > len(order):
            order, cursor = rng.permutation(train_idx), 0
        b = torch.from_numpy(order[cursor:cursor + bs])
        cursor += bs
        ids, m = text_ids[b], text_mask[b]
        L = int(m.sum(1).max())
        t = model.encode_text(ids[:, :L].to(device), m[:, :L].to(device))
        i = model.encode_image(pixels[b].to(device))
        loss = contrastive_loss(t, i, model.scale(), groups[b].to(device) if tc.same_caption_positive else None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        first_loss = losses[0] if first_loss is None else first_loss
        if (step + 1) % tc.log_every == 0 or step + 1 == tc.steps:
            avg = float(np.mean(losses[-tc.log_every:]))
            log.log(step=step + 1, loss=avg, lr=sched.get_last_lr()[0], temperature=float(1 / model.scale().detach()),
                    pairs_per_s=(step + 1) * bs / (time.time() - t0))
            bar.set_postfix(loss=f"{avg:.3f}")
        bar.update(1)
    bar.close()
    log.close()
    train_time = time.time() - t0

    te, ie = _embed_pairs(model, text_ids[held_idx], text_mask[held_idx], pixels[held_idx])
    metrics = retrieval_metrics(te, ie, [texts[j] for j in held_idx])
    n_last = max(1, min(tc.log_every, len(losses)))
    metrics.update({
        "eval_split": held_name, "train_pairs": len(train_idx), "steps": tc.steps, "batch_size": bs,
        "first_loss": round(first_loss, 4), "final_loss": round(float(np.mean(losses[-n_last:])), 4),
        "temperature": round(float(1 / model.scale().detach()), 4), "train_seconds": round(train_time, 1),
        "train_config": asdict(tc), "seed": seed,
    })
    save_bi_encoder(model, out, extra={"trained_on": str(data)})
    write_json(out / "metrics.json", metrics)
    return metrics


def evaluate_retriever(retriever, data: str | Path, split: str | None = None, max_items: int = 1000, seed: int = 0) -> dict:
    """Recall@1/5 of any retriever (bi-encoder or CLIP) on a dataset's test split (else val)."""
    from cm3leon.data.readers import open_dataset

    texts, images, splits = [], [], []
    for rec in open_dataset(str(data), size=retriever.image_size, split=split):
        texts.append(rec.text)
        images.append(rec.image)
        splits.append(rec.split or "train")
    if not texts:
        raise CM3LeonError(f"{data}: no records{f' in split {split!r}' if split else ''}")
    splits = np.asarray(splits)
    if split is None:
        _, idx, split = eval_indices(splits, max_items, seed)
    else:
        idx = np.arange(len(texts))[:max_items]
    sel_t = [texts[j] for j in idx]
    out = retrieval_metrics(retriever.embed_text(sel_t), retriever.embed_image([images[j] for j in idx]), sel_t)
    out["eval_split"] = split
    return out
