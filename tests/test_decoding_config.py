"""`DecodingConfig`: the one place text->image decoding settings live (defaults, checks,
model directory defaults, CLI flags)."""

import argparse

import pytest

from cm3leon.decode.config import (DECODING_FILE, EDIT_KEYS, FIELDS, MODEL_KEYS, TASK_ONLY_KEYS, DecodingConfig,
                                   add_arguments, given, read_model_decoding, write_model_decoding)
from cm3leon.decode.guidance import Guidance
from cm3leon.errors import CM3LeonError


def test_defaults_are_the_papers_and_the_decoders():
    d = DecodingConfig()
    assert (d.method, d.cfg_scale, d.num_retrieved, d.top_p) == ("cfg", 3.0, 2, 0.9)
    g = Guidance()
    assert (d.cfg_scale, d.cdk_alpha, d.cdk_k) == (g.cfg_scale, g.cdk_alpha, g.cdk_k)  # one default, not two


def test_replace_keeps_what_is_not_given_and_refuses_unknown_names():
    d = DecodingConfig(cfg_scale=1.5)
    assert d.replace(cfg_scale=None, method=None) is d
    assert d.replace(method="cdk").cfg_scale == 1.5
    with pytest.raises(CM3LeonError, match="cfg_sclae"):
        d.replace(cfg_sclae=2.0)


@pytest.mark.parametrize("field, value", [
    ("method", "beam"), ("scorer", "vibes"), ("temperature", -1.0), ("top_p", 1.5), ("top_k", 0),
    ("cfg_scale", float("inf")), ("cfg_scale", True), ("cdk_alpha", 0.0), ("cdk_k", 0),
    ("num_candidates", 0), ("num_retrieved", -1), ("num_retrieved", 2.0),
])
def test_a_bad_value_is_refused_naming_the_field(field, value):
    with pytest.raises(CM3LeonError, match=field):
        DecodingConfig().replace(**{field: value})


def test_the_decoder_gets_the_methods_guidance_and_sampler():
    d = DecodingConfig(cfg_scale=2.0, top_p=0.8, cdk_k=3)
    assert d.guidance("topp") is None
    assert d.guidance().cfg_scale == 2.0 and d.guidance("cdk").cdk_k == 3
    assert d.sampler().top_p == 0.8 and d.sampler("cdk").top_p is None  # CD-K's plausibility set replaces top-p


def test_a_model_directory_keeps_its_model_keys(tmp_path):
    assert read_model_decoding(tmp_path) == {}
    write_model_decoding(tmp_path, DecodingConfig(method="best_of_n", num_candidates=4, cfg_scale=1.5,
                                                  num_retrieved=0, cdk_k=1, temperature=0.5, top_p=0.5,
                                                  image_guidance=1.0, text_guidance=1.5, caption_candidates=8,
                                                  edit_candidates=4, answer_candidates=6, scorer="likelihood"))
    assert (tmp_path / DECODING_FILE).is_file()
    # the method and its N, the sampling temperature, editing's scales, captioning's and editing's
    # candidates and how candidates are ranked are the model's (chosen by its sweeps and validation runs); top-p
    # is the call's
    own = {"method": "best_of_n", "cfg_scale": 1.5, "temperature": 0.5, "num_retrieved": 0, "cdk_k": 1,
           "num_candidates": 4, "image_guidance": 1.0, "text_guidance": 1.5, "caption_candidates": 8,
           "edit_candidates": 4, "answer_candidates": 6, "scorer": "likelihood"}
    assert read_model_decoding(tmp_path) == own
    d = DecodingConfig.from_model_dir(tmp_path)
    assert d.model_defaults() == own and d.edit_guidance().to_dict() == {
        "method": "edit", "image_guidance": 1.0, "text_guidance": 1.5}
    assert d.top_p == DecodingConfig.top_p and d.method == "best_of_n" and d.num_candidates == 4
    assert set(MODEL_KEYS) <= FIELDS
    # a decoding.json written before the method was a model key still reads (the method stays the default's)
    (tmp_path / DECODING_FILE).write_text('{"cfg_scale": 2.0}')
    assert DecodingConfig.from_model_dir(tmp_path).method == DecodingConfig.method
    (tmp_path / DECODING_FILE).write_text('{"method": "beam"}')
    with pytest.raises(CM3LeonError, match="method must be one of"):
        read_model_decoding(tmp_path)


def test_cli_flags_are_made_from_the_fields_and_unset_flags_are_not_given():
    p = argparse.ArgumentParser()
    add_arguments(p)
    assert given(p.parse_args([])) == {}  # the model's decoding.json then applies
    args = p.parse_args(["--method", "best_of_n", "--cfg-scale", "2", "--num-candidates", "4", "--top-k", "5"])
    assert given(args) == {"method": "best_of_n", "cfg_scale": 2.0, "num_candidates": 4, "top_k": 5}
    flags = {a.dest for a in p._actions} - {"help"}
    assert flags == FIELDS  # a new field gets its flag everywhere the flags are added
    q = argparse.ArgumentParser()
    add_arguments(q, skip=("method", "num_candidates"))
    assert {a.dest for a in q._actions} - {"help"} == FIELDS - {"method", "num_candidates"}


@pytest.mark.parametrize("argv", [["generate", "image"], ["eval", "model"], ["eval", "sweep"], ["generate", "caption"],
                                  ["generate", "edit"], ["generate", "vqa"]])
def test_every_decoding_command_offers_the_configs_flags(argv, capsys):
    from cm3leon.cli import main

    with pytest.raises(SystemExit):
        main([*argv, "-h"])
    text = capsys.readouterr().out
    task_only = {k for ks in TASK_ONLY_KEYS.values() for k in ks}
    if argv[1] in ("caption", "edit", "vqa"):  # a text or edit command: its own options only
        skip = FIELDS - ({"caption_candidates", "scorer"} if argv[1] == "caption" else set(TASK_ONLY_KEYS[argv[1]]))
    elif argv[1] == "model":  # the evaluation writes captions, answers and edits too
        skip = set()
    else:  # text->image only
        skip = task_only | ({"method", "num_candidates"} if argv[1] == "sweep" else set())
    for name in FIELDS - skip:
        assert "--" + name.replace("_", "-") in text, (argv, name)
    for name in task_only & skip:
        assert "--" + name.replace("_", "-") not in text, (argv, name)
