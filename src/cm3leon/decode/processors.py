"""Logits processors: temperature / top-k / top-p sampling and modality constraints.

Everything here is a tensor op on the device: no `.item()`, no host round trip, so the
decode loop never waits on the accelerator (gpt-fast style). A constraint's mask for step
`t` depends only on `t` (a Python int the loop already knows), never on sampled values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from cm3leon.errors import CM3LeonError
from cm3leon.tokenizers.vocab import Vocab


@dataclass(frozen=True)
class SamplerSettings:
    """How one token is drawn from the (guided) scores."""

    temperature: float = 1.0  # 0 = greedy (argmax); > 0 divides the scores
    top_k: int | None = None  # keep the k best scores; None = all
    top_p: float | None = None  # nucleus: smallest set with probability mass >= top_p; None = all

    def __post_init__(self):
        validate_sampling(self.temperature, self.top_k, self.top_p)

    def to_dict(self) -> dict:
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p}


# Below MIN_TEMPERATURE the scores / temperature overflow float32 (use 0 for greedy); above
# MAX_TEMPERATURE sampling is uniform noise.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 100.0


def validate_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise `CM3LeonError` naming the argument when a sampler setting is out of range."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature < 0 or 0 < temperature < MIN_TEMPERATURE or temperature > MAX_TEMPERATURE:
        raise CM3LeonError(f"temperature must be 0 (greedy) or a number in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], "
                           f"got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise CM3LeonError(f"top_k must be an integer >= 1 or None, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0):
        raise CM3LeonError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def top_k_filter(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Set every score below the k-th largest (per row) to -inf. scores: (B, V)."""
    k = min(k, scores.size(-1))
    kth = torch.topk(scores, k, dim=-1).values[..., -1:]  # (B, 1)
    return scores.masked_fill(scores < kth, -math.inf)


