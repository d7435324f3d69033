"""CM3 transform: invertible, spans inside segments, never overlapping, loss mask exact."""

import numpy as np
import pytest

from cm3leon.errors import CM3LeonError
from cm3leon.objectives.cm3 import IGNORE_INDEX, CM3Config, cm3_transform, invert_cm3, segment_ids
from cm3leon.tokenizers.vocab import Vocab

VOCAB = Vocab(text_vocab_size=30, image_vocab_size=20, num_sentinels=8)


def random_document(rng: np.random.Generator, vocab: Vocab = VOCAB) -> np.ndarray:
    """`<eos> (seg <break>)* seg <eos>` with random text/image segments (some empty)."""
    parts = [[vocab.eos_id]]
    n_seg = int(rng.integers(1, 7))
    for s in range(n_seg):
        n = int(rng.integers(0, 12))
        if rng.random() < 0.5:
            seg = vocab.text_to_ids(rng.integers(0, vocab.text_vocab_size, n))
        else:
            seg = vocab.image_to_ids(rng.integers(0, vocab.image_vocab_size, n))
        parts.append(seg.tolist())
        parts.append([vocab.break_id if s < n_seg - 1 else vocab.eos_id])
    return np.array([t for p in parts for t in p], dtype=np.int64)


def transformed(n: int = 300, config: CM3Config | None = None):
    rng = np.random.default_rng(1234)
    for _ in range(n):
        doc = random_document(rng)
        yield doc, cm3_transform(doc, VOCAB, rng, config or CM3Config(poisson_lambda=2.0))


def test_invert_recovers_the_original_on_random_documents():
    masked = 0
    for doc, ex in transformed():
        np.testing.assert_array_equal(invert_cm3(ex, VOCAB), doc)
        masked += bool(ex.spans)
    assert masked > 100  # the property was exercised on many masked documents


def test_spans_stay_inside_one_segment_and_never_overlap():
    for doc, ex in transformed():
        delim = (doc == VOCAB.break_id) | (doc == VOCAB.eos_id)
        covered = np.zeros(len(doc), int)
        for s, e in ex.spans:
            assert 0 <= s < e <= len(doc)
            assert not delim[s:e].any(), "a span crossed <break>/<eos>"
            covered[s:e] += 1
        assert covered.max(initial=0) <= 1, "spans overlap"


def test_sentinels_numbered_in_order_and_within_range():
    for _, ex in transformed():
        n = len(ex.spans)
        sentinels = ex.tokens[VOCAB.is_mask(ex.tokens)]
        assert n <= CM3Config().max_spans
        expected = [VOCAB.mask_id(i) for i in range(n)] * 2  # in place, then appended
        assert sentinels.tolist() == expected
        assert (ex.tokens == VOCAB.eoss_id).sum() == n
        VOCAB.check(ex.tokens)


def test_layout_keeps_final_eos_in_place_and_appends_spans_after_it():
    for doc, ex in transformed(100):
        if not ex.spans:
            continue
        # Masked document (ending with its <eos>) then `<mask:i> span <eoss>` per span.
        doc_len = len(doc) - sum(e - s for s, e in ex.spans) + len(ex.spans)
        assert ex.tokens[doc_len - 1] == VOCAB.eos_id
        tail, pos = ex.tokens[doc_len:], 0
        for i, (s, e) in enumerate(ex.spans):
            assert tail[pos] == VOCAB.mask_id(i)
            np.testing.assert_array_equal(tail[pos + 1:pos + 1 + e - s], doc[s:e])
            assert tail[pos + 1 + e - s] == VOCAB.eoss_id
            pos += e - s + 2
        assert pos == len(tail)


def test_loss_on_every_next_token_except_in_place_placeholders():
    for _, ex in transformed():
        doc_part = len(ex.tokens) - sum(e - s + 2 for s, e in ex.spans)
        placeholder = np.flatnonzero(VOCAB.is_mask(ex.tokens[:doc_part]))
        assert len(placeholder) == len(ex.spans)
        expected = np.append(ex.tokens[1:], IGNORE_INDEX)
        expected[placeholder - 1] = IGNORE_INDEX  # never predict an in-place <mask:i>
        np.testing.assert_array_equal(ex.targets, expected)
        np.testing.assert_array_equal(ex.loss_mask, (ex.targets != IGNORE_INDEX).astype(np.uint8))


def test_lambda_zero_leaves_the_document_unchanged_with_loss_on_every_next_token():
    for doc, ex in transformed(50, CM3Config(poisson_lambda=0.0)):
        np.testing.assert_array_equal(ex.tokens, doc)
        assert ex.spans == []
        np.testing.assert_array_equal(ex.targets[:-1], doc[1:])
        assert ex.targets[-1] == IGNORE_INDEX


