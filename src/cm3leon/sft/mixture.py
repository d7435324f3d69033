"""The instruction-tuning mixture: task sampling rates, the SFT objective, and the packed stream.

Objective (paper Sec. 4): the CM3 objective on the concatenated instruction, input and output
(`cm3leon.objectives.cm3`). Per example, with probability `response_mask_prob`, the response
is put in its inference form instead of random CM3 spans:
- a response inside the document (captioning, VQA) is masked as ONE CM3 span: `<mask:0>` in
  place and `<mask:0> response <eoss>` after the closing `<eos>`, the infilling prompt used at
  inference (`cm3leon.layout.templates.prompt`);
- a response already last (text->image, editing, ...) stays in place: plain left-to-right is
  already its inference form.
Otherwise the paper's random CM3 spans (`cm3_transform`). `loss_on="all"` takes the loss on
every position as CM3 does (except predicting an in-place `<mask:i>`); `loss_on="response"`
only where the predicted token is a response token (wherever a span moved it) or the `<eoss>`
closing a span that ends inside the response.

Mixture: each task t has a natural share n_t (its share of the examples) and a target share
w_t (`weights`, default equal per task). The paper up-samples small tasks and down-samples
large ones within limits (ratios 3 and 0.3). Interpretation used here: the sampling
probability is p_t = n_t * clamp(c * w_t / n_t, min_ratio, max_ratio), with the one constant
c that makes the p_t sum to 1 (found by bisection; it exists because min_ratio <= 1 <= max_ratio).
So p_t / n_t is always within [0.3, 3], and p_t = w_t exactly when no clamp binds.
A task with weight 0 is left out.

Sampling is stratified: a mixture epoch of `epoch_size` draws (default: the number of training
examples) holds round(p_t * epoch_size) examples of task t (largest remainders), cycling through
each task's examples in a fresh permutation per epoch, so an up-sampled task repeats only after
all its examples were seen and a down-sampled one changes subset every epoch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import numpy as np

from cm3leon.objectives.sequences import PackedStream
from cm3leon.errors import CM3LeonError
from cm3leon.utils.dataclass_io import from_dict_strict
from cm3leon.objectives.cm3 import IGNORE_INDEX, CM3Config, CM3Example, cm3_transform
from cm3leon.layout.templates import TemplateDoc
from cm3leon.tokenizers.vocab import Vocab

LOSS_ON = ("all", "response")

# Kinds of tokens in a CM3-transformed document (`assemble`).
_COPY, _PLACEHOLDER, _SENTINEL, _EOSS = 0, 1, 2, 3


@dataclass
class MixtureConfig:
    """How SFT examples are sampled and turned into training sequences."""

    weights: dict[str, float] | None = None  # target share per task (normalised); None: equal per task
    min_ratio: float = 0.3  # a task is sampled at >= 0.3x its natural share (paper: down-sampling limit)
    max_ratio: float = 3.0  # ... and <= 3x (paper: up-sampling limit)
    response_mask_prob: float = 0.5  # P(response in its inference form) vs. random CM3 spans (paper)
    loss_on: str = "all"  # "all" (paper: CM3 on the whole sequence) or "response"
    epoch_size: int | None = None  # draws per mixture epoch; None: number of training examples
    cm3: CM3Config = field(default_factory=CM3Config)  # random spans (Poisson(1), never across <break>)

    def __post_init__(self) -> None:
        if isinstance(self.cm3, Mapping):
            self.cm3 = CM3Config.from_dict(dict(self.cm3))
        if self.cm3.loss_on != "all":
            raise CM3LeonError("MixtureConfig: set the SFT loss with loss_on ('all' | 'response'), "
                               "not cm3.loss_on")
        if self.loss_on not in LOSS_ON:
            raise CM3LeonError(f"MixtureConfig.loss_on must be one of {LOSS_ON}, got {self.loss_on!r}")
        if not 0.0 <= self.response_mask_prob <= 1.0:
            raise CM3LeonError(f"MixtureConfig.response_mask_prob must be in [0, 1], got {self.response_mask_prob!r}")
        if not 0 < self.min_ratio <= 1.0 <= self.max_ratio:
            raise CM3LeonError(f"MixtureConfig needs 0 < min_ratio <= 1 <= max_ratio, got "
                               f"{self.min_ratio}, {self.max_ratio}")
        if self.weights is not None:
            bad = {k: v for k, v in self.weights.items() if not (isinstance(v, (int, float)) and v >= 0)}
            if bad:
                raise CM3LeonError(f"MixtureConfig.weights must be numbers >= 0, got {bad}")
        if self.epoch_size is not None and self.epoch_size < 1:
            raise CM3LeonError(f"MixtureConfig.epoch_size must be >= 1, got {self.epoch_size}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MixtureConfig":
        return from_dict_strict(cls, d, "mixture config")


def mixture_probabilities(sizes: Mapping[str, int], weights: Mapping[str, float] | None = None,
                          min_ratio: float = 0.3, max_ratio: float = 3.0) -> dict[str, float]:
    """Sampling probability per task (see the module docstring); tasks with no examples or
    weight 0 get none."""
    if weights is not None:
        unknown = sorted(t for t in set(weights) - set(sizes) if weights[t] != 0)
        if unknown:
            raise CM3LeonError(f"mixture weights name task(s) {unknown} with no data; tasks: {sorted(sizes)}")
    tasks = [t for t, n in sizes.items() if n > 0 and (weights is None or weights.get(t, 1.0) > 0)]
    if not tasks:
        raise CM3LeonError(f"no SFT task has examples (and a weight > 0): sizes {dict(sizes)}")
    n = np.array([sizes[t] for t in tasks], dtype=np.float64)
    n /= n.sum()
    w = np.array([1.0 if weights is None else float(weights.get(t, 1.0)) for t in tasks])
    w /= w.sum()

    def total(c: float) -> float:
        return float((n * np.clip(c * w / n, min_ratio, max_ratio)).sum())

    lo, hi = 0.0, 1.0
    while total(hi) < 1.0:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(mid) < 1.0 else (lo, mid)
    p = n * np.clip(hi * w / n, min_ratio, max_ratio)
    p /= p.sum()  # removes the bisection's last rounding only
    return {t: float(x) for t, x in zip(tasks, p)}


def stratified_counts(probs: Mapping[str, float], total: int) -> dict[str, int]:
    """round(p_t * total) per task by largest remainders, summing to `total`."""
    tasks = list(probs)
    exact = np.array([probs[t] for t in tasks]) * total
    counts = np.floor(exact).astype(np.int64)
    for i in np.argsort(-(exact - counts), kind="stable")[: total - int(counts.sum())]:
        counts[i] += 1
    return {t: int(c) for t, c in zip(tasks, counts)}


# --- the objective ---------------------------------------------------------------------------

def assemble(tokens: np.ndarray, spans: list[tuple[int, int]], vocab: Vocab) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The CM3 layout of `tokens` with the given spans masked (`cm3leon.objectives.cm3`):
    returns (output ids, source position per output token, kind per output token). The source
    of an `<eoss>` is the last token of the span it closes; sentinels have source -1."""
    out, src, kind = [], [], []
    prev = 0
    for i, (s, e) in enumerate(spans):
        out += [tokens[prev:s], [vocab.mask_id(i)]]
        src += [np.arange(prev, s), [-1]]
        kind += [np.full(s - prev, _COPY), [_PLACEHOLDER]]
        prev = e
    out.append(tokens[prev:])
    src.append(np.arange(prev, len(tokens)))
    kind.append(np.full(len(tokens) - prev, _COPY))
    for i, (s, e) in enumerate(spans):
        out += [[vocab.mask_id(i)], tokens[s:e], [vocab.eoss_id]]
        src += [[-1], np.arange(s, e), [e - 1]]
        kind += [[_SENTINEL], np.full(e - s, _COPY), [_EOSS]]

    def cat(parts):
        return np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])

    return cat(out), cat(src), cat(kind)


