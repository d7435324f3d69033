"""Exactness of the decoding speed-ups: the output head restricted to the ids a step may emit,
the prefill's head on its last position only, and the compiled decode step each give the same
tokens for a fixed seed as the uncompiled, whole-head path."""

import pytest
import torch

from cm3leon.decode.generate import CACHE_BUCKET, full_logits, generate
from cm3leon.decode.guidance import Guidance
from cm3leon.decode.processors import (AnyConstraint, ImageConstraint, ImageInfillConstraint, SamplerSettings,
                                       TextConstraint)
from cm3leon.model.transformer import CM3LeonTransformer
from cm3leon.tokenizers.vocab import Vocab

from conftest import random_tiny_decoder

VOCAB = Vocab(text_vocab_size=40, image_vocab_size=24, num_sentinels=4)
PROMPTS = [[1, 30, 31, 32, 2], [1, 40, 2], [1, 25, 26, 27, 28, 29, 33, 2]]
UNCOND = [[1, VOCAB.mask_id(0), 2]] * len(PROMPTS)
SAMPLERS = [SamplerSettings(0.0), SamplerSettings(1.0), SamplerSettings(1.0, top_p=0.9),
            SamplerSettings(0.7, top_k=5)]


def _model(extra_vocab: int = 0) -> CM3LeonTransformer:
    return random_tiny_decoder(VOCAB.size + extra_vocab)


@pytest.fixture(scope="module")
def model():
    return _model()


def _streams(method):
    if method is None:
        return None, None
    g = Guidance(method)
    return g, [UNCOND] * (g.num_streams - 1)


def test_partial_head_logits_are_the_whole_heads_columns(model):
    tokens = torch.tensor([PROMPTS[0]])
    full, _ = model(tokens)
    lo, hi = VOCAB.image_offset, VOCAB.size
    part, _ = model(tokens, head_rows=(lo, hi))
    assert part.shape == (1, tokens.size(1), hi - lo)
    torch.testing.assert_close(part, full[..., lo:hi], rtol=0, atol=1e-6)
    last, _ = model(tokens, last_only=True)
    torch.testing.assert_close(last, full[:, -1:], rtol=0, atol=1e-6)
    with pytest.raises(Exception, match="head_rows"):
        model(tokens, head_rows=(0, VOCAB.size + 1))
    with pytest.raises(Exception, match="no loss"):
        model(tokens, tokens, head_rows=(lo, hi))


def test_constraint_spans_cover_every_allowed_id():
    for c in (ImageConstraint(VOCAB, VOCAB.size + 5, 4), TextConstraint(VOCAB, VOCAB.size + 5),
              AnyConstraint(VOCAB, VOCAB.size + 5),
              ImageInfillConstraint(VOCAB, VOCAB.size + 5, [3, 4, 5, 6], [False, True, False, True])):
        for step in range(c.length or 3):
            mask = c.mask(step, "cpu")
            lo, hi = c.span(mask)
            allowed = torch.isfinite(mask).nonzero().flatten()
            assert int(allowed.min()) == lo and int(allowed.max()) == hi - 1
    c = ImageConstraint(VOCAB, VOCAB.size, 4)
    assert c.span(c.mask(0, "cpu")) == (VOCAB.image_offset, VOCAB.size)
    assert c.span(c.mask(4, "cpu")) == (VOCAB.break_id, VOCAB.break_id + 1)
    assert c.span(torch.zeros(VOCAB.size)) is None  # a mask it did not build: unknown, whole head


def test_full_logits_places_the_rows_and_keeps_every_score():
    logits = torch.randn(2, 5)
    out = full_logits(logits, (3, 8), 10)
    assert out.shape == (2, 10) and torch.equal(out[:, 3:8], logits) and torch.equal(out[:, :3], torch.zeros(2, 3))
    assert full_logits(logits, None, 5) is logits


