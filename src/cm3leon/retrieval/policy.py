"""Which memory-bank documents a query gets: CM3Leon's retrieval strategy (Sec. 2.2).

- relevance: dense retrieval, maximum inner product between the query and the document
  vectors (normalised mean of CLIP text and image embeddings);
- modality: candidates come from both the text and the image of the query;
- diversity: skip candidates whose relevance to the query is above 0.9 (near-duplicates of
  the query), skip duplicates of documents already chosen, and drop 20% of the query's tokens
  before retrieval during training (query dropout).

Query dropout on an image: the image is cut into a `image_dropout_grid` x `image_dropout_grid`
grid of patches and each patch is, with probability `query_dropout`, filled with the image's
mean colour: the pixel-space counterpart of dropping 20% of an image's tokens (a VQ token or a
ViT patch is one grid cell), and it works the same for every retriever backend.
On text, each whitespace-separated word (or UTF-8 byte, `text_dropout_unit="byte"`) is dropped
with probability `query_dropout`.

The relevance of a candidate m is r(q, m) = <q, m>, with q the query's own document vector
(normalised mean of its text and image embeddings, after dropout; one of them when the query
has a single modality). Candidates are ranked by r, which is also what the 0.9 threshold tests.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import asdict, dataclass, replace
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cm3leon.errors import CM3LeonError

MODALITIES = ("text", "image")


@dataclass
class RetrievalPolicy:
    num_docs: int = 2  # k documents retrieved per query (paper default 2)
    num_candidates: int = 64  # nearest neighbours fetched per query modality before filtering
    query_modalities: tuple[str, ...] = ("text", "image")  # candidates from both (paper)
    max_relevance: float | None = 0.9  # skip candidates with r(q, m) above this (paper: 0.9); None: off
    query_dropout: float = 0.2  # fraction of query tokens dropped in training (paper: 20%)
    text_dropout_unit: str = "word"  # "word" or "byte"
    image_dropout_grid: int = 8  # image query dropout acts on a grid x grid patch grid
    exclude_self: bool = True  # a training query never retrieves itself (same key)
    dedupe: bool = True  # skip documents equal (key, or text + image) to one already chosen or to the query

    def __post_init__(self):
        self.query_modalities = tuple(self.query_modalities)
        if self.num_docs < 0 or self.num_candidates < 1:
            raise CM3LeonError(f"retrieval policy: num_docs must be >= 0 and num_candidates >= 1 "
                               f"(got {self.num_docs}, {self.num_candidates})")
        if not self.query_modalities or set(self.query_modalities) - set(MODALITIES):
            raise CM3LeonError(f"retrieval policy: query_modalities {self.query_modalities} must be a non-empty subset of {MODALITIES}")
        if not 0.0 <= self.query_dropout < 1.0:
            raise CM3LeonError(f"retrieval policy: query_dropout {self.query_dropout} must be in [0, 1)")
        if self.text_dropout_unit not in ("word", "byte"):
            raise CM3LeonError(f"retrieval policy: text_dropout_unit {self.text_dropout_unit!r} must be 'word' or 'byte'")
        if self.image_dropout_grid < 1:
            raise CM3LeonError(f"retrieval policy: image_dropout_grid must be >= 1 (got {self.image_dropout_grid})")

    @classmethod
    def for_generation(cls, num_docs: int = 2, **overrides) -> "RetrievalPolicy":
        """At generation the most relevant documents are wanted: the paper's relevance
        threshold and query dropout shape *training* samples, so both are off here."""
        return cls(**{"num_docs": num_docs, "max_relevance": None, "query_dropout": 0.0,
                      "exclude_self": False, **overrides})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["query_modalities"] = list(self.query_modalities)
        return d

    def with_(self, **changes) -> "RetrievalPolicy":
        return replace(self, **changes)


# ---------------------------------------------------------------------------- query dropout

def drop_text(text: str, rate: float, rng: np.random.Generator, unit: str = "word") -> str:
    """Drop each word (or UTF-8 byte) independently with probability `rate`; keeps at least one."""
    if rate <= 0 or not text:
        return text
    if unit == "word":
        parts = text.split()
        keep = rng.random(len(parts)) >= rate
        if parts and not keep.any():
            keep[rng.integers(len(parts))] = True
        return " ".join(p for p, k in zip(parts, keep) if k)
    data = text.encode("utf-8")
    keep = rng.random(len(data)) >= rate
    if not keep.any():
        keep[rng.integers(len(data))] = True
    return bytes(b for b, k in zip(data, keep) if k).decode("utf-8", errors="ignore")


def drop_image_patches(image, rate: float, rng: np.random.Generator, grid: int = 8):
    """Fill each cell of a grid x grid partition with the image's mean colour, with probability
    `rate`. Returns (new PIL image, dropped [grid, grid] bool)."""
    from PIL import Image

    dropped = rng.random((grid, grid)) < rate
    if rate <= 0 or not dropped.any():
        return image, dropped
    x = np.array(image.convert("RGB"), dtype=np.uint8)  # (H, W, 3) copy
    h, w = x.shape[:2]
    mean = x.reshape(-1, 3).mean(0).round().astype(np.uint8)
    ys = np.linspace(0, h, grid + 1).round().astype(int)
    xs = np.linspace(0, w, grid + 1).round().astype(int)
    for r, c in zip(*np.nonzero(dropped)):
        x[ys[r]:ys[r + 1], xs[c]:xs[c + 1]] = mean
    return Image.fromarray(x), dropped


def image_digest(image) -> str:
    """Content hash of an image's RGB pixels (duplicate detection)."""
    im = image.convert("RGB")
    return hashlib.sha1(f"{im.size}".encode() + im.tobytes()).hexdigest()


