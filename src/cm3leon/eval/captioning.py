"""Caption metrics as the COCO caption evaluation computes them (pycocoevalcap): CIDEr-D and
BLEU-4 against ALL reference captions of each image. CM3Leon reports COCO CIDEr (SFT-7B: 61.6).

Tokenization: pycocoevalcap runs the Stanford PTB tokenizer (Java) in lower-case mode, then
drops punctuation tokens. `tokenize` approximates it in Python: lower-case, split off PTB
clitics ("dog's" -> "dog 's", "don't" -> "do n't"), split off punctuation and drop the same
punctuation tokens. Known differences from the Java tokenizer: no PTB escapes (-LRB- etc.,
which are dropped anyway), no special cases for abbreviations ("u.s." -> "u.s"), numbers or
URLs, and symbols such as "&", "$", "%" become tokens of their own. On ordinary captions the
tokens, and so the scores, are the same."""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Mapping, Sequence

from cm3leon.errors import CM3LeonError

# Tokens pycocoevalcap's PTBTokenizer removes after tokenizing.
_PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)
_CLITIC_NT = re.compile(r"(\w)n't\b")
_CLITICS = re.compile(r"(\w)'(s|re|ve|ll|d|m)\b")
# words (with inner hyphens/periods/apostrophes kept, as PTB keeps "black-and-white"),
# clitics, then runs of punctuation
_TOKEN = re.compile(r"n't|'(?:s|re|ve|ll|d|m)\b|\w+(?:[-.'’]\w+)*|\.\.\.|--|[^\w\s]")


def tokenize(text: str) -> list[str]:
    """PTB-style tokens of a caption, lower-cased, punctuation removed (see module doc)."""
    text = text.lower().replace("\n", " ").replace("\t", " ")
    text = _CLITIC_NT.sub(r"\1 n't", text)
    text = _CLITICS.sub(r"\1 '\2", text)
    return [t for t in _TOKEN.findall(text) if t not in _PUNCTUATIONS]


def _ngrams(words: Sequence[str], n: int) -> Counter:
    counts: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i : i + k])] += 1
    return counts


def _prepare(
    candidates: Mapping | Sequence, references: Mapping | Sequence
) -> tuple[list[list[str]], list[list[list[str]]], list]:
    """Align candidates and references (dicts by image id, or equal-length lists) and tokenize."""
    if isinstance(candidates, Mapping):
        if not isinstance(references, Mapping):
            raise CM3LeonError("candidates is a dict by image id, so references must be one too")
        missing = [k for k in candidates if k not in references]
        if missing:
            raise CM3LeonError(f"no reference captions for image id(s) {missing[:5]}")
        keys = list(candidates)
        cands = [candidates[k] for k in keys]
        refs = [references[k] for k in keys]
    else:
        keys = list(range(len(candidates)))
        cands, refs = list(candidates), list(references)
        if len(cands) != len(refs):
            raise CM3LeonError(f"{len(cands)} candidates but {len(refs)} reference lists")
    if not cands:
        raise CM3LeonError("no captions to evaluate")
    tok_c, tok_r = [], []
    for k, c, r in zip(keys, cands, refs):
        if isinstance(r, str):
            r = [r]
        if not r:
            raise CM3LeonError(f"image {k!r}: empty reference list")
        if not isinstance(c, str):
            raise CM3LeonError(f"image {k!r}: candidate must be one string, got {type(c).__name__}")
        tok_c.append(tokenize(c))
        tok_r.append([tokenize(x) for x in r])
    return tok_c, tok_r, keys


