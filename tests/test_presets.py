"""Every preset table is read one way (`cm3leon.utils.presets.lookup`): exact names, and an
unknown name is the project's error listing the known ones, whichever table it is."""

import pytest

from cm3leon.errors import CM3LeonError


def _calls():
    from cm3leon.run.config import get_pipeline_preset
    from cm3leon.model.config import ModelConfig
    from cm3leon.sft.cli import run_sft
    from cm3leon.tokenizers.image import get_preset
    from cm3leon.tokenizers.image_train import train_image_tokenizer
    from cm3leon.tokenizers.text import resolve_vocab_size
    from cm3leon.train.config import TrainConfig

    return {
        "pipeline": lambda n: get_pipeline_preset(n),
        "model": lambda n: ModelConfig.from_preset(n, vocab_size=64),
        "train": lambda n: TrainConfig.from_preset(n),
        "SFT": lambda n: run_sft("unused", "unused", "unused", preset=n),
        "image tokenizer": lambda n: get_preset(n),
        "image tokenizer training": lambda n: train_image_tokenizer("unused", "unused", preset=n,
                                                                    config=get_preset("tiny")),
        "vocabulary size": lambda n: resolve_vocab_size(n),
    }


@pytest.mark.parametrize("kind", list(_calls()))
def test_an_unknown_preset_name_is_refused_with_the_known_names(kind):
    call = _calls()[kind]
    with pytest.raises(CM3LeonError, match=rf"unknown {kind}.* preset 'Demo'; choose one of \["):
        call("Demo")  # names match exactly: no case folding


def test_the_paper_presets_are_found_by_their_names():
    calls = _calls()
    assert calls["model"]("350m").d_model == 1024
    assert calls["train"]("7b") is not None
    assert calls["image tokenizer"]("cm3leon").codebook_size == 8192
    assert calls["vocabulary size"]("paper") == 56_320
    assert calls["vocabulary size"]("300") == 300
