"""Best-of-N re-ranking (paper Sec. 3): draw N images, half with TopP + CFG and half with
CD-K, and keep them all, ordered by a score.

The paper scores with CLIP. With a retriever in the model directory its `clip_score` is used;
without one, the model scores itself: the mean log-likelihood of the prompt text as the
caption of each image, `log p(caption <eoss> | <eos> <mask:0> <break> image <eos> <mask:0>)`
(the captioning layout of `tasks.py`), i.e. how well the image explains the prompt.
"""

from __future__ import annotations

from typing import Sequence

import torch

from cm3leon.decode.generate import attention_mask, left_pad, position_ids
from cm3leon.errors import CM3LeonError


def split_methods(n: int) -> tuple[int, int]:
    """N -> (number of TopP+CFG samples, number of CD-K samples): half each, CFG gets the odd one."""
    if n < 1:
        raise CM3LeonError(f"num_candidates must be >= 1, got {n}")
    return (n + 1) // 2, n // 2


@torch.no_grad()
def sequence_logprob(
    model, prefixes: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]], pad_id: int = 0,
    batch_size: int = 16, reduction: str = "mean",
) -> torch.Tensor:
    """Mean (`reduction` "mean") or total ("sum") log p(continuation | prefix) per pair, (N,)
    float32 on CPU (one uncached forward per batch; rows are left-padded like generation)."""
    if reduction not in ("mean", "sum"):
        raise CM3LeonError(f"sequence_logprob: reduction must be 'mean' or 'sum', got {reduction!r}")
    if len(prefixes) != len(continuations):
        raise CM3LeonError(f"{len(prefixes)} prefixes but {len(continuations)} continuations")
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(prefixes), batch_size):
        pre, cont = prefixes[i:i + batch_size], continuations[i:i + batch_size]
        if any(len(c) == 0 for c in cont) or any(len(p) == 0 for p in pre):
            raise CM3LeonError("sequence_logprob: empty prefix or continuation")
        seqs = [list(p) + list(c) for p, c in zip(pre, cont)]
        tokens, pad = left_pad(seqs, pad_id, device)  # (b, T)
        T = tokens.size(1)
        q = torch.arange(T, device=device)
        logits, _ = model(tokens, position_ids=position_ids(tokens, pad, model.config),
                          attn_mask=attention_mask(pad, T, T))
        logp = torch.log_softmax(logits.float(), dim=-1)[:, :-1]  # predicts tokens[:, 1:]
        tok_logp = logp.gather(-1, tokens[:, 1:, None])[..., 0]  # (b, T-1)
        lens = torch.tensor([len(c) for c in cont], device=device)
        is_cont = q[None, 1:] >= (T - lens)[:, None]  # the last len(c) positions
        total = (tok_logp * is_cont).sum(-1)
        out.append((total / lens if reduction == "mean" else total).cpu())
    return torch.cat(out)


def rank(samples: list, scores: Sequence[float], scorer: str) -> list:
    """Set `.score` / `.scorer` on every sample and return them all, best first."""
    if len(scores) != len(samples):
        raise CM3LeonError(f"{len(scores)} scores for {len(samples)} samples")
    for c, s in zip(samples, scores):
        c.score, c.scorer = float(s), scorer
    return sorted(samples, key=lambda c: c.score, reverse=True)
