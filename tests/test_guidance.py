"""Guidance and samplers as pure functions of hand-made logits."""

import math

import pytest
import torch

from cm3leon.decode.guidance import Guidance, cdk_scores, cfg_logits, dual_cfg_logits
from cm3leon.decode.processors import (
    ImageConstraint,
    ImageInfillConstraint,
    SamplerSettings,
    TextConstraint,
    sample,
    top_k_filter,
    top_p_filter,
)
from cm3leon.errors import CM3LeonError
from cm3leon.tokenizers.vocab import Vocab


def test_cfg_formula_and_scale_one_is_exactly_conditional():
    cond = torch.tensor([[1.0, 2.0, 0.5]])
    uncond = torch.tensor([[0.5, 3.0, 0.5]])
    assert torch.allclose(cfg_logits(cond, uncond, 3.0), uncond + 3.0 * (cond - uncond))
    assert torch.equal(cfg_logits(cond, uncond, 1.0), cond)
    assert torch.equal(cfg_logits(cond, uncond, 0.0), uncond)


def test_dual_guidance_formula_and_unit_scales():
    u, i, f = torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 3.0]])
    got = dual_cfg_logits(u, i, f, image_scale=1.5, text_scale=7.5)
    assert torch.allclose(got, u + 1.5 * (i - u) + 7.5 * (f - i))
    assert torch.equal(dual_cfg_logits(u, i, f, 1.0, 1.0), f)


def test_cdk_keeps_threshold_set_scores_log_ratio_and_neg_inf_elsewhere():
    p_exp = torch.tensor([0.5, 0.3, 0.15, 0.05])
    p_ama = torch.tensor([0.1, 0.6, 0.2, 0.1])
    expert, amateur = p_exp.log()[None], p_ama.log()[None]
    # k=2: 2nd largest p_exp = 0.3; alpha=0.4 -> threshold 0.12 -> keep {0, 1, 2}.
    s = cdk_scores(expert, amateur, alpha=0.4, k=2)[0]
    assert torch.isinf(s[3]) and s[3] < 0
    assert torch.allclose(s[:3], (p_exp.log() - p_ama.log())[:3], atol=1e-6)
    # The contrast, not the expert, picks the winner: token 0 (0.5/0.1) beats token 1 (0.3/0.6).
    assert int(s.argmax()) == 0
    # k=1 is the original CD (threshold alpha * max): 0.4 * 0.5 = 0.2 -> keep {0, 1}.
    s1 = cdk_scores(expert, amateur, alpha=0.4, k=1)[0]
    assert torch.isfinite(s1[:2]).all() and torch.isinf(s1[2:]).all()


def test_cdk_ignores_masked_ids_even_with_fewer_than_k_allowed():
    expert = torch.tensor([[2.0, -math.inf, 1.0, -math.inf]])
    amateur = torch.tensor([[1.0, -math.inf, 1.0, -math.inf]])
    s = cdk_scores(expert, amateur, alpha=0.1, k=10)[0]
    assert torch.isfinite(s[[0, 2]]).all()
    assert torch.isinf(s[[1, 3]]).all() and not torch.isnan(s).any()


def test_cdk_composes_with_temperature():
    expert = torch.tensor([[0.0, 0.1, 0.2, -5.0]])
    amateur = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    scores = Guidance("cdk", cdk_alpha=0.5, cdk_k=1).combine(torch.stack([expert, amateur]), torch.zeros(4))
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(scores, SamplerSettings(temperature=5.0), gen) for _ in range(400)])
    assert set(draws.unique().tolist()) == {0, 1, 2}  # hot sampling spreads over the kept set only
    assert sample(scores, SamplerSettings(temperature=0.0)).item() == 2  # greedy takes the best score


def test_top_k_and_top_p_filters():
    s = torch.tensor([[3.0, 1.0, 2.0, 0.0]])
    assert torch.isinf(top_k_filter(s, 2)[0, [1, 3]]).all() and torch.isfinite(top_k_filter(s, 2)[0, [0, 2]]).all()
    probs = torch.tensor([[0.6, 0.25, 0.1, 0.05]])
    kept = torch.isfinite(top_p_filter(probs.log(), 0.8))[0].tolist()
    assert kept == [True, True, False, False]  # 0.6 < 0.8, 0.6 + 0.25 >= 0.8
    assert torch.isfinite(top_p_filter(probs.log(), 0.1))[0].tolist() == [True, False, False, False]


def test_sampling_is_reproducible_with_a_seed_and_greedy_is_argmax():
    s = torch.randn(3, 50)
    a = sample(s, SamplerSettings(1.0, top_p=0.9), torch.Generator().manual_seed(1))
    b = sample(s, SamplerSettings(1.0, top_p=0.9), torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert torch.equal(sample(s, SamplerSettings(0.0)), s.argmax(-1))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=0), "top_k"),
    ],
)
def test_bad_sampler_settings_name_the_argument(kwargs, name):
    with pytest.raises(CM3LeonError, match=name):
        SamplerSettings(**kwargs)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(cfg_scale=-1.0), "cfg_scale"),
        (dict(cfg_scale=float("inf")), "cfg_scale"),
        (dict(method="cdk", cdk_alpha=0.0), "cdk_alpha"),
        (dict(method="cdk", cdk_alpha=2.0), "cdk_alpha"),
        (dict(method="cdk", cdk_k=0), "cdk_k"),
        (dict(method="edit", image_scale=-2.0), "image_guidance"),
        (dict(method="edit", text_scale=float("nan")), "text_guidance"),
        (dict(method="nope"), "method"),
    ],
)
def test_bad_guidance_settings_name_the_argument(kwargs, name):
    with pytest.raises(CM3LeonError, match=name):
        Guidance(**kwargs)


V = Vocab(text_vocab_size=10, image_vocab_size=6, num_sentinels=2)
PADDED = V.size + 4  # a model vocabulary with 4 padded rows


def _allowed(mask):
    return torch.isfinite(mask).nonzero().flatten().tolist()


def test_image_constraint_only_image_ids_then_break_and_never_padding():
    c = ImageConstraint(V, PADDED, tokens_per_image=3)
    assert c.length == 4
    for step in range(3):
        assert _allowed(c.mask(step, "cpu")) == list(range(V.image_offset, V.size))
    assert _allowed(c.mask(3, "cpu")) == [V.break_id]


def test_text_constraint_excludes_image_ids_sentinels_pad_and_padding_rows():
    c = TextConstraint(V, PADDED)
    allowed = _allowed(c.mask(0, "cpu"))
    assert allowed == [V.eos_id, V.eoss_id] + list(range(V.text_offset, V.image_offset))
    assert c.stop_ids == (V.eos_id, V.eoss_id)


def test_infill_constraint_forces_codes_outside_the_region():
    c = ImageInfillConstraint(V, PADDED, codes=[4, 5, 1], free=[False, True, False])
    assert _allowed(c.mask(0, "cpu")) == [V.image_offset + 4]
    assert _allowed(c.mask(1, "cpu")) == list(range(V.image_offset, V.size))
    assert _allowed(c.mask(2, "cpu")) == [V.image_offset + 1]
    assert c.length == 3


def test_constraint_rejects_a_model_vocabulary_smaller_than_the_layout():
    with pytest.raises(CM3LeonError, match="vocab_size"):
        TextConstraint(V, V.size - 1)
