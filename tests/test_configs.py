"""Config dataclasses built from dicts refuse unknown keys with a message naming them."""

import pytest

from cm3leon.errors import CM3LeonError
from cm3leon.model.config import ModelConfig
from cm3leon.objectives.cm3 import CM3Config
from cm3leon.sft.mixture import MixtureConfig
from cm3leon.train.config import TrainConfig


@pytest.mark.parametrize("cls, good, what", [
    (ModelConfig, {"vocab_size": 100, "n_layer": 2, "n_head": 2, "d_model": 32}, "model config"),
    (TrainConfig, {"steps": 3}, "train config"),
    (CM3Config, {"poisson_lambda": 0.5}, "CM3 config"),
    (MixtureConfig, {"response_mask_prob": 1.0}, "mixture config"),
])
def test_from_dict_builds_known_fields_and_names_unknown_ones(cls, good, what):
    cfg = cls.from_dict(good)
    assert all(getattr(cfg, k) == v for k, v in good.items())
    with pytest.raises(CM3LeonError, match=rf"{what}: unknown field\(s\) \['typo_field'\]"):
        cls.from_dict({**good, "typo_field": 1})