def document_signature(text: str, digest: str | None) -> str:
    """Identity of a document's content: text + image."""
    return hashlib.sha1(f"{text}\x00{digest}".encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------- selection

@dataclass
class Query:
    """One retrieval query; `key`/`signature` identify the query document (self-exclusion, dedupe)."""

    text: str | None = None
    image: object | None = None  # PIL image
    key: str | None = None
    signature: str | None = None
    training: bool = False  # apply query dropout


def select_documents(cand_ids: Sequence[int], cand_scores: Sequence[float], doc_info: Callable[[int], tuple],
                     policy: RetrievalPolicy, query_key: str | None = None, query_signature: str | None = None,
                     k: int | None = None) -> tuple[list[tuple[int, float]], Counter]:
    """Apply the selection rules to ranked candidates.

    `doc_info(id) -> (key, signature, eligible)`; an ineligible document (e.g. not in the
    bank's train split) is never chosen. Candidates are taken in decreasing score; a candidate
    listed twice (found by both query modalities) counts once. Returns ([(id, score)], counts of
    skips by reason: self, threshold, duplicate, ineligible)."""
    k = policy.num_docs if k is None else k
    order = np.argsort(-np.asarray(cand_scores, dtype=np.float64), kind="stable")
    chosen: list[tuple[int, float]] = []
    keys, sigs = set(), set()
    if query_signature is not None:
        sigs.add(query_signature)
    seen: set[int] = set()
    skipped: Counter = Counter()
    for j in order:
        if len(chosen) >= k:
            break
        doc, score = int(cand_ids[j]), float(cand_scores[j])
        if doc < 0 or doc in seen:
            continue
        seen.add(doc)
        key, sig, eligible = doc_info(doc)
        if not eligible:
            skipped["ineligible"] += 1
        elif policy.exclude_self and query_key is not None and key == query_key:
            skipped["self"] += 1
        elif policy.max_relevance is not None and score > policy.max_relevance:
            skipped["threshold"] += 1
        elif policy.dedupe and (key in keys or (sig is not None and sig in sigs)):
            skipped["duplicate"] += 1
        else:
            chosen.append((doc, score))
            keys.add(key)
            if sig is not None:
                sigs.add(sig)
    return chosen, skipped


def search_candidates(retriever, bank, queries: Sequence[Query], policy: RetrievalPolicy,
                      rngs: Sequence[np.random.Generator] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each query: candidate ids from every query modality it has (top `num_candidates`
    each) and their relevance r(q, m) to the whole query. Query dropout is applied to queries
    marked `training`, with `rngs[i]`."""
    n = len(queries)
    texts: list[str | None] = []
    images: list = []
    for i, q in enumerate(queries):
        t, im = q.text, q.image
        if q.training and policy.query_dropout > 0:
            rng = rngs[i] if rngs is not None else np.random.default_rng()
            if t is not None:
                t = drop_text(t, policy.query_dropout, rng, policy.text_dropout_unit)
            if im is not None:
                im = drop_image_patches(im, policy.query_dropout, rng, policy.image_dropout_grid)[0]
        if t is None and im is None:
            raise CM3LeonError("a retrieval query needs a text, an image, or both")
        texts.append(t)
        images.append(im)
    dim = bank.dim
    t_emb = torch.zeros(n, dim)
    i_emb = torch.zeros(n, dim)
    has_t = [i for i in range(n) if texts[i] is not None]
    has_i = [i for i in range(n) if images[i] is not None]
    if has_t:
        t_emb[has_t] = retriever.embed_text([texts[i] for i in has_t])
    if has_i:
        i_emb[has_i] = retriever.embed_image([images[i] for i in has_i])
    q_doc = F.normalize(t_emb + i_emb, dim=-1).numpy()  # the query's own document vector

    per_query: list[list[np.ndarray]] = [[] for _ in range(n)]
    for modality, emb, rows in (("text", t_emb, has_t), ("image", i_emb, has_i)):
        if modality not in policy.query_modalities or not rows:
            continue
        _, ids = bank.search(emb[rows].numpy(), min(policy.num_candidates, len(bank)))
        for r, row_ids in zip(rows, ids):
            per_query[r].append(row_ids)
    out = []
    for i in range(n):
        if not per_query[i]:  # the query lacks every modality the policy searches with: use its whole vector
            _, ids = bank.search(q_doc[i:i + 1], min(policy.num_candidates, len(bank)))
            per_query[i].append(ids[0])
        ids = np.unique(np.concatenate(per_query[i]))
        ids = ids[ids >= 0]
        scores = bank.vectors(ids) @ q_doc[i] if len(ids) else np.zeros(0, np.float32)
        out.append((ids, scores.astype(np.float32)))
    return out