def test_min_spans_forces_masking():
    n_masked = [len(ex.spans) for _, ex in transformed(100, CM3Config(poisson_lambda=0.0, min_spans=1))]
    assert min(n_masked) == 1  # every document with a maskable token got a span


def test_mask_segments_never_mask_the_excluded_segments():
    cfg = CM3Config(poisson_lambda=3.0, mask_segments=[-2, -1])
    for doc, ex in transformed(200, cfg):
        seg = segment_ids(doc, VOCAB)
        last = seg[-1]
        for s, e in ex.spans:
            assert seg[s] in (last, last - 1)


def test_loss_on_selects_segments_and_spans():
    cfg = CM3Config(poisson_lambda=2.0, loss_on=[-1, "spans"])
    for doc, ex in transformed(100, cfg):
        if ex.spans:
            continue
        # Unmasked: exactly the positions predicting a token of the last segment count.
        seg = segment_ids(doc, VOCAB)
        expect = np.zeros(len(doc), bool)
        expect[:-1] = seg[1:] == seg[-1]
        np.testing.assert_array_equal(ex.loss_mask.astype(bool), expect)
    # With spans, the appended part is all trained on.
    for _, ex in transformed(100, cfg):
        if ex.spans:
            doc_part = len(ex.tokens) - sum(e - s + 2 for s, e in ex.spans)
            assert ex.loss_mask[doc_part - 1:-1].all()


def test_rejects_bad_input():
    rng = np.random.default_rng(0)
    with pytest.raises(CM3LeonError, match="sentinels"):
        cm3_transform(np.array([1, 40, 1]), VOCAB, rng, CM3Config(max_spans=9))
    with pytest.raises(CM3LeonError, match="already holds"):
        cm3_transform(np.array([1, VOCAB.mask_id(0), 1]), VOCAB, rng)
    with pytest.raises(CM3LeonError, match="out of range"):
        cm3_transform(np.array([1, VOCAB.size, 1]), VOCAB, rng)
    with pytest.raises(CM3LeonError):
        CM3Config(poisson_lambda=-1)
    with pytest.raises(CM3LeonError):
        CM3Config(loss_on=["query"])


def test_invert_rejects_a_span_without_eoss():
    t = VOCAB.text_offset
    seq = np.array([1, t, VOCAB.mask_id(0), 1, VOCAB.mask_id(0), t + 1])
    with pytest.raises(CM3LeonError, match="no <eoss>"):
        invert_cm3(seq, VOCAB)


def test_whole_segment_span_masks_the_query_caption_as_one_span():
    """whole_segment_prob=1, segment -2 (the query caption): `<mask:0> <break> image <eos>
    <mask:0> caption <eoss>`, the unconditional image prompt and the captioning-by-infilling
    form in one sequence; the document is recovered by inverting it."""
    t, i = VOCAB.text_to_ids([3, 4, 5]).tolist(), VOCAB.image_to_ids([1, 2]).tolist()
    doc = np.array([VOCAB.eos_id] + t + [VOCAB.break_id] + i + [VOCAB.eos_id])
    cfg = CM3Config(poisson_lambda=0.0, whole_segment_prob=1.0, whole_segments=[-2])
    ex = cm3_transform(doc, VOCAB, np.random.default_rng(0), cfg)
    m0 = VOCAB.mask_id(0)
    assert ex.tokens.tolist() == [VOCAB.eos_id, m0, VOCAB.break_id] + i + [VOCAB.eos_id, m0] + t + [VOCAB.eoss_id]
    assert ex.spans == [(1, 4)]
    assert np.array_equal(invert_cm3(ex, VOCAB), doc)


def test_whole_segment_prob_zero_draws_exactly_as_before_and_spans_add_on_top():
    for doc, ex in transformed(50, CM3Config(poisson_lambda=2.0, whole_segment_prob=0.0)):
        ref = cm3_transform(doc, VOCAB, np.random.default_rng(0), CM3Config(poisson_lambda=2.0))
        got = cm3_transform(doc, VOCAB, np.random.default_rng(0), CM3Config(poisson_lambda=2.0, whole_segment_prob=0.0))
        assert np.array_equal(ref.tokens, got.tokens)
    rng = np.random.default_rng(5)
    cfg = CM3Config(poisson_lambda=0.0, min_spans=2, max_spans=3, whole_segment_prob=1.0, whole_segments=[-2])
    for _ in range(50):
        doc = random_document(rng)
        ex = cm3_transform(doc, VOCAB, rng, cfg)
        assert len(ex.spans) <= 3 and np.array_equal(invert_cm3(ex, VOCAB), doc)
    with pytest.raises(CM3LeonError, match="whole_segment_prob"):
        CM3Config(whole_segment_prob=1.5)
    with pytest.raises(CM3LeonError, match="whole_segments"):
        CM3Config(whole_segments="query")
