"""The pretraining document (CM3Leon, arXiv:2309.02591, Sec. 2): a caption-image pair with
its k retrieved documents before it,

    <eos> (text <break> image <break>)×k  query_text <break> query_image <eos>

in unified ids (`cm3leon.tokenizers.vocab.Vocab`). SFT documents (`layout.templates`) and
inference prompts (`layout.prompts`) are built on the same layout, so the CM3 transform and
the model's position ids apply to all three alike."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from cm3leon.errors import CM3LeonError
from cm3leon.tokenizers.vocab import Vocab

ORDERS = ("text_first", "image_first", "random")
# CM3 segment numbers of the query pair in `build_document`'s layout (cm3.segment_ids):
# -2 = query text + its <break>, -1 = query image + the final <eos> (swapped for image_first).
QUERY_PAIR_SEGMENTS = (-2, -1)


def build_document(query_text_ids: Sequence[int] | np.ndarray, query_image_codes: Sequence[int] | np.ndarray,
                   vocab: Vocab, retrieved: Sequence[tuple] = (), order: str = "text_first") -> np.ndarray:
    """`<eos> (text <break> image <break>)×k query_text <break> query_image <eos>` in unified ids.

    Inputs are tokenizer-local ids (BPE ids, VQ codes); `retrieved` is a list of
    (text_ids, image_codes) pairs placed before the query in the given order."""
    if order not in ("text_first", "image_first"):
        raise CM3LeonError(f"build_document: order must be 'text_first' or 'image_first', got {order!r}")

    def pair(text_ids, codes) -> list[np.ndarray]:
        t, im = vocab.text_to_ids(text_ids), vocab.image_to_ids(codes)
        first, second = (t, im) if order == "text_first" else (im, t)
        return [first, np.array([vocab.break_id]), second]

    parts = [np.array([vocab.eos_id])]
    for text_ids, codes in retrieved:
        parts += pair(text_ids, codes) + [np.array([vocab.break_id])]
    parts += pair(query_text_ids, query_image_codes) + [np.array([vocab.eos_id])]
    return np.concatenate(parts).astype(np.int64)