def sft_example(doc: TemplateDoc, vocab: Vocab, rng: np.random.Generator,
                config: MixtureConfig | None = None) -> CM3Example:
    """One training sequence from a rendered template (see the module docstring)."""
    config = config or MixtureConfig()
    if rng.random() < config.response_mask_prob:
        spans = [] if doc.response_last else [doc.response]
        out, src, kind = assemble(doc.tokens, spans, vocab)
    else:
        ex = cm3_transform(doc.tokens, vocab, rng, config.cm3)
        if config.loss_on == "all":
            return ex  # the paper's objective, as pretraining
        spans = ex.spans
        out, src, kind = assemble(doc.tokens, spans, vocab)
        if not np.array_equal(out, ex.tokens):
            raise CM3LeonError("the SFT span layout disagrees with cm3_transform's; update sft.mixture.assemble")
    if config.loss_on == "all":
        trainable = kind != _PLACEHOLDER  # an in-place sentinel is unpredictable (paper Sec. 2)
    else:
        s, e = doc.response
        trainable = ((kind == _COPY) | (kind == _EOSS)) & (src >= s) & (src < e)
    predicted = np.zeros(len(out), dtype=bool)
    predicted[:-1] = trainable[1:]
    targets = np.full(len(out), IGNORE_INDEX, dtype=np.int64)
    targets[predicted] = out[1:][predicted[:-1]]
    return CM3Example(tokens=out, targets=targets, loss_mask=predicted.astype(np.uint8), spans=list(spans))


