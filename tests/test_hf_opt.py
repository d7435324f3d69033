"""HF OPT interop: export -> transformers gives our logits, import gives theirs, bad configs refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cm3leon.cli import main
from cm3leon.convert.hf_opt import export_hf, import_hf
from cm3leon.errors import CM3LeonError
from cm3leon.model import CM3LeonTransformer, ModelConfig

transformers = pytest.importorskip("transformers")

VOCAB = 90  # padded to 128 inside our model; the export must keep exactly 90 rows


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Non-zero weights everywhere (the paper zero-inits output projections)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.2)


def _ours(seed: int = 0, **overrides) -> CM3LeonTransformer:
    model = CM3LeonTransformer(ModelConfig.from_preset("tiny", vocab_size=VOCAB, max_seq_len=32, **overrides))
    _randomise(model, seed)
    return model.eval()


def _opt_config(**overrides):
    values = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                  max_position_embeddings=32, enable_bias=False, layer_norm_elementwise_affine=False,
                  do_layer_norm_before=True, word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0,
                  pad_token_id=0, bos_token_id=1, eos_token_id=1)
    values.update(overrides)
    return transformers.OPTConfig(**values)


@pytest.mark.parametrize("tie", [True, False])
def test_export_loads_in_transformers_with_same_logits(tmp_path, tie):
    model = _ours(tie_embeddings=tie, activation="gelu" if tie else "relu")
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    (model_dir / "vocab.json").write_text("{}")  # side files are copied as they are
    (model_dir / "image_tokenizer").mkdir()
    (model_dir / "image_tokenizer" / "config.json").write_text("{}")
    info = export_hf(model_dir, tmp_path / "hf")
    assert sorted(info["copied"]) == ["image_tokenizer", "vocab.json"]  # no text tokenizer: no tokenizer.json
    assert (tmp_path / "hf" / "image_tokenizer" / "config.json").is_file()

    hf = transformers.OPTForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        theirs = hf(tokens).logits
        ours, _ = model(tokens)
    assert theirs.shape == ours.shape == (2, 20, VOCAB)  # padded rows are not exported
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_left_padded_batch_matches_transformers_attention_mask_positions(tmp_path):
    """OPT derives positions from attention_mask (cumsum - 1, offset 2); our explicit
    position_ids + attn_mask must give the same logits on the real tokens."""
    model = _ours(seed=3)
    export_hf(model, tmp_path / "hf")
    hf = transformers.OPTForCausalLM.from_pretrained(tmp_path / "hf").eval()
    T, pads = 12, torch.tensor([0, 5])
    tokens = torch.randint(1, VOCAB, (2, T))
    tokens[1, :5] = 0
    keep = torch.arange(T)[None] >= pads[:, None]  # (B, T)
    position_ids = (torch.arange(T)[None] - pads[:, None]).clamp(min=0)
    with torch.no_grad():
        theirs = hf(tokens, attention_mask=keep.long()).logits
        ours, _ = model(tokens, position_ids=position_ids, attn_mask=keep[:, None, None, :].expand(2, 1, T, T))
    torch.testing.assert_close(theirs[keep], ours[keep], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tie", [True, False])
def test_import_from_transformers_gives_same_logits(tmp_path, tie):
    torch.manual_seed(0)
    hf = transformers.OPTForCausalLM(_opt_config(tie_word_embeddings=tie)).eval()
    _randomise(hf, seed=1)
    if tie:
        assert hf.lm_head.weight.data_ptr() == hf.model.decoder.embed_tokens.weight.data_ptr()
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "vocab.json").write_text("{}")
    info = import_hf(tmp_path / "hf", tmp_path / "ours")
    assert info["copied"] == ["vocab.json"]
    model = CM3LeonTransformer.from_pretrained(tmp_path / "ours")
    assert model.config.tie_embeddings is tie and model.config.max_seq_len == 32
    tokens = torch.randint(0, VOCAB, (2, 32))  # the full context: checks the offset-2 rows
    with torch.no_grad():
        torch.testing.assert_close(model(tokens)[0], hf(tokens).logits, atol=1e-5, rtol=1e-5)


def test_import_reads_legacy_bin_checkpoint_with_decoder_prefix(tmp_path):
    """facebook/opt-* checkpoints are pytorch_model.bin with `decoder.*` keys (no `model.`)."""
    hf = transformers.OPTForCausalLM(_opt_config()).eval()
    _randomise(hf, seed=2)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(hf.config.to_json_string())
    legacy = {k.removeprefix("model."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    torch.save(legacy, tmp_path / "hf" / "pytorch_model.bin")
    import_hf(tmp_path / "hf", tmp_path / "ours", dtype="bfloat16")
    model = CM3LeonTransformer.from_pretrained(tmp_path / "ours")
    assert model.tok_embeddings.weight.dtype == torch.bfloat16
    tokens = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(model.float()(tokens)[0], hf(tokens).logits, atol=0.1, rtol=0.05)


def test_export_then_import_round_trip_is_exact(tmp_path):
    model = _ours(seed=5, tie_embeddings=False)
    model.save_pretrained(tmp_path / "model")
    assert main(["export", "hf", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "hf")]) == 0
    assert main(["import", "hf", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    back = CM3LeonTransformer.from_pretrained(tmp_path / "back")
    assert back.config == model.config  # fields OPT has no name for survive via config["cm3leon"]
    for (name, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        if name in ("tok_embeddings.weight", "lm_head.weight"):
            assert torch.equal(a[:VOCAB], b[:VOCAB]) and not b[VOCAB:].any()  # pad rows re-zeroed
        else:
            assert torch.equal(a, b), name
    # export -> import -> export writes the same bytes
    assert main(["export", "hf", "--model", str(tmp_path / "back"), "--out", str(tmp_path / "hf2")]) == 0
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "hf" / name).read_bytes() == (tmp_path / "hf2" / name).read_bytes(), name


@pytest.mark.parametrize("field, value, message", [
    ("enable_bias", True, "enable_bias must be false"),
    ("layer_norm_elementwise_affine", True, "layer_norm_elementwise_affine must be false"),
    ("do_layer_norm_before", False, "pre-LN"),
    ("word_embed_proj_dim", 16, "word_embed_proj_dim"),
    ("activation_function", "tanh", "activation_function"),
    ("model_type", "gpt2", "expected 'opt'"),
])
def test_mismatched_opt_config_is_refused_with_clear_error(tmp_path, field, value, message):
    config = _opt_config().to_dict()
    config[field] = value
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CM3LeonError, match=message):
        import_hf(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # The CLI prints the message and exits 2 instead of a traceback.
    assert main(["import", "hf", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "out")]) == 2


def test_opt_config_without_bias_fields_is_refused(tmp_path):
    """OPT's own defaults are biases on and affine LayerNorm: a config that omits them is
    a different architecture."""
    config = {"model_type": "opt", "hidden_size": 32, "num_attention_heads": 4}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CM3LeonError, match="enable_bias.*layer_norm_elementwise_affine"):
        import_hf(tmp_path, tmp_path / "out")


@pytest.mark.parametrize("segments", [False, True])
def test_transformers_generate_with_the_cm3leon_processors_draws_our_image(tmp_path, tiny_model_dir_factory,
                                                                           segments):
    """The README's recipe: generate + BatchedCFGLogitsProcessor writes the same image codes as
    CM3Leon.sample_images, greedy and sampled with the same seed; a model with segment positions
    through CM3LeonOPTForCausalLM (plain OPT positions would differ)."""
    from transformers import LogitsProcessorList, OPTForCausalLM

    from cm3leon.api import CM3Leon
    from cm3leon.hf import BatchedCFGLogitsProcessor, CM3LeonOPTForCausalLM, build_image_prompt, codes_to_image
    from cm3leon.tokenizers.vocab import Vocab

    texts = ["a red circle", "a blue square on the left", "two green triangles"]
    model_dir = tiny_model_dir_factory(tmp_path / "m", texts * 4, weight_std=0.05, seed=3)
    if segments:  # the CPU presets' positions: they restart at every <break> / <eos>
        cfg = json.loads((model_dir / "config.json").read_text())
        v = Vocab.load(model_dir)
        cfg.update(segment_positions=16, segment_delimiters=[v.eos_id, v.break_id])
        (model_dir / "config.json").write_text(json.dumps(cfg))
    export_hf(model_dir, tmp_path / "hf")
    hf = CM3LeonOPTForCausalLM.from_pretrained(tmp_path / "hf").eval()
    plain = OPTForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours = CM3Leon.from_pretrained(model_dir)
    prompts = ["a red circle", "a blue square on the left"]
    batch = build_image_prompt(tmp_path / "hf", prompts)
    for temperature, seed in ((0.0, None), (1.0, 11)):
        samples = ours.sample_images(prompts, method="cfg", cfg_scale=2.5, temperature=temperature,
                                           top_p=0.9, seed=seed if seed is not None else 0, num_retrieved=0)
        for model, same in ((hf, True), (plain, not segments)):
            cfg = BatchedCFGLogitsProcessor(2.5, batch.constraint, temperature=temperature, top_p=0.9, seed=seed)
            with torch.no_grad():
                out = model.generate(batch.input_ids, attention_mask=batch.attention_mask, do_sample=False,
                                     max_new_tokens=batch.length, logits_processor=LogitsProcessorList([cfg]))
            new = out[:, batch.prompt_length:]
            assert torch.equal(new[: len(prompts)], new[len(prompts):])  # both streams of a pair continue alike
            assert bool((new[:, -1] == ours.vocab.break_id).all())
            theirs = (new[: len(prompts), :-1] - ours.vocab.image_offset).tolist()
            assert (theirs == [list(s.codes) for s in samples]) == same
    images = codes_to_image(tmp_path / "hf", new[: len(prompts)])
    assert len(images) == 2 and images[0].size == (ours.resolution, ours.resolution)


def test_the_readme_snippet_runs(tmp_path, tiny_model_dir_factory):
    import re

    from cm3leon.api import CM3Leon

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    block = readme.split("### Image generation in `transformers`", 1)[1]
    code = re.search(r"```python\n(.*?)```", block, re.S).group(1)
    model_dir = tiny_model_dir_factory(tmp_path / "m", ["a large red circle", "a small blue square"] * 4,
                                       weight_std=0.05)
    export_hf(model_dir, tmp_path / "hf")
    scope: dict = {}
    exec(compile(code.replace('"runs/hf"', repr(str(tmp_path / "hf"))), "README.md", "exec"), scope)
    m = CM3Leon.from_pretrained(model_dir)
    ours = m.sample_images(["a large red circle", "a small blue square"], method="cfg", cfg_scale=1.5,
                                 temperature=1.0, top_p=0.9, seed=0, num_retrieved=0)
    theirs = scope["out"][:2, scope["batch"].prompt_length:-1] - m.vocab.image_offset
    assert [list(s.codes) for s in ours] == theirs.tolist()
    assert len(scope["images"]) == 2


def test_hf_helpers_refuse_bad_input(tmp_path, tiny_model_dir_factory):
    from cm3leon.errors import CM3LeonError
    from cm3leon.hf import BatchedCFGLogitsProcessor, build_image_prompt, codes_to_image

    export_hf(tiny_model_dir_factory(tmp_path / "m", ["a red circle"] * 8), tmp_path / "hf")
    with pytest.raises(CM3LeonError, match="conditional \\+ unconditional"):
        BatchedCFGLogitsProcessor(3.0)(torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, 10))
    with pytest.raises(CM3LeonError, match="image codes per row"):
        codes_to_image(tmp_path / "hf", torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(CM3LeonError, match="no prompts"):
        build_image_prompt(tmp_path / "hf", [])


def test_export_writes_a_unified_tokenizer_and_generation_config(tmp_path, tiny_model_dir_factory):
    """AutoTokenizer on the export encodes text to the model's own ids; the image tokens and
    specials are named; generation_config.json holds an image's length."""
    from transformers import AutoTokenizer, GenerationConfig

    from cm3leon.api import CM3Leon

    model_dir = tiny_model_dir_factory(tmp_path / "m", ["a red circle on the left", "two blue squares"] * 4)
    export_hf(model_dir, tmp_path / "hf")
    ours = CM3Leon.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in ("a red circle on the left", "two blue squares", "an unseen wörd"):
        assert tok.encode(text, add_special_tokens=False) == ours.prompts.text(text)
        assert tok.decode(ours.prompts.text(text)) == text
    v = ours.vocab
    assert tok.convert_tokens_to_ids(["<pad>", "<eos>", "<break>", "<eoss>", "<mask:0>", "<img:0>"]) == \
        [v.pad_id, v.eos_id, v.break_id, v.eoss_id, v.mask_id(0), v.image_offset]
    assert len(tok) == v.size
    gen = GenerationConfig.from_pretrained(tmp_path / "hf")
    assert gen.max_new_tokens == ours.tokens_per_image + 1 and gen.eos_token_id == v.eos_id


def test_export_carries_the_model_directorys_cfg_scale(tmp_path, tiny_model_dir_factory):
    """generation_config.json's CFG scale is the model directory's decoding.json one (what the
    model was measured to draw best with), else the decoder's default."""
    import json

    from cm3leon.decode.config import DECODING_FILE, DecodingConfig

    model_dir = tiny_model_dir_factory(tmp_path / "m", ["a red circle on the left", "two blue squares"] * 4)
    export_hf(model_dir, tmp_path / "plain")
    assert json.loads((tmp_path / "plain" / "generation_config.json").read_text())["cm3leon"]["cfg_scale"] == \
        DecodingConfig.cfg_scale
    (model_dir / DECODING_FILE).write_text(json.dumps({"cfg_scale": 1.5, "temperature": 0.5, "num_retrieved": 0}))
    export_hf(model_dir, tmp_path / "tuned")
    tuned = json.loads((tmp_path / "tuned" / "generation_config.json").read_text())["cm3leon"]
    assert tuned["cfg_scale"] == 1.5 and tuned["temperature"] == 0.5