def top_p_filter(scores: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of best tokens whose probability reaches p.

    The best token is always kept, so a row never becomes all -inf."""
    if p >= 1.0:
        return scores
    sorted_scores, order = torch.sort(scores, dim=-1, descending=True)  # (B, V)
    probs = torch.softmax(sorted_scores, dim=-1)
    # Drop a token when the mass *before* it already reaches p.
    drop_sorted = (probs.cumsum(dim=-1) - probs) >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return scores.masked_fill(drop, -math.inf)


def sample(scores: torch.Tensor, settings: SamplerSettings,
           generator: torch.Generator | Sequence[torch.Generator] | None = None) -> torch.Tensor:
    """Draw one id per row from scores (B, V) -> (B,) long, without a device sync.

    Sampling uses the exponential-race trick (argmax of p / Exp(1) is a draw from p), which
    needs no `torch.multinomial` host sync and is reproducible with `generator`: one for the
    batch, or one per row (each row's draw then depends on its own generator only, whatever
    else is in the batch: a served request's seed)."""
    scores = scores.float()
    if settings.temperature == 0:
        return scores.argmax(dim=-1)
    scores = scores / settings.temperature
    if settings.top_k is not None:
        scores = top_k_filter(scores, settings.top_k)
    if settings.top_p is not None:
        scores = top_p_filter(scores, settings.top_p)
    probs = torch.softmax(scores, dim=-1)
    noise = torch.empty_like(probs)
    if isinstance(generator, Sequence):
        if len(generator) != len(noise):
            raise CM3LeonError(f"sample: {len(generator)} generators for {len(noise)} rows")
        for row, gen in zip(noise, generator):
            row.exponential_(1.0, generator=gen)
    else:
        noise.exponential_(1.0, generator=generator)
    return (probs / noise).argmax(dim=-1)


# --- modality constraints ------------------------------------------------------------------

def _additive_mask(allowed: torch.Tensor) -> torch.Tensor:
    return torch.where(allowed, 0.0, -math.inf)


class Constraint:
    """Which ids may be emitted at each generation step, and which ids end a row.

    `mask(step, device)` returns an additive mask (V,) or (B, V) of 0 / -inf over the
    model's (possibly padded) vocabulary; `length` is a fixed number of steps, or None when
    rows end at a stop id or the length limit."""

    stop_ids: tuple[int, ...] = ()
    length: int | None = None

    def __init__(self, vocab: Vocab, model_vocab_size: int):
        if model_vocab_size < vocab.size:
            raise CM3LeonError(
                f"model vocab_size {model_vocab_size} is smaller than the vocabulary ({vocab.size} ids)"
            )
        self.vocab = vocab
        self.model_vocab_size = model_vocab_size
        self._cache: dict = {}
        self._spans: dict[int, tuple[int, int]] = {}  # id of a cached mask -> span of its allowed ids

    def _range_mask(self, key: str, ranges: Sequence[tuple[int, int]], device) -> torch.Tensor:
        """Additive mask allowing the half-open id ranges; rows >= vocab.size never allowed."""
        ck = (key, str(device))
        if ck not in self._cache:
            allowed = torch.zeros(self.model_vocab_size, dtype=torch.bool, device=device)
            for lo, hi in ranges:
                allowed[lo:hi] = True
            allowed[self.vocab.size:] = False  # padded vocabulary rows
            self._cache[ck] = mask = _additive_mask(allowed)
            ids = allowed.nonzero()
            if len(ids):  # built once per key and device: the one host sync is here
                self._spans[id(mask)] = (int(ids[0]), int(ids[-1]) + 1)
        return self._cache[ck]

    def mask(self, step: int, device) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def span(self, mask: torch.Tensor) -> tuple[int, int] | None:
        """(lo, hi) with every id that `mask` (a mask this constraint returned) allows in
        [lo, hi), or None when unknown (then the whole head is needed). Ids outside the span
        are -inf in the mask, so their logits never matter: decoding computes only the output
        head's rows lo..hi-1 (`CM3LeonTransformer.forward(head_rows=...)`)."""
        return self._spans.get(id(mask))


class TextConstraint(Constraint):
    """Text only: BPE ids plus the stop ids; never image codes, sentinels, <pad> or padded rows."""

    def __init__(self, vocab: Vocab, model_vocab_size: int, stop_ids: Sequence[int] | None = None):
        super().__init__(vocab, model_vocab_size)
        self.stop_ids = tuple(stop_ids) if stop_ids is not None else (vocab.eos_id, vocab.eoss_id)

    def mask(self, step: int, device) -> torch.Tensor:
        ranges = [(self.vocab.text_offset, self.vocab.image_offset)] + [(i, i + 1) for i in self.stop_ids]
        return self._range_mask("text", ranges, device)


class ImageConstraint(Constraint):
    """Exactly `tokens_per_image` image codes, then `<break>` (the modality change, paper Sec. 2)."""

    def __init__(self, vocab: Vocab, model_vocab_size: int, tokens_per_image: int, end_with_break: bool = True):
        super().__init__(vocab, model_vocab_size)
        if tokens_per_image < 1:
            raise CM3LeonError(f"tokens_per_image must be >= 1, got {tokens_per_image}")
        self.tokens_per_image = tokens_per_image
        self.end_with_break = end_with_break
        self.length = tokens_per_image + int(end_with_break)

    def mask(self, step: int, device) -> torch.Tensor:
        if step < self.tokens_per_image:
            return self._range_mask("image", [(self.vocab.image_offset, self.vocab.size)], device)
        b = self.vocab.break_id
        return self._range_mask("break", [(b, b + 1)], device)


class ImageInfillConstraint(ImageConstraint):
    """Regenerate part of an image: outside the region each step may only emit the original
    code (teacher forcing), inside it any image code; then `<break>` if `end_with_break`."""

    def __init__(self, vocab: Vocab, model_vocab_size: int, codes: Sequence[int], free: Sequence[bool],
                 end_with_break: bool = False):
        codes = [int(c) for c in codes]
        free = [bool(f) for f in free]
        if len(codes) != len(free):
            raise CM3LeonError(f"infill: {len(codes)} codes but a region mask of {len(free)} cells")
        super().__init__(vocab, model_vocab_size, len(codes), end_with_break=end_with_break)
        self.codes = codes
        self.free = free

    def mask(self, step: int, device) -> torch.Tensor:
        if step < self.tokens_per_image and not self.free[step]:
            i = self.vocab.image_offset + self.codes[step]
            return self._range_mask(f"code{i}", [(i, i + 1)], device)
        return super().mask(step, device)


class AnyConstraint(Constraint):
    """Any real id except `<pad>` (free continuation); stops at `<eos>`."""

    def __init__(self, vocab: Vocab, model_vocab_size: int, stop_ids: Sequence[int] | None = None):
        super().__init__(vocab, model_vocab_size)
        self.stop_ids = tuple(stop_ids) if stop_ids is not None else (vocab.eos_id,)

    def mask(self, step: int, device) -> torch.Tensor:
        return self._range_mask("any", [(1, self.vocab.size)], device)
