"""Generation over the static KV cache: cache/batching invariants, guidance in one batch,
modality constraints and stop conditions, on a tiny random transformer."""

import pytest
import torch
import torch.nn as nn

from cm3leon.decode.generate import generate
from cm3leon.decode.guidance import Guidance, cfg_logits
from cm3leon.decode.processors import AnyConstraint, ImageConstraint, SamplerSettings, TextConstraint
from cm3leon.decode.rerank import sequence_logprob
from cm3leon.layout.prompts import PromptBuilder, box_to_region
from cm3leon.errors import CM3LeonError
from cm3leon.model.transformer import CM3LeonTransformer
from cm3leon.tokenizers.vocab import Vocab

from conftest import random_tiny_decoder

VOCAB = Vocab(text_vocab_size=40, image_vocab_size=24, num_sentinels=4)
GREEDY = SamplerSettings(temperature=0.0)
PROMPTS = [[1, 30, 31, 32, 2], [1, 40, 2], [1, 25, 26, 27, 28, 29, 33, 2]]


def _model(extra_vocab: int = 0) -> CM3LeonTransformer:
    return random_tiny_decoder(VOCAB.size + extra_vocab)


@pytest.fixture(scope="module")
def model():
    return _model()


class Biased(nn.Module):
    """The tiny model with a large bonus on some logit columns (to test constraints)."""

    def __init__(self, inner, columns, bonus=100.0):
        super().__init__()
        self.inner, self.columns, self.bonus = inner, list(columns), bonus
        self.config = inner.config

    def forward(self, *a, **k):
        logits, loss = self.inner(*a, **k)
        logits = logits.clone()
        logits[..., self.columns] += self.bonus
        return logits, loss

    def setup_caches(self, *a, **k):
        self.inner.setup_caches(*a, **k)

    def reset_caches(self):
        self.inner.reset_caches()


def test_cached_generation_equals_uncached_greedy(model):
    c = AnyConstraint(VOCAB, VOCAB.size)
    cached = generate(model, PROMPTS, c, max_new_tokens=24, sampler=GREEDY)
    uncached = generate(model, PROMPTS, c, max_new_tokens=24, sampler=GREEDY, use_cache=False)
    assert cached.tokens == uncached.tokens
    assert sum(map(len, cached.tokens)) > 10  # it really generated something


def test_cached_equals_uncached_when_sampling_with_a_seed(model):
    c = ImageConstraint(VOCAB, VOCAB.size, tokens_per_image=16)
    s = SamplerSettings(temperature=1.0, top_p=0.9)
    a = generate(model, PROMPTS, c, sampler=s, seed=7)
    b = generate(model, PROMPTS, c, sampler=s, seed=7, use_cache=False)
    assert a.tokens == b.tokens
    assert a.tokens != generate(model, PROMPTS, c, sampler=s, seed=8).tokens


def test_left_padded_batch_equals_each_prompt_alone(model):
    c = AnyConstraint(VOCAB, VOCAB.size)
    batch = generate(model, PROMPTS, c, max_new_tokens=16, sampler=GREEDY).tokens
    alone = [generate(model, [p], c, max_new_tokens=16, sampler=GREEDY).tokens[0] for p in PROMPTS]
    assert batch == alone


def test_cfg_scale_one_is_exactly_conditional_sampling(model):
    c = ImageConstraint(VOCAB, VOCAB.size, tokens_per_image=16)
    s = SamplerSettings(temperature=1.0)
    plain = generate(model, PROMPTS, c, sampler=s, seed=3)
    uncond = [[1, VOCAB.mask_id(0), 2]] * len(PROMPTS)
    guided = generate(model, PROMPTS, c, sampler=s, seed=3, guidance=Guidance("cfg", cfg_scale=1.0),
                      guidance_prompts=[uncond])
    assert guided.tokens == plain.tokens


def test_cfg_in_one_batch_matches_two_separate_passes(model):
    """Reference: run cond and uncond separately (uncached) and combine by hand."""
    cond, uncond, scale, steps = [1, 30, 31, 2], [1, VOCAB.mask_id(0), 2], 3.0, 12
    c = ImageConstraint(VOCAB, VOCAB.size, tokens_per_image=steps - 1)
    got = generate(model, [cond], c, sampler=GREEDY, guidance=Guidance("cfg", cfg_scale=scale),
                   guidance_prompts=[[uncond]]).tokens[0]
    seq_c, seq_u, ref = list(cond), list(uncond), []
    with torch.no_grad():
        for step in range(steps):
            lc = model(torch.tensor([seq_c]))[0][0, -1]
            lu = model(torch.tensor([seq_u]))[0][0, -1]
            t = int((cfg_logits(lc, lu, scale) + c.mask(step, "cpu")).argmax())
            ref.append(t)
            seq_c.append(t)
            seq_u.append(t)
    assert got == ref


