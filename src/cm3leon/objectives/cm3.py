"""CM3: causally-masked language modelling as a data transform.

CM3Leon (Yu et al. 2023, arXiv:2309.02591, Sec. 2) pretrains with the CM3 objective of
Aghajanyan et al. 2022 (arXiv:2201.07520): a few spans of the document are cut out, each is
replaced in place by a sentinel `<mask:i>`, and the spans are appended at the end of the
document as `<mask:i> span <eoss>`. A left-to-right model trained on the result learns both
plain generation and infilling (bidirectional context for the masked span).

Choices made here (each a `CM3Config` field where it is a choice):
- number of spans n ~ clamp(Poisson(poisson_lambda), min_spans, max_spans);
- a span lives inside one *segment*: a run of tokens delimited by `<break>` / `<eos>`;
  delimiters are never masked, so a span never crosses a modality change or a document
  boundary. Start positions are uniform over the free maskable tokens; the length is uniform
  from 1 to the number of free tokens left in that segment from the start. Spans never
  overlap. Sentinels are numbered in document order (`<mask:0>` is the first span);
- the document keeps its final `<eos>` in place and the spans follow it:
  `<eos> text <mask:0> text <break> image <eos> <mask:0> span <eoss>`. So an unmasked
  document is unchanged (n = 0 is plain next-token prediction), and infilling at decode time
  is "document, then `<mask:0>`, then let the model write the span until `<eoss>`";
- targets are the next tokens; the loss skips predicting an in-place `<mask:i>` (it is
  unpredictable by construction: paper Sec. 2) and the last position (nothing follows);
- segments are numbered by the number of delimiters before them: segment 0 is the leading
  `<eos>`, and a delimiter belongs to the segment it closes (the final `<eos>` belongs to
  the query image). Negative numbers count from the end, Python style: -1 is
  `query_image <eos>`, -2 is `query_text <break>` in the layout of
  `cm3leon.layout.documents.build_document`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from cm3leon.errors import CM3LeonError
from cm3leon.utils.dataclass_io import from_dict_strict
from cm3leon.tokenizers.vocab import Vocab

IGNORE_INDEX = -100  # target value the loss skips (torch cross_entropy's default ignore_index)


@dataclass
class CM3Config:
    """Settings of the CM3 transform (paper Sec. 2)."""

    poisson_lambda: float = 1.0  # n spans ~ Poisson(1) (CM3, Aghajanyan et al. 2022)
    min_spans: int = 0  # 0: some documents stay unmasked (plain causal LM); CM3 used 1
    max_spans: int = 8  # clamp; must be <= Vocab.num_sentinels. P(Poisson(1) > 8) ~ 1e-6
    # Segments that may be masked: "all" (paper: the whole sequence, retrieved documents
    # included) or a list of segment numbers (see module docstring), e.g. [-2, -1] to
    # mask only the query pair and never the retrieved documents.
    mask_segments: str | list[int] = "all"
    # Where the loss is taken: "all" or a list of segment numbers and/or "spans" (the
    # appended `<mask:i> span <eoss>` part); a position counts if the token it predicts is
    # in a listed segment. Pretraining uses "all"; instruction tuning may use e.g. [-1].
    loss_on: str | list[int | str] = "all"
    # Whole-segment spans: with probability `whole_segment_prob` each segment listed in
    # `whole_segments` is masked as one span before the Poisson spans are drawn. With [-2]
    # (the query caption in text-first order) one sequence trains both prompts the decoder
    # uses besides plain text->image: the unconditional stream of classifier-free guidance,
    # `<mask:0> <break> image` (Sec. 3), and captioning by infilling, `... <eos> <mask:0>
    # caption <eoss>` (Sec. 2). 0 = off (the paper's objective, and every draw unchanged).
    whole_segment_prob: float = 0.0
    whole_segments: list[int] = field(default_factory=lambda: [-2])

    def __post_init__(self) -> None:
        if not self.poisson_lambda >= 0:
            raise CM3LeonError(f"CM3Config.poisson_lambda must be >= 0, got {self.poisson_lambda!r}")
        if not 0 <= self.min_spans <= self.max_spans:
            raise CM3LeonError(
                f"CM3Config needs 0 <= min_spans <= max_spans, got {self.min_spans}, {self.max_spans}")
        if self.mask_segments != "all":
            if isinstance(self.mask_segments, str) or not all(
                    isinstance(s, (int, np.integer)) for s in self.mask_segments):
                raise CM3LeonError(
                    f"CM3Config.mask_segments must be 'all' or a list of segment numbers, got {self.mask_segments!r}")
            self.mask_segments = [int(s) for s in self.mask_segments]
        if self.loss_on != "all":
            if isinstance(self.loss_on, str) or not all(
                    s == "spans" or isinstance(s, (int, np.integer)) for s in self.loss_on):
                raise CM3LeonError(
                    f"CM3Config.loss_on must be 'all' or a list of segment numbers and 'spans', got {self.loss_on!r}")
            self.loss_on = [s if s == "spans" else int(s) for s in self.loss_on]
        if not 0.0 <= self.whole_segment_prob <= 1.0:
            raise CM3LeonError(f"CM3Config.whole_segment_prob must be in [0, 1], got {self.whole_segment_prob!r}")
        if isinstance(self.whole_segments, str) or not all(
                isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in self.whole_segments):
            raise CM3LeonError(f"CM3Config.whole_segments must be a list of segment numbers, got {self.whole_segments!r}")
        self.whole_segments = [int(s) for s in self.whole_segments]
        if self.whole_segment_prob > 0 and len(self.whole_segments) > self.max_spans:
            raise CM3LeonError(f"CM3Config: {len(self.whole_segments)} whole_segments need max_spans >= that, "
                               f"got {self.max_spans}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CM3Config":
        return from_dict_strict(cls, d, "CM3 config")


@dataclass
class CM3Example:
    """One transformed document. All arrays have the same length L."""

    tokens: np.ndarray  # int64 [L] model input
    targets: np.ndarray  # int64 [L] next token, IGNORE_INDEX where no loss is taken
    loss_mask: np.ndarray  # uint8 [L] 1 where the loss is taken (== targets != IGNORE_INDEX)
    spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) in the input document

    def __len__(self) -> int:
        return len(self.tokens)


def segment_ids(tokens: np.ndarray, vocab: Vocab) -> np.ndarray:
    """Segment number of every position: the number of `<break>` / `<eos>` before it."""
    delim = _is_delimiter(tokens, vocab)
    return np.concatenate([[0], np.cumsum(delim)[:-1]]).astype(np.int64) if len(tokens) else np.zeros(0, np.int64)


def _is_delimiter(tokens: np.ndarray, vocab: Vocab) -> np.ndarray:
    return (tokens == vocab.break_id) | (tokens == vocab.eos_id)


def _select_segments(seg: np.ndarray, selection: Sequence[int]) -> np.ndarray:
    """Positions whose segment is in `selection` (negative numbers count from the end)."""
    num = int(seg[-1]) + 1 if len(seg) else 0
    wanted = {s if s >= 0 else num + s for s in selection}
    return np.isin(seg, sorted(wanted))


def cm3_transform(tokens: np.ndarray, vocab: Vocab, rng: np.random.Generator,
                  config: CM3Config | None = None) -> CM3Example:
    """Apply the CM3 objective to one document of unified ids (see the module docstring)."""
    config = config or CM3Config()
    x = np.asarray(tokens, dtype=np.int64).reshape(-1)
    vocab.check(x)
    if config.max_spans > vocab.num_sentinels:
        raise CM3LeonError(
            f"CM3Config.max_spans={config.max_spans} exceeds the vocabulary's {vocab.num_sentinels} sentinels")
    if vocab.is_mask(x).any() or (x == vocab.eoss_id).any() or (x == vocab.pad_id).any():
        raise CM3LeonError("cm3_transform: the document already holds <mask:i>, <eoss> or <pad> tokens")

    seg = segment_ids(x, vocab)
    free = ~_is_delimiter(x, vocab)
    if config.mask_segments != "all":
        free &= _select_segments(seg, config.mask_segments)
    spans: list[tuple[int, int]] = []
    if config.whole_segment_prob > 0:
        for s in config.whole_segments:
            if rng.random() < config.whole_segment_prob:
                where = np.flatnonzero(free & _select_segments(seg, [s]))
                if where.size:  # a segment's maskable tokens are contiguous (its delimiter is last)
                    spans.append((int(where[0]), int(where[-1]) + 1))
                    free[where] = False
    n = int(np.clip(rng.poisson(config.poisson_lambda), config.min_spans, config.max_spans))
    for _ in range(min(n, config.max_spans - len(spans))):  # Poisson spans come on top, within max_spans
        candidates = np.flatnonzero(free)
        if not candidates.size:
            break
        start = int(rng.choice(candidates))
        # Free run from `start`: stops at a delimiter (segment end) or an earlier span.
        blocked = np.flatnonzero(~free[start:])
        run = int(blocked[0]) if blocked.size else len(x) - start
        end = start + int(rng.integers(1, run + 1))
        free[start:end] = False
        spans.append((start, end))
    spans.sort()

    # Assemble: masked document, then `<mask:i> span <eoss>` for each span in order.
    parts, seg_parts, placeholders = [], [], []
    prev, length = 0, 0
    for i, (s, e) in enumerate(spans):
        parts += [x[prev:s], [vocab.mask_id(i)]]
        seg_parts += [seg[prev:s], [seg[s]]]
        length += s - prev
        placeholders.append(length)
        length += 1
        prev = e
    parts.append(x[prev:])
    seg_parts.append(seg[prev:])
    doc_len = length + len(x) - prev
    for i, (s, e) in enumerate(spans):
        parts += [[vocab.mask_id(i)], x[s:e], [vocab.eoss_id]]
    out = np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])

    targets = np.full(len(out), IGNORE_INDEX, dtype=np.int64)
    targets[:-1] = out[1:]
    predicted = np.ones(len(out), dtype=bool)  # position p counts iff the token at p+1 is trainable
    trainable_token = np.ones(len(out), dtype=bool)
    trainable_token[placeholders] = False  # in-place sentinels cannot be predicted (Sec. 2)
    if config.loss_on != "all":
        doc_seg = np.concatenate([np.asarray(s, dtype=np.int64) for s in seg_parts])
        in_doc = _select_segments(doc_seg, [s for s in config.loss_on if s != "spans"]) \
            if len(doc_seg) else np.zeros(0, bool)
        in_spans = np.full(len(out) - doc_len, "spans" in config.loss_on)
        trainable_token &= np.concatenate([in_doc, in_spans])
    predicted[:-1] = trainable_token[1:]
    predicted[-1] = False
    targets[~predicted] = IGNORE_INDEX
    return CM3Example(tokens=out, targets=targets, loss_mask=predicted.astype(np.uint8), spans=spans)


def invert_cm3(tokens: np.ndarray | CM3Example, vocab: Vocab) -> np.ndarray:
    """Undo `cm3_transform`: put every appended span back in place of its `<mask:i>`.

    Trailing `<pad>` is ignored. Raises CM3LeonError when the spans part is malformed
    (a sentinel without its span, a span without `<eoss>`)."""
    x = np.asarray(tokens.tokens if isinstance(tokens, CM3Example) else tokens, dtype=np.int64).reshape(-1)
    nonpad = np.flatnonzero(x != vocab.pad_id)
    x = x[: nonpad[-1] + 1] if nonpad.size else x[:0]
    is_mask = vocab.is_mask(x)
    # The spans part starts at the first sentinel seen for the second time.
    seen: set[int] = set()
    split = len(x)
    for p in np.flatnonzero(is_mask):
        if int(x[p]) in seen:
            split = int(p)
            break
        seen.add(int(x[p]))
    doc, tail = x[:split], x[split:]
    fills: dict[int, np.ndarray] = {}
    p = 0
    while p < len(tail):
        if not vocab.is_mask(tail[p]):
            raise CM3LeonError(f"invert_cm3: expected a sentinel at spans position {p}, got {vocab.token_name(tail[p])}")
        ends = np.flatnonzero(tail[p + 1:] == vocab.eoss_id)
        if not ends.size:
            raise CM3LeonError(f"invert_cm3: span {vocab.token_name(tail[p])} has no <eoss>")
        q = p + 1 + int(ends[0])
        fills[int(tail[p])] = tail[p + 1:q]
        p = q + 1
    pieces = []
    for t in doc:
        if vocab.is_mask(t):
            if int(t) not in fills:
                raise CM3LeonError(f"invert_cm3: no span for {vocab.token_name(t)}")
            pieces.append(fills[int(t)])
        else:
            pieces.append(np.array([t], dtype=np.int64))
    return np.concatenate(pieces) if pieces else doc.copy()