def bleu(candidates: Mapping | Sequence, references: Mapping | Sequence, n: int = 4) -> dict:
    """Corpus BLEU-1..n as pycocoevalcap computes it ("closest" reference length).

    Clipped n-gram matches (each n-gram counted at most its maximum count in any one
    reference) and candidate n-gram counts are summed over the corpus; the brevity penalty
    exp(1 - r/c) uses r = sum over images of the reference length closest to the candidate's
    (ties -> the shorter), c = total candidate length. Returns {"bleu_1".."bleu_n",
    "testlen", "reflen"}; `bleu_4` is BLEU-4."""
    cands, refs, _ = _prepare(candidates, references)
    small, tiny = 1e-9, 1e-15  # pycocoevalcap's smoothing: an empty guess count scores 0
    correct, guess = [0] * n, [0] * n
    testlen = reflen = 0
    for cand, rs in zip(cands, refs):
        maxref: dict = {}
        for r in rs:
            for g, c in _ngrams(r, n).items():
                maxref[g] = max(maxref.get(g, 0), c)
        tl = len(cand)
        testlen += tl
        reflen += min((abs(len(r) - tl), len(r)) for r in rs)[1]
        for k in range(n):
            guess[k] += max(0, tl - k)
        for g, c in _ngrams(cand, n).items():
            correct[len(g) - 1] += min(maxref.get(g, 0), c)
    ratio = (testlen + tiny) / (reflen + small)
    out = {}
    prod = 1.0
    for k in range(n):
        prod *= (correct[k] + tiny) / (guess[k] + small)
        score = prod ** (1.0 / (k + 1))
        if ratio < 1:
            score *= math.exp(1 - 1 / ratio)
        out[f"bleu_{k + 1}"] = score
    out["testlen"], out["reflen"] = testlen, reflen
    return out


def cider_d(
    candidates: Mapping | Sequence, references: Mapping | Sequence, n: int = 4, sigma: float = 6.0
) -> dict:
    """CIDEr-D as pycocoevalcap's `Cider` computes it (Vedantam et al. 2015).

    Per n-gram order: TF-IDF vectors with document frequency counted over the reference sets
    of the evaluated images (idf = log(#images) - log(max(1, df))); cosine similarity with the
    candidate's weights clipped at the reference's; Gaussian length penalty
    exp(-(Δ²)/(2σ²)) with Δ the difference in bigram counts (pycocoevalcap's length);
    averaged over orders and references, x10. Returns {"cider_d": corpus mean, "per_image": [...]}.

    One difference: a candidate or reference with no n-grams of some order scores 0 for that
    order (pycocoevalcap divides 0 by 0 and returns NaN)."""
    cands, refs, keys = _prepare(candidates, references)
    cooked_refs = [[_ngrams(r, n) for r in rs] for rs in refs]
    df: Counter = Counter()
    for rs in cooked_refs:
        df.update({g for r in rs for g in r})
    log_num_images = math.log(float(len(cooked_refs)))

    def vec(counts: Counter) -> tuple[list[dict], list[float], int]:
        v: list[dict] = [{} for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for g, tf in counts.items():
            k = len(g) - 1
            w = tf * (log_num_images - math.log(max(1.0, df.get(g, 0.0))))
            v[k][g] = w
            norm[k] += w * w
            if k == 1:  # pycocoevalcap measures length in bigrams
                length += tf
        return v, [math.sqrt(x) for x in norm], length

    per_image = []
    for cand, rs in zip(cands, cooked_refs):
        vc, nc, lc = vec(_ngrams(cand, n))
        total = [0.0] * n
        for r in rs:
            vr, nr, lr = vec(r)
            penalty = math.exp(-((lc - lr) ** 2) / (2 * sigma**2))
            for k in range(n):
                if nc[k] == 0 or nr[k] == 0:
                    continue
                dot = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vc[k].items())
                total[k] += dot / (nc[k] * nr[k]) * penalty
        per_image.append(10.0 * sum(total) / n / len(rs))
    return {"cider_d": sum(per_image) / len(per_image), "per_image": per_image, "ids": keys}


def caption_metrics(candidates: Mapping | Sequence, references: Mapping | Sequence) -> dict:
    """{"CIDEr-D", "BLEU-4", "n"}: the captioning numbers a report shows."""
    c = cider_d(candidates, references)
    b = bleu(candidates, references)
    return {"CIDEr-D": c["cider_d"], "BLEU-4": b["bleu_4"], "n": len(c["per_image"])}