def test_generated_image_is_exactly_tokens_per_image_codes_then_break(model):
    for guidance in (None, Guidance("cfg", cfg_scale=3.0), Guidance("cdk", cdk_alpha=0.1, cdk_k=5)):
        # A model that would rather emit text / specials: the constraint must override it.
        biased = Biased(model, [VOCAB.eos_id, VOCAB.text_offset + 3])
        c = ImageConstraint(VOCAB, VOCAB.size, tokens_per_image=16)
        gp = None if guidance is None else [[[1, VOCAB.mask_id(0), 2]] * 2]
        res = generate(biased, PROMPTS[:2], c, sampler=SamplerSettings(1.0), guidance=guidance,
                       guidance_prompts=gp, seed=0)
        for row in res.tokens:
            assert len(row) == 17
            assert VOCAB.is_image(row[:16]).all()
            assert row[16] == VOCAB.break_id


def test_on_step_sees_every_step_changes_no_sample_and_can_stop_the_loop(model):
    c = ImageConstraint(VOCAB, VOCAB.size, tokens_per_image=16)
    s = SamplerSettings(temperature=1.0, top_p=0.9)
    cfg = dict(guidance=Guidance("cfg", cfg_scale=3.0), guidance_prompts=[[[1, VOCAB.mask_id(0), 2]] * 2])
    plain = generate(model, PROMPTS[:2], c, sampler=s, seed=4, **cfg)
    seen = []
    hooked = generate(model, PROMPTS[:2], c, sampler=s, seed=4, on_step=lambda n, out: seen.append(
        (n, out[:, :n].tolist())), **cfg)
    assert hooked.tokens == plain.tokens  # the hook draws no random numbers
    assert [n for n, _ in seen] == list(range(1, 18))  # 16 codes and the <break>
    assert seen[-1][1] == plain.tokens and seen[3][1] == [row[:4] for row in plain.tokens]

    class Stop(Exception):
        pass

    def stop_at_5(n, out):
        if n == 5:
            raise Stop

    with pytest.raises(Stop):
        generate(model, PROMPTS[:2], c, sampler=s, seed=4, on_step=stop_at_5, **cfg)
    assert not model.has_caches  # stopped cleanly: the KV cache is freed


def test_text_generation_never_emits_image_ids_or_padded_rows():
    m = _model(extra_vocab=5)  # 5 model rows beyond the vocabulary
    biased = Biased(m, list(range(VOCAB.image_offset, VOCAB.size + 5)))
    c = TextConstraint(VOCAB, VOCAB.size + 5, stop_ids=())
    res = generate(biased, PROMPTS, c, max_new_tokens=30, sampler=SamplerSettings(temperature=2.0), seed=0)
    for row in res.tokens:
        assert len(row) == 30 and VOCAB.is_text(row).all()


def test_generation_stops_at_eoss_and_checks_only_every_few_steps(model):
    biased = Biased(model, [VOCAB.eoss_id])
    c = TextConstraint(VOCAB, VOCAB.size)
    res = generate(biased, PROMPTS, c, max_new_tokens=40, sampler=GREEDY, check_every=4)
    assert res.tokens == [[], [], []]
    assert res.stop_ids == [VOCAB.eoss_id] * 3
    assert res.num_steps == 4  # stopped at the first check, long before 40


def test_length_limit_without_stop(model):
    c = TextConstraint(VOCAB, VOCAB.size, stop_ids=())
    res = generate(model, PROMPTS[:1], c, max_new_tokens=5, sampler=GREEDY)
    assert len(res.tokens[0]) == 5 and res.stop_ids == [None]


@pytest.mark.parametrize(
    "prompts, kwargs, match",
    [
        ([[]], {}, "empty"),
        ([], {}, "non-empty"),
        ([[1, 10_000]], {}, "out of range"),
        ([[1] * 120], {"max_new_tokens": 20}, "max_seq_len"),
        ([[1, 2]], {"max_new_tokens": 0}, "max_new_tokens"),
        ([[1, 2]], {"guidance": Guidance("cfg")}, "prompt stream"),
    ],
)
def test_bad_generate_input_raises_named_error(model, prompts, kwargs, match):
    with pytest.raises(CM3LeonError, match=match):
        generate(model, prompts, AnyConstraint(VOCAB, VOCAB.size), **{"max_new_tokens": 4, **kwargs})