@pytest.mark.parametrize("method", [None, "cfg", "cdk", "edit"])
def test_restricted_head_gives_the_same_image_tokens(model, method):
    guidance, gp = _streams(method)
    for i, s in enumerate(SAMPLERS):
        end_with_break = i % 2 == 0  # the <break> step's span differs from the image steps'
        c = ImageConstraint(VOCAB, VOCAB.size, tokens_per_image=12, end_with_break=end_with_break)
        kw = dict(sampler=s, guidance=guidance, guidance_prompts=gp, seed=11 + i)
        fast = generate(model, PROMPTS, c, **kw)
        slow = generate(model, PROMPTS, c, restrict_head=False, **kw)
        assert fast.tokens == slow.tokens, (method, end_with_break, s)


def test_restricted_head_gives_the_same_text_and_infill_tokens():
    m = _model(extra_vocab=5)  # padded model rows beyond the vocabulary
    s = SamplerSettings(1.0, top_p=0.95)
    for c in (TextConstraint(VOCAB, m.config.vocab_size), AnyConstraint(VOCAB, m.config.vocab_size),
              ImageInfillConstraint(VOCAB, m.config.vocab_size, list(range(8)), [i % 3 == 0 for i in range(8)],
                                    end_with_break=True)):
        a = generate(m, PROMPTS, c, max_new_tokens=12, sampler=s, seed=5)
        b = generate(m, PROMPTS, c, max_new_tokens=12, sampler=s, seed=5, restrict_head=False)
        assert a.tokens == b.tokens


def test_compiled_decode_gives_the_same_tokens_without_recompiling(model):
    """The compiled step (cache rounded up to a bucket) against the uncompiled whole-head
    path; a second call with another prompt length in the same bucket reuses the graphs."""
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    c = ImageConstraint(VOCAB, VOCAB.size, tokens_per_image=16)
    guidance, gp = _streams("cfg")
    s = SamplerSettings(1.0, top_p=0.9)
    kw = dict(sampler=s, guidance=guidance, guidance_prompts=gp, seed=3)
    ref = generate(model, PROMPTS, c, restrict_head=False, **kw)
    got = generate(model, PROMPTS, c, compile=True, **kw)
    assert got.tokens == ref.tokens
    graphs = counters["stats"]["unique_graphs"]
    assert graphs <= 2  # the image steps' graph and the <break> step's
    shorter = [p[:4] + [2] for p in PROMPTS]  # other prompt lengths, the same cache bucket (< CACHE_BUCKET)
    assert max(map(len, PROMPTS)) + 17 <= CACHE_BUCKET
    a = generate(model, shorter, c, compile=True, **kw)
    b = generate(model, shorter, c, restrict_head=False, **kw)
    assert a.tokens == b.tokens
    assert counters["stats"]["unique_graphs"] == graphs  # no recompile
    with pytest.raises(Exception, match="use_cache"):
        generate(model, PROMPTS, c, compile=True, use_cache=False, **kw)


def test_decoding_attends_over_the_written_slots_only(model):
    """A cached step given an attention mask over the first S slots (those written so far)
    attends over them only: the same logits as over the whole cache, whose other slots the
    causal mask hides anyway; eager decoding passes that shorter mask every step."""
    from cm3leon.decode.generate import attention_mask, decode_one_token, left_pad, position_ids, prefill

    tokens, pad = left_pad(PROMPTS, 0)
    T, total = tokens.size(1), tokens.size(1) + 40
    positions = position_ids(tokens, pad, model.config)
    model.setup_caches(len(PROMPTS), total)
    try:
        prefill(model, tokens, pad, total, positions)
        full = attention_mask(pad, 1, total)
        nxt, pos = tokens[:, -1:], positions[:, -1:] + 1
        whole = decode_one_token(model, nxt, torch.tensor([T]), pos, full)
        written = decode_one_token(model, nxt, torch.tensor([T]), pos, full[..., : T + 1])
        torch.testing.assert_close(written, whole, rtol=1e-5, atol=1e-5)
        with pytest.raises(Exception, match="must cover every slot written so far"):
            decode_one_token(model, nxt, torch.tensor([T]), pos, full[..., :T])
        with pytest.raises(Exception, match="attn_mask must have shape"):
            decode_one_token(model, nxt, torch.tensor([T]), pos, full[:, :, :, :, None])
    finally:
        model.reset_caches()