# --- the stream ------------------------------------------------------------------------------

class SFTStream(PackedStream):
    """Packed SFT blocks from a source with `task_indices(split) -> {task: example ids}` and
    `document(i) -> TemplateDoc` (`cm3leon.sft.data.SFTData`).

    mix=True: each epoch is `epoch_size` stratified draws at the mixture probabilities.
    mix=False: every example of the split once per epoch (validation). Every random choice of
    an item comes from a generator seeded by (seed, epoch, item), so blocks are the same under
    any sharding and a resumed run re-makes them exactly."""

    def __init__(self, source, split: str, seq_len: int, vocab: Vocab, config: MixtureConfig | None = None,
                 tasks: list[str] | None = None, mix: bool = True, seed: int = 0, shuffle: bool = True,
                 epochs: int | None = None):
        super().__init__(seq_len, vocab.pad_id, seed, shuffle, epochs)
        self.source, self.vocab = source, vocab
        self.config = config or MixtureConfig()
        by_task = source.task_indices(split)
        if tasks is not None:
            by_task = {t: by_task.get(t, np.zeros(0, np.int64)) for t in tasks}
        self.by_task = {t: np.asarray(ix, dtype=np.int64) for t, ix in by_task.items() if len(ix)}
        if not self.by_task:
            raise CM3LeonError(f"no SFT examples in the {split!r} split for tasks {tasks or 'any'}")
        self.mix = mix
        self.sizes = {t: len(ix) for t, ix in self.by_task.items()}
        if mix:
            self.probabilities = mixture_probabilities(self.sizes, self.config.weights,
                                                       self.config.min_ratio, self.config.max_ratio)
            self._size = int(self.config.epoch_size or sum(self.sizes.values()))
        else:
            total = sum(self.sizes.values())
            self.probabilities = {t: n / total for t, n in self.sizes.items()}
            self._all = np.concatenate(list(self.by_task.values()))
            self._size = len(self._all)
        self._table: tuple[int, np.ndarray] | None = None

    @property
    def num_items(self) -> int:
        return self._size

    def epoch_examples(self, epoch: int) -> np.ndarray:
        """Example id of every item of a mixture epoch (items are then visited in a permutation)."""
        if not self.mix:
            return self._all
        if self._table is None or self._table[0] != epoch:
            counts = stratified_counts(self.probabilities, self._size)
            parts = []
            for k, (t, c) in enumerate(counts.items()):
                ix = self.by_task[t]
                rng = np.random.default_rng([self.seed, epoch, k, 7919])
                reps = -(-c // len(ix))
                parts.append(np.concatenate([ix[rng.permutation(len(ix))] for _ in range(reps)])[:c]
                             if c else np.zeros(0, np.int64))
            self._table = (epoch, np.concatenate(parts))
        return self._table[1]

    def example(self, item: int, epoch: int) -> CM3Example | None:
        i = int(self.epoch_examples(epoch)[item])
        doc = self.source.document(i)
        if len(doc.tokens) > self.seq_len:
            self._skip(i)
            return None
        ex = sft_example(doc, self.vocab, np.random.default_rng([self.seed, epoch, item]), self.config)
        if len(ex) > self.seq_len:
            # CM3 spans add 2 tokens each; retry in the inference form, which adds at most 3.
            ex = sft_example(doc, self.vocab, np.random.default_rng([self.seed, epoch, item]),
                             _inference_form(self.config))
            if len(ex) > self.seq_len:
                self._skip(i)
                return None
        return ex


def _inference_form(config: MixtureConfig) -> MixtureConfig:
    d = config.to_dict()
    d["response_mask_prob"] = 1.0
    return MixtureConfig.from_dict(d)