def test_sequence_logprob_matches_a_direct_computation_and_ignores_padding(model):
    pre, cont = [[1, 30, 31, 2], [1, 40, 2]], [[50, 51, 3], [52, 3]]
    got = sequence_logprob(model, pre, cont)
    for i, (p, c) in enumerate(zip(pre, cont)):
        x = torch.tensor([p + c])
        with torch.no_grad():
            logp = torch.log_softmax(model(x)[0][0].float(), -1)
        want = sum(logp[len(p) - 1 + j, t] for j, t in enumerate(c)) / len(c)
        assert abs(float(got[i]) - float(want)) < 1e-4
    total = sequence_logprob(model, pre, cont, reduction="sum")
    assert torch.allclose(total, got * torch.tensor([3.0, 2.0]), atol=1e-4)  # the sum over each continuation
    with pytest.raises(CM3LeonError, match="reduction"):
        sequence_logprob(model, pre, cont, reduction="max")


class _Tok:
    """A stand-in text tokenizer: one id per character (enough for prompt layouts)."""

    def encode(self, s):
        return [ord(ch) % 40 for ch in s]

    def decode(self, ids):
        return "".join(chr(48 + i) for i in ids)


def test_prompt_layouts_follow_the_cm3_training_layout():
    b = PromptBuilder(VOCAB, _Tok(), max_seq_len=128, tokens_per_image=4)
    m0, brk, eos = VOCAB.mask_id(0), VOCAB.break_id, VOCAB.eos_id
    img = [VOCAB.image_offset + c for c in (1, 2, 3, 4)]
    t2i = b.text_to_image("ab")
    assert t2i.cond == [eos, *b.text("ab"), brk] and t2i.uncond == [eos, m0, brk]
    cap = b.caption([1, 2, 3, 4], max_new_tokens=8)
    assert cap.cond == [eos, m0, brk, *img, eos, m0]
    vqa = b.vqa([1, 2, 3, 4], " why? ", max_new_tokens=4)
    assert vqa.cond == [eos, *b.text("Question: why? Answer:"), m0, brk, *img, eos, m0]
    ed = b.edit([1, 2, 3, 4], "x")
    assert ed.cond[-len(img) - 3:] == [*img, brk, *b.text("x"), brk]
    assert ed.image_only[-len(img) - 3:] == [*img, brk, m0, brk]
    assert ed.uncond[-4:] == [m0, brk, VOCAB.mask_id(1), brk] and not set(img) & set(ed.uncond)
    assert ed.guidance_streams("edit") == [ed.image_only, ed.uncond]
    region = box_to_region((0.5, 0.0, 1.0, 0.5), (2, 2))  # top-right cell of a 2x2 grid
    assert region.tolist() == [False, True, False, False]
    inf, a, z = b.infill_image([1, 2, 3, 4], region)
    assert (a, z) == (1, 2) and inf.cond == [eos, brk, img[0], m0, *img[2:], eos, m0]


def test_over_long_prompt_is_truncated_with_a_warning_and_empty_prompt_is_an_error():
    b = PromptBuilder(VOCAB, _Tok(), max_seq_len=40, tokens_per_image=16)
    with pytest.warns(UserWarning, match="truncated to 21"):
        tp = b.text_to_image("x" * 100)
    assert len(tp.cond) + 17 == 40 and tp.truncated_tokens == 79
    with pytest.warns(UserWarning, match="question is"):
        vqa = PromptBuilder(VOCAB, _Tok(), max_seq_len=60, tokens_per_image=16).vqa([0] * 16, "y" * 50, 4)
    assert len(vqa.cond) + 4 == 60 and vqa.cond[-21:-19] == b.text(":")[:1] + [VOCAB.mask_id(0)]
    with pytest.raises(CM3LeonError, match="prompt is empty"):
        b.text_to_image("   ")
    with pytest.raises(CM3LeonError, match="question is empty"):
        b.vqa([0] * 16, "", max_new_tokens=4)
    with pytest.raises(CM3LeonError, match="box"):
        box_to_region((0.5, 0.5, 0.2, 1.0), (4, 4))
