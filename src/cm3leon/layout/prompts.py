"""Token prompts for each task, in the layouts the model is trained on.

Training layout (paper Sec. 2): a document is
`<eos> (text <break> image <break>)*k  query_text <break> query_image <eos>`, and the CM3
transform replaces a span by `<mask:i>` in place and appends `<mask:i> span <eoss>` after
the document. Each task is a prefix of such a sequence; the model writes what follows.

- text -> image: `<eos> [docs] caption <break>` -> `image <break>`.
  Unconditional stream (CFG / CD-K amateur): the caption replaced by `<mask:0>` (the retrieved
  documents, when any, are kept, paper Sec. 3).
- image -> text (captioning) is infilling (paper Sec. 2): the caption is the masked span,
  `<eos> [docs] <mask:0> <break> image <eos> <mask:0>` -> `caption <eoss>`.
- VQA, template `Question: {q} Answer: {a}. <break> {image}` (paper Table 5). The answer comes
  BEFORE the image in the template, so left-to-right decoding could not look at the image:
  the answer span is infilled instead,
  `<eos> Question: {q} Answer: <mask:0> <break> image <eos> <mask:0>` -> ` {a}. <eoss>`.
- editing, template `Edit first image following the instruction <break> {image1} <break>
  {instruction} <break> {image2}`: the prompt ends after the instruction's `<break>` and the
  model writes image2. Streams for two-scale guidance: full; image-only (instruction ->
  `<mask:0>`); unconditional (source image -> `<mask:0>`, instruction -> `<mask:1>`).
- image infilling: the raster-order run of codes from the region's first to last cell is the
  masked span, `<eos> [caption] <break> codes[:a] <mask:0> codes[b:] <eos> <mask:0>` ->
  `codes[a:b]`; cells of that run outside the region are forced to their original codes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from cm3leon.errors import CM3LeonError
from cm3leon.layout.templates import TEMPLATES
from cm3leon.tokenizers.vocab import Vocab

# The prompt texts of the instruction templates (paper Table 5), as instruction tuning trains them.
VQA_QUESTION = TEMPLATES["vqa"]["template"].split("[[", 1)[0]  # "Question: {question} Answer:"
EDIT_TEMPLATE = TEMPLATES["edit"]["template"].split(" <break> ", 1)[0]  # "Edit first image following the instruction"
# User text is cut to this many characters per token of room before it is tokenized, so a
# megabyte of text is never encoded whole (BPE tokens are rarely longer than a word; the cut
# text is then cut to the room in tokens).
MAX_CHARS_PER_TOKEN = 64


def _checked_text(s, what: str, budget_tokens: int) -> str:
    """User text that is non-empty valid Unicode, cut to what `budget_tokens` could hold."""
    if not isinstance(s, str) or not s.strip():
        raise CM3LeonError(f"{what} is empty: give some text")
    s = s[: max(1, budget_tokens) * MAX_CHARS_PER_TOKEN]
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise CM3LeonError(f"{what} is not valid Unicode text ({e.reason} at character {e.start})") from None
    return s


@dataclass
class TaskPrompt:
    """The token streams of one sample: `cond` is what the model continues; the others are
    the guidance streams (None when the task has none)."""

    cond: list[int]
    uncond: list[int] | None = None  # CFG unconditional / CD-K amateur / edit: neither condition
    image_only: list[int] | None = None  # edit: source image kept, instruction dropped
    truncated_tokens: int = 0  # text tokens cut to fit the context

    def guidance_streams(self, method: str | None) -> list[list[int]] | None:
        """The extra streams `generate` expects for a guidance method, in its order."""
        if method is None:
            return None
        if method in ("cfg", "cdk"):
            if self.uncond is None:
                raise CM3LeonError(f"this task has no unconditional stream for guidance {method!r}")
            return [self.uncond]
        if method == "edit":
            if self.uncond is None or self.image_only is None:
                raise CM3LeonError("two-scale (edit) guidance needs an editing prompt")
            return [self.image_only, self.uncond]
        raise CM3LeonError(f"unknown guidance method {method!r}")


@dataclass(frozen=True)
class Document:
    """A retrieved document: BPE text ids and VQ codes (tokenizer-local ids)."""

    text_ids: Sequence[int]
    codes: Sequence[int]


class PromptBuilder:
    """Turns strings and code grids into unified-id prompts that fit the context."""

    def __init__(self, vocab: Vocab, text_tokenizer, max_seq_len: int, tokens_per_image: int):
        self.vocab = vocab
        self.tok = text_tokenizer
        self.max_seq_len = max_seq_len
        self.tokens_per_image = tokens_per_image

    # --- pieces ----------------------------------------------------------------------------
    def text(self, s: str) -> list[int]:
        return self.vocab.text_to_ids(self.tok.encode(s)).tolist()

    def image(self, codes) -> list[int]:
        ids = self.vocab.image_to_ids(codes).tolist()
        if len(ids) != self.tokens_per_image:
            raise CM3LeonError(f"an image must be {self.tokens_per_image} codes, got {len(ids)}")
        return ids

    def document(self, doc: Document) -> list[int]:
        """`text <break> image <break>` (a retrieved document, paper Sec. 2.2)."""
        return self.vocab.text_to_ids(list(doc.text_ids)).tolist() + [self.vocab.break_id] + \
            self.image(doc.codes) + [self.vocab.break_id]

    def _m(self, i: int) -> int:
        return self.vocab.mask_id(i)

    def _user_text(self, s: str, what: str, budget: int) -> tuple[list[int], int]:
        """Encode user text; cut it to `budget` tokens with a warning saying how much."""
        if budget < 1:
            raise CM3LeonError(
                f"{what}: no room left in the model's context (max_seq_len={self.max_seq_len}) for any text"
            )
        text = _checked_text(s, what, budget)
        more = "+" if len(text) < len(s) else ""  # cut before tokenizing: there was more
        ids = self.text(text)
        if len(ids) > budget:
            cut = len(ids) - budget
            warnings.warn(
                f"{what} is {len(ids)}{more} tokens; truncated to {budget} (dropped the last {cut}{more}) "
                f"to fit the context of {self.max_seq_len} tokens",
                stacklevel=3,
            )
            return ids[:budget], cut
        return ids, 0

    def _docs(self, docs: Sequence[Document], budget: int) -> list[int]:
        """Retrieved documents that fit `budget` tokens (later ones dropped with a warning)."""
        out: list[int] = []
        for i, d in enumerate(docs):
            toks = self.document(d)
            if len(out) + len(toks) > budget:
                warnings.warn(f"dropped {len(docs) - i} retrieved document(s) that do not fit the context",
                              stacklevel=3)
                break
            out += toks
        return out

    # --- tasks -----------------------------------------------------------------------------
    def text_to_image(self, prompt: str, docs: Sequence[Document] = (), min_text: int = 8) -> TaskPrompt:
        """`<eos> [docs] caption <break>` (+ the `<mask:0>` unconditional stream)."""
        v = self.vocab
        gen_len = self.tokens_per_image + 1  # image + <break>
        room = self.max_seq_len - gen_len - 2  # <eos>, <break>
        doc_ids = self._docs(docs, max(0, room - min_text))
        text, cut = self._user_text(prompt, "prompt", room - len(doc_ids))
        head = [v.eos_id] + doc_ids
        return TaskPrompt(
            cond=head + text + [v.break_id],
            uncond=head + [self._m(0), v.break_id],
            truncated_tokens=cut,
        )

    def caption(self, codes, max_new_tokens: int, docs: Sequence[Document] = ()) -> TaskPrompt:
        """Captioning by infilling: `<eos> [docs] <mask:0> <break> image <eos> <mask:0>`."""
        v = self.vocab
        img = self.image(codes)
        fixed = 5 + len(img) + max_new_tokens
        doc_ids = self._docs(docs, self.max_seq_len - fixed)
        cond = [v.eos_id] + doc_ids + [self._m(0), v.break_id] + img + [v.eos_id, self._m(0)]
        self._check_fits(cond, max_new_tokens, "caption prompt")
        return TaskPrompt(cond=cond)

    def vqa(self, codes, question: str, max_new_tokens: int) -> TaskPrompt:
        """`<eos> Question: {q} Answer: <mask:0> <break> image <eos> <mask:0>` -> answer span."""
        v = self.vocab
        question = _checked_text(question, "question", self.max_seq_len).strip()
        img = self.image(codes)
        # Encode the template as one string (as in training): BPE merges across the joins.
        text = self.text(VQA_QUESTION.format(question=question))
        budget = self.max_seq_len - max_new_tokens - len(img) - 5
        cut = 0
        if len(text) > budget:
            q_ids = self.tok.encode(question)
            q, cut = self._user_text(question, "question", budget - (len(text) - len(q_ids)))
            keep = len(q)
            while True:  # re-encoding a cut question can merge differently: shorten until it fits
                text = self.text(VQA_QUESTION.format(question=self.tok.decode(q_ids[:keep])))
                if len(text) <= budget or keep <= 1:
                    break
                keep -= 1
        cond = [v.eos_id] + text + [self._m(0), v.break_id] + img + [v.eos_id, self._m(0)]
        self._check_fits(cond, max_new_tokens, "question prompt")
        return TaskPrompt(cond=cond, truncated_tokens=cut)

    def edit(self, codes, instruction: str) -> TaskPrompt:
        """`<eos> Edit first image ... <break> image1 <break> instruction <break>` and the
        image-only / unconditional streams for two-scale guidance."""
        v = self.vocab
        img = self.image(codes)
        head = [v.eos_id] + self.text(EDIT_TEMPLATE) + [v.break_id]
        budget = self.max_seq_len - (self.tokens_per_image + 1) - len(head) - len(img) - 2
        instr, cut = self._user_text(instruction, "instruction", budget)
        return TaskPrompt(
            cond=head + img + [v.break_id] + instr + [v.break_id],
            image_only=head + img + [v.break_id, self._m(0), v.break_id],
            uncond=head + [self._m(0), v.break_id, self._m(1), v.break_id],
            truncated_tokens=cut,
        )

    def infill_image(self, codes, region: np.ndarray, prompt: str | None = None) -> tuple[TaskPrompt, int, int]:
        """CM3 infilling of an image region. region: bool (h*w,) raster order, True = regenerate.

        Returns (prompt, a, b): the model writes codes[a:b] (the span covering the region)."""
        v = self.vocab
        codes = np.asarray(codes).reshape(-1)
        region = np.asarray(region, dtype=bool).reshape(-1)
        if region.shape != codes.shape:
            raise CM3LeonError(f"infill region has {region.size} cells, the image {codes.size} codes")
        cells = np.flatnonzero(region)
        if cells.size == 0:
            raise CM3LeonError("infill region is empty: the box covers no image cell")
        a, b = int(cells[0]), int(cells[-1]) + 1
        img = self.image(codes)
        text: list[int] = []
        if prompt is not None and prompt.strip():
            budget = self.max_seq_len - len(img) - 6 - (b - a) - 1
            text, _ = self._user_text(prompt, "prompt", budget)
        cond = [v.eos_id] + text + [v.break_id] + img[:a] + [self._m(0)] + img[b:] + [v.eos_id, self._m(0)]
        self._check_fits(cond, b - a, "infill prompt")
        return TaskPrompt(cond=cond), a, b

    def _check_fits(self, prompt: list[int], new_tokens: int, what: str) -> None:
        if len(prompt) + new_tokens > self.max_seq_len:
            raise CM3LeonError(
                f"{what} ({len(prompt)} tokens) + {new_tokens} generated tokens exceeds the model's "
                f"context max_seq_len={self.max_seq_len}"
            )


def box_to_region(box: Sequence[float], grid: tuple[int, int]) -> np.ndarray:
    """A box (left, top, right, bottom) as fractions of the image side in [0, 1] -> bool
    (h*w,) raster mask of the code cells whose centre lies inside it (at least one cell)."""
    if len(box) != 4:
        raise CM3LeonError(f"box must be (left, top, right, bottom), got {box!r}")
    x0, y0, x1, y1 = (float(c) for c in box)
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise CM3LeonError(f"box must satisfy 0 <= left < right <= 1 and 0 <= top < bottom <= 1, got {box!r}")
    h, w = grid
    cy = (np.arange(h) + 0.5) / h
    cx = (np.arange(w) + 0.5) / w
    inside = ((cy >= y0) & (cy <= y1))[:, None] & ((cx >= x0) & (cx <= x1))[None, :]
    if not inside.any():  # a box smaller than a cell: take the cell holding its centre
        inside[min(int((y0 + y1) / 2 * h), h - 1), min(int((x0 + x1) / 2 * w), w - 1)] = True
    return inside.reshape(-1)
