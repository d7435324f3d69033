"""The decoder: paper init, KV-cached decoding == full forward, left padding, loss, I/O."""

from __future__ import annotations

import pytest
import torch

from cm3leon.errors import CM3LeonError
from cm3leon.model import CM3LeonTransformer, ModelConfig

VOCAB = 101  # not a multiple of 64: exercises the padded vocabulary


def _randomised(config: ModelConfig, seed: int = 0) -> CM3LeonTransformer:
    """A model with every weight non-zero (the paper zero-inits output projections, which
    would hide bugs in the attention and MLP paths)."""
    torch.manual_seed(seed)
    model = CM3LeonTransformer(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def tiny():
    return _randomised(ModelConfig.from_preset("tiny", vocab_size=VOCAB))


def test_init_follows_paper():
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", vocab_size=VOCAB, d_model=64)
    model = CM3LeonTransformer(cfg)
    names = {n for n, _ in model.named_parameters()}
    # No biases, no LayerNorm parameters: only embeddings and projection weights exist.
    assert all(n.endswith("weight") for n in names)
    expected = {"tok_embeddings.weight", "pos_embeddings.weight"} | {
        f"blocks.{i}.{m}.weight" for i in range(cfg.n_layer)
        for m in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.fc1", "mlp.fc2")
    }
    assert names == expected  # tied head: no lm_head
    for i in range(cfg.n_layer):
        assert torch.count_nonzero(model.blocks[i].attn.o_proj.weight) == 0
        assert torch.count_nonzero(model.blocks[i].mlp.fc2.weight) == 0
    w = torch.cat([model.blocks[i].mlp.fc1.weight.flatten() for i in range(cfg.n_layer)]
                  + [model.tok_embeddings.weight.flatten()])
    # trunc-normal at +-3 sigma has std 0.986 sigma
    assert w.std().item() == pytest.approx(0.006 * 0.986, rel=0.05)
    assert w.abs().max().item() <= 3 * 0.006 + 1e-9
    pos = model.pos_embeddings.weight
    assert pos.std().item() == pytest.approx(0.0002 * 0.986, rel=0.05)
    assert pos.abs().max().item() <= 3 * 0.0002 + 1e-9


@pytest.mark.parametrize("code_dim", [8, 200])  # fewer and more codebook dims than d_model (32)
def test_image_embeddings_start_from_the_codebook(code_dim):
    """image_embedding_init: codes with alike codebook vectors start with alike embedding
    rows (nearest neighbours kept), at the asked std; text rows keep the paper's init."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", vocab_size=VOCAB, image_embedding_init=0.05)
    model = CM3LeonTransformer(cfg)
    before = model.tok_embeddings.weight.clone()
    centres = torch.randn(5, code_dim) * 3
    codebook = centres.repeat_interleave(8, 0) + 0.05 * torch.randn(40, code_dim)  # 5 clusters of 8 codes
    model.init_image_embeddings(codebook, image_offset=50, std=0.05)
    rows = model.tok_embeddings.weight[50:90]
    assert torch.equal(model.tok_embeddings.weight[:50], before[:50])
    assert torch.equal(model.tok_embeddings.weight[90:], before[90:])
    assert (rows - before[50:90]).std().item() == pytest.approx(0.05, rel=0.05)
    nearest = torch.cdist(rows, rows).fill_diagonal_(float("inf")).argmin(1)
    assert torch.equal(nearest // 8, torch.arange(40) // 8)  # same cluster as in the codebook
    with pytest.raises(CM3LeonError, match="do not fit"):
        model.init_image_embeddings(codebook, image_offset=80, std=0.05)
    with pytest.raises(CM3LeonError, match="image_embedding_init"):
        ModelConfig.from_preset("tiny", vocab_size=VOCAB, image_embedding_init=-1.0)


def test_logits_have_true_vocab_size_not_padded(tiny):
    assert tiny.tok_embeddings.weight.shape[0] == 128  # padded to a multiple of 64
    logits, loss = tiny(torch.randint(0, VOCAB, (2, 7)))
    assert logits.shape == (2, 7, VOCAB) and loss is None


def test_kv_cached_decoding_matches_full_forward(tiny):
    tokens = torch.randint(0, VOCAB, (3, 24))
    with torch.no_grad():
        full, _ = tiny(tokens)
        tiny.setup_caches(max_batch_size=4, max_seq_len=64)  # larger than needed on purpose
        try:
            steps = [tiny(tokens[:, :10], input_pos=torch.arange(10))[0]]  # prefill
            for t in range(10, 24):  # one token at a time
                steps.append(tiny(tokens[:, t : t + 1], input_pos=torch.tensor([t]))[0])
        finally:
            tiny.reset_caches()
    assert not tiny.has_caches
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def _left_pad(rows: list[torch.Tensor], total: int):
    """Left-padded tokens, per-row positions shifted by the pad count, key mask."""
    B, T = len(rows), max(len(r) for r in rows)
    tokens = torch.zeros(B, T, dtype=torch.long)
    pads = torch.tensor([T - len(r) for r in rows])
    for b, r in enumerate(rows):
        tokens[b, pads[b]:] = r
    position_ids = (torch.arange(T)[None] - pads[:, None]).clamp(min=0)  # (B, T)
    key_ok = torch.arange(total)[None] >= pads[:, None]  # (B, S)
    attn_mask = key_ok[:, None, None, :].expand(B, 1, T, total)  # (B, 1, T, S)
    return tokens, pads, position_ids, attn_mask


def test_left_padded_batch_matches_each_row_alone(tiny):
    torch.manual_seed(1)
    rows = [torch.randint(1, VOCAB, (n,)) for n in (5, 12, 9)]
    tokens, pads, position_ids, attn_mask = _left_pad(rows, total=12)
    with torch.no_grad():
        batched, _ = tiny(tokens, position_ids=position_ids, attn_mask=attn_mask)
        for b, r in enumerate(rows):
            alone, _ = tiny(r[None])
            torch.testing.assert_close(batched[b, pads[b]:], alone[0], atol=1e-5, rtol=1e-5)
        assert torch.isfinite(batched).all()  # pad rows attend to themselves: no NaN


def test_token_with_every_key_masked_still_attends_to_itself(tiny):
    """Pad rows mask all their keys; attending to itself keeps them defined on every
    attention backend (some return NaN for a fully masked row)."""
    tokens = torch.randint(0, VOCAB, (1, 4))
    with torch.no_grad():
        masked, _ = tiny(tokens, attn_mask=torch.zeros(1, 1, 4, 4, dtype=torch.bool))
        for t in range(4):
            alone, _ = tiny(tokens[:, t : t + 1], position_ids=torch.tensor([t]))
            torch.testing.assert_close(masked[:, t], alone[:, 0], atol=1e-5, rtol=1e-5)


def test_left_padded_cached_decoding_matches_each_row_alone(tiny):
    torch.manual_seed(2)
    rows = [torch.randint(1, VOCAB, (n,)) for n in (4, 8)]
    extra = torch.randint(1, VOCAB, (2, 5))  # tokens decoded after the prompts
    S = 16
    tokens, pads, position_ids, attn_mask = _left_pad(rows, total=S)
    T = tokens.size(1)
    with torch.no_grad():
        tiny.setup_caches(2, S)
        try:
            out = [tiny(tokens, input_pos=torch.arange(T), position_ids=position_ids,
                        attn_mask=attn_mask)[0][:, -1:]]
            for i in range(extra.size(1)):
                t = T + i
                out.append(tiny(extra[:, i : i + 1], input_pos=torch.tensor([t]),
                                position_ids=(t - pads)[:, None], attn_mask=attn_mask[:, :, :1])[0])
        finally:
            tiny.reset_caches()
        decoded = torch.cat(out, 1)  # (B, 1 + n_extra, V)
        for b, r in enumerate(rows):
            alone, _ = tiny(torch.cat([r, extra[b]])[None])
            torch.testing.assert_close(decoded[b], alone[0, len(r) - 1 :], atol=1e-5, rtol=1e-5)


def test_loss_is_mean_over_targets_not_minus_100(tiny):
    tokens = torch.randint(0, VOCAB, (2, 9))
    targets = torch.randint(0, VOCAB, (2, 9))
    targets[0, :4] = -100
    targets[1, 7] = -100
    logits, loss = tiny(tokens, targets)
    keep = targets != -100
    expected = torch.nn.functional.cross_entropy(logits[keep].float(), targets[keep])
    torch.testing.assert_close(loss, expected)
    _, none_counted = tiny(tokens, torch.full_like(targets, -100))
    assert none_counted.item() == 0.0


def test_cache_and_length_misuse_are_clear_errors(tiny):
    with pytest.raises(CM3LeonError, match="setup_caches"):
        tiny(torch.zeros(1, 3, dtype=torch.long), input_pos=torch.arange(3))
    with pytest.raises(CM3LeonError, match="max_seq_len"):
        tiny.setup_caches(1, 10_000)
    with pytest.raises(CM3LeonError, match="exceed the model's max_seq_len"):
        tiny(torch.zeros(1, tiny.config.max_seq_len + 1, dtype=torch.long))
    tiny.setup_caches(1, 8)
    try:
        with pytest.raises(CM3LeonError, match="max_batch_size"):
            tiny(torch.zeros(2, 1, dtype=torch.long), input_pos=torch.tensor([0]))
    finally:
        tiny.reset_caches()


def test_7b_preset_on_meta_has_about_7b_parameters():
    with torch.device("meta"):
        model = CM3LeonTransformer(ModelConfig.from_preset("7b"))
    assert 6.6e9 < model.num_parameters() < 7.0e9
    assert model.tok_embeddings.weight.is_meta


def test_presets_match_paper_sizes():
    for name, layers, width, head_dim in (("350m", 24, 1024, 64), ("760m", 24, 1536, 96), ("7b", 32, 4096, 128)):
        c = ModelConfig.from_preset(name)
        assert (c.n_layer, c.d_model, c.head_dim, c.max_seq_len) == (layers, width, head_dim, 4096)
    with torch.device("meta"):
        demo = CM3LeonTransformer(ModelConfig.from_preset("demo", vocab_size=1600))
    assert 3e6 < demo.num_parameters() < 8e6
    with pytest.raises(CM3LeonError, match="vocab_size"):
        ModelConfig.from_preset("tiny")
    with pytest.raises(CM3LeonError, match="unknown model preset"):
        ModelConfig.from_preset("13b", vocab_size=10)
    with pytest.raises(CM3LeonError, match="divisible"):
        ModelConfig(vocab_size=10, d_model=30, n_head=4)
    with pytest.raises(CM3LeonError, match="bogus"):
        ModelConfig.from_dict({"vocab_size": 10, "bogus": 1})


def test_save_load_round_trip_is_exact_and_keeps_other_files(tiny, tmp_path):
    (tmp_path / "vocab.json").write_text("{}")
    tiny.save_pretrained(tmp_path)
    loaded = CM3LeonTransformer.from_pretrained(tmp_path)
    assert (tmp_path / "vocab.json").read_text() == "{}"
    assert loaded.config == tiny.config
    for (n, a), (m, b) in zip(tiny.state_dict().items(), loaded.state_dict().items()):
        assert n == m and torch.equal(a, b)
    tokens = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        assert torch.equal(tiny(tokens)[0], loaded(tokens)[0])


def test_untied_head_round_trip(tmp_path):
    model = _randomised(ModelConfig.from_preset("tiny", vocab_size=VOCAB, tie_embeddings=False))
    assert model.lm_head is not None
    model.save_pretrained(tmp_path)
    loaded = CM3LeonTransformer.from_pretrained(tmp_path, dtype=torch.float64)
    assert loaded.lm_head.weight.dtype == torch.float64
    torch.testing.assert_close(loaded.lm_head.weight.float(), model.lm_head.weight)


def test_gradient_checkpointing_gives_same_gradients():
    model = _randomised(ModelConfig.from_preset("tiny", vocab_size=VOCAB)).train()
    tokens = torch.randint(0, VOCAB, (2, 10))
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        model(tokens, tokens)[1].backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_tiny_model_overfits_a_fixed_batch():
    torch.manual_seed(0)
    model = CM3LeonTransformer(ModelConfig.from_preset("tiny", vocab_size=VOCAB)).train()
    tokens = torch.randint(0, VOCAB, (4, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.98), weight_decay=0.0)
    losses = []
    for _ in range(40):
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(torch.log(torch.tensor(float(VOCAB))).item(), abs=0.1)
    assert losses[-1] < 0.3 * losses[0]


def test_a_damaged_model_directory_names_the_file(tmp_path):
    import json as _json

    from cm3leon.errors import CM3LeonError

    model = CM3LeonTransformer(ModelConfig.from_preset("tiny", vocab_size=64))
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(_json.dumps([1, 2]))
    with pytest.raises(CM3LeonError, match=r"m/config.json: "):
        CM3LeonTransformer.from_pretrained(tmp_path / "m")
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(CM3LeonError, match=r"m/model.safetensors: model weights file truncated or corrupt"):
        CM3LeonTransformer.from_pretrained(tmp_path / "m")


def test_gated_mlp_is_swiglu_with_the_plain_mlps_parameters():
    """`glu=True` is the SwiGLU MLP, fc2(silu(gate(x)) * fc1(x)), at 8/3 of d_model (rounded up
    to 64) so a gated model has the plain one's parameters; cached decoding stays exact."""
    plain = ModelConfig.from_preset("demo-small", vocab_size=VOCAB)
    gated = ModelConfig.from_preset("demo-small", vocab_size=VOCAB, glu=True, activation="silu")
    assert gated.ffn_dim == 512 and plain.ffn_dim == 768
    count = lambda c: sum(p.numel() for p in CM3LeonTransformer(c).parameters())  # noqa: E731
    assert count(gated) == count(plain)
    model = _randomised(ModelConfig.from_preset("tiny", vocab_size=VOCAB, glu=True, activation="silu"))
    mlp = model.blocks[0].mlp
    x = torch.randn(2, 5, model.config.d_model)
    expected = mlp.fc2(torch.nn.functional.silu(mlp.gate(x)) * mlp.fc1(x))
    torch.testing.assert_close(mlp(x), expected)
    assert model.blocks[0].mlp.gate.weight.shape == (model.config.ffn_dim, model.config.d_model)
    fresh = CM3LeonTransformer(model.config)
    assert fresh.blocks[0].mlp.fc2.weight.abs().sum() == 0  # the down-projection still starts at 0
    assert fresh.blocks[0].mlp.gate.weight.std() > 0
    tokens = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        full, _ = model(tokens)
        model.setup_caches(max_batch_size=1, max_seq_len=16)
        try:
            step = torch.cat([model(tokens[:, i:i + 1], input_pos=torch.tensor([i]))[0] for i in range(12)], 1)
        finally:
            model.reset_caches()
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)


def test_gated_mlp_round_trips_and_refuses_opt_export(tmp_path):
    from cm3leon.convert.hf_opt import opt_config

    model = _randomised(ModelConfig.from_preset("tiny", vocab_size=VOCAB, glu=True, activation="silu"))
    model.save_pretrained(tmp_path)
    loaded = CM3LeonTransformer.from_pretrained(tmp_path)
    assert loaded.config.glu
    torch.testing.assert_close(loaded.blocks[1].mlp.gate.weight, model.blocks[1].mlp.gate.weight)
    with pytest.raises(CM3LeonError, match="glu=true"):
        opt_config(model.config)
    with pytest.raises(CM3LeonError, match="ModelConfig.glu"):
        ModelConfig.from_preset("tiny", vocab_size=VOCAB, glu="yes")
