"""Autoregressive generation over the model's static KV cache (gpt-fast style): `prefill`
runs the prompts once, `decode_one_token` feeds one token per row, `generate` loops.

Prompts of different lengths run as one LEFT-PADDED batch: each row's positions start at 0
at its first real token (`position_ids`, in the model's scheme: `cm3leon.model.positions`)
and its padding is masked out of attention (`attn_mask`). Guidance streams (CFG / CD-K /
editing) are extra rows of the same batch: for B prompts and S streams the model sees S*B
rows, `Guidance.combine` folds their logits into B rows of scores, and the sampled token is
appended to every stream of its sample.

The loop never calls `.item()`: finished rows are tracked with tensor ops and the host looks
at them once every `check_every` steps (image generation has a fixed length and never looks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from cm3leon.decode.guidance import Guidance
from cm3leon.decode.processors import Constraint, SamplerSettings, sample
from cm3leon.errors import CM3LeonError


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # generated ids per prompt, the stop id excluded
    stop_ids: list[int | None]  # the stop id that ended each row, None = length limit
    num_steps: int  # decode steps actually run
    settings: dict = field(default_factory=dict)  # sampler + guidance settings, for logs


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> (tokens (B, T) left-padded with `pad_id`, pad lengths (B,))."""
    T = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, T - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
    pad = torch.tensor([T - len(p) for p in prompts], dtype=torch.long)
    return tokens.to(device), pad.to(device)


def attention_mask(pad: torch.Tensor, num_queries: int, num_keys: int) -> torch.Tensor:
    """(B, 1, Tq, S) bool, True where key slot s is not padding; the model adds causality
    (and lets every token see itself, so padding rows stay finite)."""
    key_ok = torch.arange(num_keys, device=pad.device)[None, :] >= pad[:, None]  # (B, S)
    return key_ok[:, None, None, :].expand(-1, 1, num_queries, num_keys)


def position_ids(tokens: torch.Tensor, pad: torch.Tensor, config=None) -> torch.Tensor:
    """(B, T) position ids of left-padded rows, counted from each row's first real token in
    the model config's scheme (plain or segment positions); padding gets 0."""
    from cm3leon.model.positions import document_positions

    out = torch.zeros_like(tokens)
    for i, p in enumerate(pad.tolist()):
        out[i, p:] = document_positions(tokens[i, p:].cpu(), config).to(tokens.device)
    return out


@torch.no_grad()
def prefill(model, tokens: torch.Tensor, pad: torch.Tensor, cache_len: int, positions: torch.Tensor,
            head_rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Run the padded prompts (B, T) at their position ids (B, T) into the KV cache; return
    the last logits (B, V), or (B, hi - lo) for `head_rows` (lo, hi). The output head runs on
    the last position only."""
    T = tokens.size(1)
    part = {"head_rows": head_rows, "last_only": True} if getattr(model, "partial_head", False) else {}
    logits, _ = model(
        tokens,
        input_pos=torch.arange(T, device=tokens.device),
        position_ids=positions,
        attn_mask=attention_mask(pad, T, cache_len),
        **part,
    )
    return logits[:, -1]


@torch.no_grad()
def decode_one_token(
    model, token: torch.Tensor, input_pos: torch.Tensor, positions: torch.Tensor, attn_mask: torch.Tensor,
    head_rows: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Feed one token per row (B, 1) at cache slot `input_pos` (1,) and position ids
    `positions` (B, 1); return logits (B, V), or (B, hi - lo) for `head_rows` (lo, hi)."""
    part = {"head_rows": head_rows} if head_rows is not None else {}
    logits, _ = model(token, input_pos=input_pos, position_ids=positions, attn_mask=attn_mask, **part)
    return logits[:, -1]


_COMPILED: dict = {}


def compiled_decode_one_token():
    """`decode_one_token` under `torch.compile` (built once per process, fullgraph, static
    shapes): one graph per (rows, cache length, head rows), reused across steps and calls.
    `generate(compile=True)` rounds the cache length up to a multiple of `CACHE_BUCKET` so
    that prompts of nearby lengths share a graph."""
    if "decode" not in _COMPILED:
        _COMPILED["decode"] = torch.compile(decode_one_token, fullgraph=True, dynamic=False)
    return _COMPILED["decode"]


CACHE_BUCKET = 128  # compiled decoding: cache lengths rounded up to a multiple of this


def full_logits(logits: torch.Tensor, head_rows: tuple[int, int] | None, vocab_size: int) -> torch.Tensor:
    """Logits of the head rows [lo, hi) (N, hi - lo) placed in a (N, vocab_size) tensor of zeros.
    Outside [lo, hi) the constraint's mask is -inf, so every score computed from the result
    (guidance, the mask, the sampler's draws over the whole vocabulary) is the one the whole
    head gives, bit for bit: the filler only has to be finite."""
    if head_rows is None:
        return logits
    lo, hi = head_rows
    out = logits.new_zeros(logits.size(0), vocab_size)
    out[:, lo:hi] = logits
    return out


def _uncached_logits(model, buf: torch.Tensor, pad: torch.Tensor, cur: int, positions: torch.Tensor) -> torch.Tensor:
    """Full forward over the first `cur` tokens (no cache): the reference path."""
    logits, _ = model(buf[:, :cur], position_ids=positions[:, :cur], attn_mask=attention_mask(pad, cur, cur))
    return logits[:, -1]


def _check_prompts(prompts, name: str, vocab_size: int) -> None:
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise CM3LeonError(f"{name}: need a non-empty list of prompts (lists of token ids)")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise CM3LeonError(f"{name}[{i}] is empty: a prompt needs at least one token")
        bad = [t for t in p if not 0 <= int(t) < vocab_size]
        if bad:
            raise CM3LeonError(f"{name}[{i}]: token id {bad[0]} out of range [0, {vocab_size})")


@torch.no_grad()
def generate(
    model,
    prompts: Sequence[Sequence[int]],
    constraint: Constraint,
    max_new_tokens: int | None = None,
    sampler: SamplerSettings = SamplerSettings(),
    guidance: Guidance | None = None,
    guidance_prompts: Sequence[Sequence[Sequence[int]]] | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    check_every: int = 8,
    pad_id: int = 0,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
    restrict_head: bool = True,
    compile: bool = False,
) -> GenerationResult:
    """Sample a continuation of every prompt.

    prompts: B lists of unified token ids (the conditional stream).
    constraint: which ids each step may emit, which ids stop a row (`processors.py`).
    max_new_tokens: step limit; a fixed-length constraint (an image) sets it to its length.
    guidance / guidance_prompts: the other streams, `guidance.num_streams - 1` lists of B
        prompts in the order `Guidance` documents (e.g. [uncond] for CFG and CD-K).
    seed: seeds the sampling generator (None: nondeterministic).
    use_cache: False recomputes the whole sequence every step (reference / benchmark).
    on_step: called after every step as on_step(n, out) with out (B, steps) the sampled ids
        so far (its first n columns; on the device, not to be modified). It draws no random
        numbers, so the samples are the same with and without it; it may raise to stop the
        generation (the KV cache is freed). For streaming partial outputs (`cm3leon serve`).
    restrict_head: compute only the output head's rows that the step's constraint allows
        (`Constraint.span`: the image codes on an image step); the other ids are masked to
        -inf anyway, so the tokens are the same as with the whole head (False: whole head).
        Only for models with `partial_head = True` (forward takes head_rows / last_only).
    compile: run the decode step under `torch.compile` (`compiled_decode_one_token`; the
        first call of a shape compiles, tens of seconds on a CPU); needs `use_cache`.
    """
    cfg = model.config
    V = cfg.vocab_size
    _check_prompts(prompts, "prompts", V)
    streams = [list(prompts)]
    if guidance is not None:
        if guidance_prompts is None or len(guidance_prompts) != guidance.num_streams - 1:
            raise CM3LeonError(
                f"guidance {guidance.method!r} needs {guidance.num_streams - 1} extra prompt stream(s), "
                f"got {0 if guidance_prompts is None else len(guidance_prompts)}"
            )
        for j, s in enumerate(guidance_prompts):
            _check_prompts(s, f"guidance_prompts[{j}]", V)
            if len(s) != len(prompts):
                raise CM3LeonError(f"guidance_prompts[{j}] has {len(s)} prompts, expected {len(prompts)}")
            streams.append(list(s))
    elif guidance_prompts:
        raise CM3LeonError("guidance_prompts given without guidance")
    steps = max_new_tokens if max_new_tokens is not None else constraint.length
    if steps is None or steps < 1:
        raise CM3LeonError(f"max_new_tokens must be >= 1, got {steps!r}")
    if constraint.length is not None and steps < constraint.length:
        raise CM3LeonError(f"max_new_tokens={steps} is shorter than the fixed output length {constraint.length}")
    if constraint.length is not None:
        steps = constraint.length  # a fixed-length output (an image) never runs past its end
    if check_every < 1:
        raise CM3LeonError(f"check_every must be >= 1, got {check_every}")
    if compile and not use_cache:
        raise CM3LeonError("compile=True needs use_cache=True (it compiles the cached decode step)")
    if constraint.model_vocab_size != V:
        raise CM3LeonError(f"constraint built for {constraint.model_vocab_size} ids, model has vocab_size={V}")
    device = next(model.parameters()).device
    B, S = len(prompts), len(streams)
    tokens, pad = left_pad([p for s in streams for p in s], pad_id, device)  # (S*B, T)
    T = tokens.size(1)
    total = T + steps
    if total > cfg.max_seq_len:
        raise CM3LeonError(
            f"prompt ({T} tokens) + max_new_tokens ({steps}) = {total} exceeds the model's context "
            f"max_seq_len={cfg.max_seq_len}; shorten the prompt or generate fewer tokens"
        )
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(int(seed))
    stop = torch.tensor(constraint.stop_ids, dtype=torch.long, device=device)
    watch_stops = len(constraint.stop_ids) > 0 and constraint.length is None

    def scores_of(logits: torch.Tensor, step: int) -> torch.Tensor:
        mask = constraint.mask(step, device)
        if guidance is None:
            return logits.float() + mask
        return guidance.combine(logits.view(S, B, -1), mask)

    from cm3leon.model.positions import next_positions

    positions = position_ids(tokens, pad, cfg)  # (S*B, T)
    last_pos, last_tok = positions[:, -1], tokens[:, -1]  # the next token's position follows these
    if int(positions.max()) >= cfg.max_seq_len:
        raise CM3LeonError(f"the prompts' position ids reach {int(positions.max())}, past the model's position "
                           f"table (max_seq_len={cfg.max_seq_len}); shorten the prompt")
    cache_len = total
    if compile:  # a few cache lengths, so prompts of nearby lengths reuse one compiled graph
        cache_len = min(cfg.max_seq_len, -(-total // CACHE_BUCKET) * CACHE_BUCKET)
    step_fn = compiled_decode_one_token() if compile else decode_one_token

    restrict_head = restrict_head and getattr(model, "partial_head", False)

    def rows_of(step: int) -> tuple[int, int] | None:
        if not restrict_head or step >= steps:
            return None
        span = constraint.span(constraint.mask(step, device))
        return None if span is None or span == (0, V) else span

    if use_cache:
        model.setup_caches(max_batch_size=S * B, max_seq_len=cache_len, device=device)
    try:
        if use_cache:
            head = rows_of(0)
            logits = full_logits(prefill(model, tokens, pad, cache_len, positions, head), head, V)
            input_pos = torch.tensor([T], dtype=torch.long, device=device)
            step_mask = attention_mask(pad, 1, cache_len)  # fixed for every decode step
        else:
            buf = torch.cat([tokens, torch.full((S * B, steps), pad_id, dtype=torch.long, device=device)], dim=1)
            pbuf = torch.cat([positions, torch.zeros((S * B, steps), dtype=torch.long, device=device)], dim=1)
            logits = _uncached_logits(model, buf, pad, T, pbuf)

        out = torch.full((B, steps), pad_id, dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        n = 0
        for step in range(steps):
            nxt = sample(scores_of(logits, step), sampler, gen)  # (B,)
            nxt = torch.where(done, pad_id, nxt)
            out[:, step] = nxt
            n = step + 1
            if on_step is not None:
                on_step(n, out)
            if watch_stops:
                done |= torch.isin(nxt, stop)
                if n % check_every == 0 and bool(done.all()):  # one host sync every few steps
                    break
            if n == steps:
                break
            row_tokens = nxt.repeat(S)  # the same token continues every stream of a sample
            last_pos = next_positions(last_pos, last_tok, cfg).clamp(max=cfg.max_seq_len - 1)
            last_tok = row_tokens
            if use_cache:
                head = rows_of(step + 1)
                # eager: attend over the T + step + 1 slots written so far, not the empty rest;
                # compiled: the whole cache (one static shape for every step)
                amask = step_mask if compile else step_mask[..., : T + step + 1]
                logits = full_logits(step_fn(model, row_tokens[:, None], input_pos, last_pos[:, None], amask,
                                             head), head, V)
                input_pos += 1
            else:
                buf[:, T + step] = row_tokens
                pbuf[:, T + step] = last_pos
                logits = _uncached_logits(model, buf, pad, T + step + 1, pbuf)
    finally:
        if use_cache:
            model.reset_caches()  # free the cache; the model is back to plain forward

    return _collect(out[:, :n], constraint.stop_ids, n, sampler, guidance)


def _collect(out: torch.Tensor, stop_ids, n: int, sampler, guidance) -> GenerationResult:
    rows = out.tolist()  # the one transfer to the host
    tokens, stops = [], []
    stop_set = set(stop_ids)
    for row in rows:
        cut = next((i for i, t in enumerate(row) if t in stop_set), None)
        tokens.append(row if cut is None else row[:cut])
        stops.append(None if cut is None else row[cut])
    settings = dict(sampler.to_dict())
    settings["guidance"] = guidance.to_dict() if guidance is not None else None
    return GenerationResult(tokens=tokens, stop_ids=stops, num_steps=n, settings=settings)
