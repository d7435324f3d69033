"""VQ image tokenizer: quantizer invariants, shapes and errors, persistence, taming / Chameleon
checkpoint parity, codebook maintenance, and a tiny training run that resumes exactly."""

import argparse
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from cm3leon.errors import CM3LeonError
from cm3leon.convert.taming import load_taming_vqgan
from cm3leon.tokenizers.image import PRESETS, VQConfig, VQModel, as_8bit, get_preset, images_to_tensor, tensor_to_images
from cm3leon.tokenizers.image_metrics import codebook_stats

TINY = dict(resolution=16, base_channels=8, channel_multipliers=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
            z_channels=8, embed_dim=4, codebook_size=32, norm_groups=4)


def tiny_model(seed=0, **kw) -> VQModel:
    torch.manual_seed(seed)
    return VQModel(VQConfig(**{**TINY, **kw})).eval()


def rand_images(n=3, side=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, side, side, generator=g) * 2 - 1


def write_shapes(folder, n=48, side=16, seed=0):
    """A small captioned dataset in the folder + captions.jsonl layout."""
    rng = random.Random(seed)
    colors = {"red": (220, 30, 30), "blue": (40, 70, 220), "green": (30, 170, 60), "yellow": (240, 210, 20)}
    (folder / "images").mkdir(parents=True)
    with open(folder / "captions.jsonl", "w") as f:
        for i in range(n):
            im = Image.new("RGB", (side, side), "white")
            d = ImageDraw.Draw(im)
            c = rng.choice(list(colors))
            r = rng.randint(3, 6)
            x, y = rng.randint(r, side - r), rng.randint(r, side - r)
            shape = rng.choice(["circle", "square"])
            (d.ellipse if shape == "circle" else d.rectangle)([x - r, y - r, x + r, y + r], fill=colors[c])
            im.save(folder / "images" / f"{i:03d}.png")
            split = "train" if i < n - 8 else "val"
            f.write(json.dumps({"image": f"images/{i:03d}.png", "text": f"a {c} {shape}", "split": split}) + "\n")
    return folder


# --- quantizer invariants ----------------------------------------------------------------------


@pytest.mark.parametrize("codebook_type", ["nearest", "cosine", "ema"])
def test_quantized_latent_equals_codebook_lookup_of_returned_indices(codebook_type):
    m = tiny_model(codebook_type=codebook_type)
    z_q, losses, idx = m.encode_latents(rand_images())
    assert idx.shape == (3, 8, 8) and idx.dtype == torch.long
    torch.testing.assert_close(z_q, m.quantize.lookup(idx))
    # and each index is the nearest code of its latent
    z = m.quant_conv(m.encoder(rand_images()))
    z_flat = m.quantize._prepare(z.permute(0, 2, 3, 1).reshape(-1, 4))
    d = torch.cdist(z_flat, m.quantize.codebook())
    assert torch.equal(d.argmin(1), idx.reshape(-1))
    assert set(losses) == {"codebook", "commitment", "quant"}


def test_decode_of_codes_equals_decoder_on_quantized_latent():
    m = tiny_model()
    x = rand_images()
    z_q, _, codes = m.encode_latents(x)
    torch.testing.assert_close(m.decode(codes), m.decode_latents(z_q).clamp(-1, 1))


def test_encode_decode_shapes_and_batching():
    m = tiny_model()
    x = rand_images(5)
    codes = m.encode(x)
    assert codes.shape == (5, *m.config.grid) and m.config.tokens_per_image == 64
    one_by_one = torch.cat([m.encode(x[i:i + 1]) for i in range(5)])
    assert torch.equal(codes, one_by_one)
    out = m.decode(codes.reshape(5, -1))  # flat codes are accepted too
    assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1
    torch.testing.assert_close(out, m.decode(codes))
    recon, losses, c2 = m(x)
    assert recon.shape == x.shape and torch.equal(c2, codes)


def test_bad_inputs_raise_clear_errors():
    m = tiny_model()
    with pytest.raises(CM3LeonError, match="expects 16x16"):
        m.encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(CM3LeonError, match="channels"):
        m.encode(torch.zeros(1, 1, 16, 16))
    with pytest.raises(CM3LeonError, match=r"\[-1, 1\]"):
        m.encode(torch.full((1, 3, 16, 16), 255.0))
    with pytest.raises(CM3LeonError, match=r"\[0, 32\)"):
        m.decode(torch.full((1, 8, 8), 32))
    with pytest.raises(CM3LeonError, match=r"\[0, 32\)"):
        m.decode(torch.full((1, 64), -1))
    with pytest.raises(CM3LeonError, match="shape"):
        m.decode(torch.zeros(1, 7, 7, dtype=torch.long))
    with pytest.raises(CM3LeonError, match="integer"):
        m.decode(torch.zeros(1, 8, 8))


def test_config_validation_and_presets():
    with pytest.raises(CM3LeonError, match="codebook_type"):
        VQConfig(**{**TINY, "codebook_type": "gumbel"})
    with pytest.raises(CM3LeonError, match="norm_groups"):
        VQConfig(**{**TINY, "norm_groups": 3})
    with pytest.raises(CM3LeonError, match="divisible"):
        VQConfig(**{**TINY, "resolution": 15})
    with pytest.raises(CM3LeonError, match="unknown image tokenizer preset"):
        get_preset("nope")
    paper = PRESETS["cm3leon"]  # paper: 256 px -> 32x32 = 1,024 codes from 8,192
    assert (paper.resolution, paper.grid, paper.tokens_per_image, paper.codebook_size) == (256, (32, 32), 1024, 8192)
    cham = PRESETS["chameleon"]  # Chameleon vqgan.yaml: 512 px, f=16
    assert (cham.downsample_factor, cham.tokens_per_image, cham.codebook_type) == (16, 1024, "nearest")
    assert PRESETS["demo32"].grid == (8, 8)


def test_images_tensor_round_trip_is_exact():
    ims = [Image.new("RGB", (16, 16), (i * 40, 255 - i * 30, 7)) for i in range(3)]
    back = tensor_to_images(images_to_tensor(ims))
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(back, ims))
    with pytest.raises(CM3LeonError, match="different sizes"):
        images_to_tensor([Image.new("RGB", (8, 8)), Image.new("RGB", (16, 16))])
    assert images_to_tensor([Image.new("L", (20, 20))], size=16).shape == (1, 3, 16, 16)


# --- persistence and real checkpoints --------------------------------------------------------


@pytest.mark.parametrize("codebook_type", ["cosine", "ema"])
def test_save_load_round_trip_gives_identical_outputs(tmp_path, codebook_type):
    m = tiny_model(codebook_type=codebook_type)
    m.save_pretrained(tmp_path / "vq")
    again = VQModel.from_pretrained(tmp_path / "vq")
    x = rand_images()
    assert again.config == m.config
    assert torch.equal(again.encode(x), m.encode(x))
    torch.testing.assert_close(again.decode(m.encode(x)), m.decode(m.encode(x)), rtol=0, atol=0)
    assert json.loads((tmp_path / "vq" / "config.json").read_text())["grid"] == [8, 8]


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        VQModel.from_pretrained(tmp_path)
    tiny_model().save_pretrained(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    cfg["codebook_size"] = 16
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CM3LeonError, match="wrong shape"):
        VQModel.from_pretrained(tmp_path / "a")


def _chameleon_pair():
    from transformers.models.chameleon.configuration_chameleon import ChameleonVQVAEConfig
    from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAE

    torch.manual_seed(0)
    hc = ChameleonVQVAEConfig(embed_dim=8, num_embeddings=64, latent_channels=32, resolution=32, base_channels=32,
                              channel_multiplier=[1, 2], num_res_blocks=1, attn_resolutions=[16])
    hf = ChameleonVQVAE(hc).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    ours = VQModel(VQConfig(resolution=32, base_channels=32, channel_multipliers=(1, 2), num_res_blocks=1,
                            attn_resolutions=(16,), z_channels=32, embed_dim=8, codebook_size=64,
                            codebook_type="nearest", norm_groups=32)).eval()
    return hf, ours


def test_taming_layout_parity_with_transformers_chameleon_vqvae():
    hf, ours = _chameleon_pair()
    state = ours.state_dict()
    hf_state = hf.state_dict()
    # the encoder half uses the same names; the decoder is ours alone (HF has none)
    assert set(hf_state) == {k for k in state if not k.startswith("decoder.")}
    state.update(hf_state)
    ours.load_state_dict(state)
    x = rand_images(2, 32)
    with torch.no_grad():
        ref = hf.encode(x)
        z_q, _, codes = ours.encode_latents(x)
    assert torch.equal(codes.reshape(2, -1), ref.image_tokens.reshape(2, -1))
    torch.testing.assert_close(z_q, ref.quantized_last_hidden_state)


def _write_taming_yaml(path, cfg: VQConfig):
    import yaml

    doc = {"model": {"target": "taming.models.vqgan.VQModel", "params": {
        "embed_dim": cfg.embed_dim, "n_embed": cfg.codebook_size,
        "ddconfig": {"double_z": False, "z_channels": cfg.z_channels, "resolution": cfg.resolution, "in_channels": 3,
                     "out_ch": 3, "ch": cfg.base_channels, "ch_mult": list(cfg.channel_multipliers),
                     "num_res_blocks": cfg.num_res_blocks, "attn_resolutions": list(cfg.attn_resolutions),
                     "dropout": 0.0},
        "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator"}}}}
    path.write_text(yaml.safe_dump(doc))


def test_from_taming_fake_checkpoint_loads_with_weights_only_and_matches(tmp_path):
    _, src = _chameleon_pair()
    with torch.no_grad():
        for p in src.parameters():
            p.normal_(0, 0.2)
    state = {**src.state_dict(), "loss.discriminator.main.0.weight": torch.zeros(2, 3, 4, 4)}  # taming extras
    torch.save({"state_dict": state, "global_step": 7}, tmp_path / "vqgan.ckpt")
    _write_taming_yaml(tmp_path / "vqgan.yaml", src.config)
    loaded = load_taming_vqgan(tmp_path / "vqgan.ckpt", tmp_path / "vqgan.yaml")
    assert loaded.config.codebook_type == "nearest"
    x = rand_images(2, 32)
    assert torch.equal(loaded.encode(x), src.encode(x))
    torch.testing.assert_close(loaded.decode(src.encode(x)), src.decode(src.encode(x)), rtol=0, atol=0)

    # a Lightning-style checkpoint with pickled Python objects needs explicit trust
    torch.save({"state_dict": state, "hyper_parameters": argparse.Namespace(lr=1e-4)}, tmp_path / "pl.ckpt")
    with pytest.raises(CM3LeonError, match="trust_checkpoint=True"):
        load_taming_vqgan(tmp_path / "pl.ckpt", tmp_path / "vqgan.yaml")
    trusted = load_taming_vqgan(tmp_path / "pl.ckpt", tmp_path / "vqgan.yaml", trust_checkpoint=True)
    assert torch.equal(trusted.encode(x), src.encode(x))

    # the CLI converts to our directory format
    from cm3leon.cli import main

    assert main(["tokenizer", "image", "--from-taming", str(tmp_path / "vqgan.ckpt"), "--yaml",
                 str(tmp_path / "vqgan.yaml"), "--out", str(tmp_path / "converted")]) == 0
    assert torch.equal(VQModel.from_pretrained(tmp_path / "converted").encode(x), src.encode(x))


# --- codebook maintenance -----------------------------------------------------------------------


def test_dead_codes_are_reseeded_onto_encoder_outputs():
    m = tiny_model(codebook_type="nearest", dead_code_steps=1)
    q = m.quantize
    z = torch.randn(2, 4, 3, 3)
    with torch.no_grad():
        q.embedding.weight[1:] += 100.0  # every latent picks code 0, the rest are dead
        q(z, update=True)
    z_flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    rows = q.embedding.weight[1:]
    # each re-seeded code now sits exactly on one of the batch's latents
    assert (rows[:, None, :] - z_flat[None]).abs().amax(-1).min(1).values.max() < 1e-6
    _, _, idx = q(z)
    assert idx.unique().numel() > 1


def test_kmeans_init_uses_many_codes_and_ema_tracks_latents():
    m = tiny_model(codebook_type="ema")
    q = m.quantize
    z = torch.randn(8, 4, 4, 4)
    err_before = q(z)[1]["commitment"]
    q.kmeans_init_(z)
    z_q, losses, idx = q(z)
    assert idx.unique().numel() >= 24  # codes start where the data is: none dead
    assert losses["commitment"] < 0.5 * err_before
    before = q.embedding.weight.clone()
    shifted = z + 3.0
    for _ in range(50):
        q(shifted, update=True)
    # EMA moves used codes toward the (shifted) data mean
    assert (q.embedding.weight.mean() - 3.0).abs() < (before.mean() - 3.0).abs()


def test_codebook_stats():
    s = codebook_stats(torch.tensor([0, 0, 1, 1]), 4)
    assert s == {"codebook_usage": 0.5, "codes_used": 2, "perplexity": 2.0}


# --- training --------------------------------------------------------------------------------


def _train(data, out, steps=30):
    from cm3leon.tokenizers.image_train import train_image_tokenizer

    return train_image_tokenizer(data, out, preset="tiny", steps=steps, seed=3)


def _interrupted(monkeypatch, at_step, fn, *args, **kwargs):
    """Run fn(*args, **kwargs) with a Ctrl-C raised once a metrics row of step >= at_step is logged."""
    from cm3leon.utils import logging as logging_mod

    real_log = logging_mod.MetricsLogger.log

    def log_then_interrupt(self, **row):
        real_log(self, **row)
        if row.get("step", 0) >= at_step:
            raise KeyboardInterrupt

    monkeypatch.setattr(logging_mod.MetricsLogger, "log", log_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        fn(*args, **kwargs)
    monkeypatch.setattr(logging_mod.MetricsLogger, "log", real_log)


def test_training_lowers_loss_writes_outputs_and_resumes_exactly(tmp_path, monkeypatch):
    from cm3leon.utils.logging import read_metrics

    data = write_shapes(tmp_path / "data")
    metrics = _train(data, tmp_path / "full")
    rows = read_metrics(tmp_path / "full" / "metrics.jsonl")
    assert rows[-1]["step"] == 30
    first_loss = sum(r["l1"] for r in rows[:2]) / 2
    last_loss = sum(r["l1"] for r in rows[-2:]) / 2
    assert last_loss < 0.7 * first_loss
    for name in ("config.json", "model.safetensors", "metrics.json", "reconstructions.png"):
        assert (tmp_path / "full" / name).is_file(), name
    assert metrics["eval_split"] == "val" and metrics["num_eval_images"] == 8
    assert metrics["psnr_db"] > 10 and 0 < metrics["codebook_usage"] <= 1 and metrics["perplexity"] >= 1
    trained = VQModel.from_pretrained(tmp_path / "full")
    assert trained.config == get_preset("tiny")

    # interrupt a second run at step 17, then rerun: it resumes and ends bit-identical
    _interrupted(monkeypatch, 16, _train, data, tmp_path / "resumed")
    state = json.loads((tmp_path / "resumed" / "checkpoint" / "state.json").read_text())
    assert 15 <= state["step"] < 30
    # a resume that asks for another training config, or fewer steps than done, is refused
    from cm3leon.tokenizers.image_train import train_image_tokenizer

    with pytest.raises(CM3LeonError, match="resuming with another training config.*'lr'"):
        train_image_tokenizer(data, tmp_path / "resumed", preset="tiny", steps=30, seed=3, lr=1e-2)
    with pytest.raises(CM3LeonError, match="more than the 10 asked for"):
        train_image_tokenizer(data, tmp_path / "resumed", preset="tiny", steps=10, seed=3)
    # a save killed half-way leaves a temporary beside the checkpoint: cleaned up on resume
    (tmp_path / "resumed" / ".checkpoint.x1y2.tmp").mkdir()
    with pytest.warns(UserWarning, match="cleaned up .*checkpoint.x1y2.tmp"):
        again = _train(data, tmp_path / "resumed")
    assert again["steps_this_run"] == 30 - state["step"]
    assert not (tmp_path / "resumed" / ".checkpoint.x1y2.tmp").exists()
    resumed = VQModel.from_pretrained(tmp_path / "resumed")
    for (k, a), b in zip(trained.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
    # the log holds each step once, as the uninterrupted run's does
    steps = [r["step"] for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl") if "step" in r]
    assert steps == sorted(set(steps)) == [r["step"] for r in rows if "step" in r]


def test_gan_loss_starts_at_disc_start(tmp_path):
    from cm3leon.tokenizers.image_train import train_image_tokenizer
    from cm3leon.utils.logging import read_metrics

    data = write_shapes(tmp_path / "data", n=24)
    m = train_image_tokenizer(data, tmp_path / "gan", preset="tiny", steps=12, disc_start=6)
    rows = read_metrics(tmp_path / "gan" / "metrics.jsonl")
    assert m["gan"] is True
    assert all("d_loss" not in r for r in rows if r["step"] <= 6)
    late = [r for r in rows if r["step"] > 6]
    assert late and all("d_loss" in r and r["d_weight"] >= 0 and np.isfinite(r["g_loss"]) for r in late)


def test_lpips_loads_local_weights_in_torchvision_layout(tmp_path):
    from safetensors.torch import save_file

    from cm3leon.tokenizers.image_losses import LPIPS, load_lpips

    torch.manual_seed(0)
    ref = LPIPS()
    with torch.no_grad():
        for k in range(5):
            getattr(ref, f"lin{k}").model[1].weight.uniform_(0, 1)
    # torchvision names for the trunk (features.N.*), LPIPS names for the heads
    state = {k.replace(f"net.slice{s}.", "features."): v for k, v in ref.state_dict().items()
             for s in [int(k[9]) if k.startswith("net.slice") else 0] if k not in ("shift", "scale")}
    save_file(state, str(tmp_path / "lpips.safetensors"))
    loaded = load_lpips(tmp_path / "lpips.safetensors")
    x, y = rand_images(2, 32, seed=1), rand_images(2, 32, seed=2)
    torch.testing.assert_close(loaded(x, y), ref(x, y))
    assert torch.all(loaded(x, x) == 0) and torch.all(loaded(x, y) > 0)
    save_file({k: v for k, v in state.items() if not k.startswith("lin")}, str(tmp_path / "trunk.safetensors"))
    with pytest.raises(CM3LeonError, match="linear heads"):
        load_lpips(tmp_path / "trunk.safetensors")


def test_foreground_weights_mark_pixels_that_differ_from_the_border_background():
    from cm3leon.tokenizers.image_losses import foreground_weights

    x = torch.ones(2, 3, 8, 8)  # white background in [-1, 1]
    x[0, :, 2:4, 2:4] = torch.tensor([1.0, -1.0, -1.0])[:, None, None]  # a red 2x2 object
    w = foreground_weights(x, weight=10.0, threshold=0.1)
    assert w.shape == (2, 1, 8, 8)
    assert torch.all(w[0, 0, 2:4, 2:4] == 11.0) and w[0].sum() == 64 + 4 * 10
    assert torch.all(w[1] == 1.0)  # a blank image has no foreground
    assert torch.all(foreground_weights(x, weight=0.0, threshold=0.1) == 1.0)  # off: plain losses


# --- seeding, round-trip stability ----------------------------------------------


def _background_and_objects(n_background=2000, n_objects=40, dim=4, seed=0):
    """Latents [N, D]: many near-identical ones (a flat background) and a few far apart ones."""
    g = torch.Generator().manual_seed(seed)
    background = 0.001 * torch.randn(n_background, dim, generator=g)
    objects = 10.0 * torch.randn(n_objects, dim, generator=g)
    return background, objects


def _covered(q, points, tol=1e-3):
    d = ((points[:, None, :] - q.codebook()[None]) ** 2).sum(-1).min(1).values
    return (d < tol).float().mean().item()


def test_error_seeding_puts_codes_on_rare_distinct_latents_not_the_background():
    background, objects = _background_and_objects()
    z = torch.cat([background, objects])
    covered = {}
    for seeding in ("random", "error"):
        torch.manual_seed(0)
        q = tiny_model(codebook_type="nearest", codebook_size=48, seeding=seeding).quantize
        q.kmeans_init_(z, iters=0)
        covered[seeding] = _covered(q, objects)
    # uniform picks land ~98% on the background; k-means++ picks reach nearly every distinct latent
    assert covered["error"] >= 0.9 and covered["random"] <= 0.2


def test_error_seeding_restarts_dead_codes_where_quantization_error_is_largest():
    background, objects = _background_and_objects(n_background=500, n_objects=6)
    q = tiny_model(codebook_type="nearest", codebook_size=8, seeding="error", dead_code_steps=1).quantize
    with torch.no_grad():
        q.embedding.weight.zero_()
        q.embedding.weight[1:] += 1000.0  # code 0 sits on the background, codes 1..7 are dead
        q(torch.cat([background, objects]).T.reshape(1, 4, -1, 1), update=True)
    assert _covered(q, objects) == 1.0  # the six far latents got the restarted codes
    with pytest.raises(CM3LeonError, match="seeding"):
        VQConfig(**{**TINY, "seeding": "sometimes"})


@pytest.mark.parametrize("decoder", [False, True], ids=["encoder-only", "with-decoder"])
def test_roundtrip_objective_pulls_reconstructions_onto_the_teachers_codes(decoder):
    import copy

    from cm3leon.tokenizers.image_losses import roundtrip_step

    m = tiny_model(codebook_type="cosine", codebook_size=16)
    teacher = copy.deepcopy(m)
    codebook = m.quantize.codebook().detach().clone()
    decoder_before = copy.deepcopy(m.decoder.state_dict())
    x = rand_images(4, seed=11)
    codes = teacher.encode(x)

    def kept():  # measured apart from the objective: re-encode the 8-bit reconstruction
        saved = as_8bit(m.decode(codes))
        return (m.encode(saved) == codes).float().mean().item()

    def anchor(recon, target):
        return 30 * (recon - target).abs().mean()

    t = m.quantize.code_spacing()
    params = list(m.encoder.parameters()) + list(m.quant_conv.parameters())
    if decoder:
        params += list(m.decoder.parameters()) + list(m.post_quant_conv.parameters()) + list(m.quantize.parameters())
    opt = torch.optim.Adam(params, lr=3e-3)
    step = lambda: roundtrip_step(m, teacher, x, t, anchor if decoder else None)  # noqa: E731
    first, kept_first = step(), kept()
    for _ in range(80):
        loss, _ = step()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert step()[0].item() < 0.5 * first[0].item()
    assert kept_first < 0.5 and kept() > 0.9  # decoded images now re-encode to their codes
    assert torch.equal(m.encode(x), codes)  # the image keeps its codes
    torch.testing.assert_close(m.quantize.codebook(), codebook)  # no gradient reaches the codebook
    moved = any(not torch.equal(v, m.decoder.state_dict()[k]) for k, v in decoder_before.items())
    assert moved == decoder  # the decoder learns only when asked to


def test_roundtrip_gradient_reaches_only_pixels_inside_the_8bit_range():
    import copy

    from cm3leon.tokenizers.image_losses import roundtrip_step

    m = tiny_model(codebook_type="cosine", codebook_size=16)
    teacher = copy.deepcopy(m)
    real, seen = m.decode_latents, {}

    def decode_latents(z):  # a decoder whose pixels run from -3 to 3 across the image
        y = real(z) + torch.linspace(-3, 3, m.config.resolution)
        y.retain_grad()
        seen["y"] = y
        return y

    m.decode_latents = decode_latents
    loss, _ = roundtrip_step(m, teacher, rand_images(2, seed=3), m.quantize.code_spacing(),
                             lambda recon, x: recon.sum() * 0)
    loss.backward()
    y = seen["y"]
    outside = y.detach().abs() > 1
    assert outside.any() and (~outside).any()
    # a clamped pixel reads the same whatever the decoder does there: no push for nothing
    assert (y.grad[outside] == 0).all() and y.grad[~outside].abs().sum() > 0


@pytest.mark.parametrize("decoder", [False, True], ids=["encoder-only", "with-decoder"])
def test_roundtrip_phase_trains_what_it_should_starts_a_fresh_optimizer_and_resumes_exactly(tmp_path, monkeypatch, decoder):
    from dataclasses import replace

    from cm3leon.tokenizers.image_train import TRAIN_PRESETS, train_image_tokenizer
    from cm3leon.utils.logging import read_metrics

    data = write_shapes(tmp_path / "data", n=32)
    tc = replace(TRAIN_PRESETS["tiny"], steps=10, roundtrip_steps=10, log_every=2, ckpt_every=4,
                 roundtrip_decoder=decoder, roundtrip_warmup=0.3)
    trained = ("encoder.", "quant_conv.") + (("decoder.", "post_quant_conv.") if decoder else ())
    train_image_tokenizer(data, tmp_path / "base", preset="tiny", train_config=replace(tc, roundtrip_steps=0))
    full = train_image_tokenizer(data, tmp_path / "full", preset="tiny", train_config=tc)
    rows = read_metrics(tmp_path / "full" / "metrics.jsonl")
    assert [r["step"] for r in rows if "roundtrip_kept" in r][-1] == 20
    assert full["roundtrip_steps"] == 10 and full["steps_this_run"] == 20
    a, b = VQModel.from_pretrained(tmp_path / "base"), VQModel.from_pretrained(tmp_path / "full")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        if k.startswith(trained):
            continue
        torch.testing.assert_close(va, vb, msg=k)  # the codebook (and the decoder, unless asked) is frozen
    for part in trained:
        assert any(not torch.equal(va, vb) for k, va, vb in
                   zip(a.state_dict(), a.state_dict().values(), b.state_dict().values()) if k.startswith(part)), part
    # the phase's optimizer began afresh: Adam has counted its 10 steps only, with torch's betas
    opt = torch.load(tmp_path / "full" / "checkpoint" / "train_state.pt", weights_only=True)["optimizer"]
    assert {float(st["step"]) for st in opt["state"].values()} == {10.0}
    assert all(tuple(g["betas"]) == (0.9, 0.999) for g in opt["param_groups"])
    assert TRAIN_PRESETS["tiny"].betas != (0.9, 0.999)  # so the check above can tell

    # interrupted inside the round-trip phase, a rerun resumes (with its teacher) bit-identically
    _interrupted(monkeypatch, 14, train_image_tokenizer, data, tmp_path / "resumed", preset="tiny", train_config=tc)
    assert (tmp_path / "resumed" / "checkpoint" / "roundtrip_teacher" / "model.safetensors").is_file()
    train_image_tokenizer(data, tmp_path / "resumed", preset="tiny", train_config=tc)
    c = VQModel.from_pretrained(tmp_path / "resumed")
    for (k, va), vc in zip(b.state_dict().items(), c.state_dict().values()):
        torch.testing.assert_close(va, vc, msg=k)


def test_checker_recovery_counts_exact_colour_shape_and_colour_cell_matches_apart():
    import numpy as np

    from cm3leon.data.shapes import ShapeObject, render_scene
    from cm3leon.tokenizers.image_train import checker_recovery

    def u8(objects):
        return torch.from_numpy(np.array(render_scene(objects, 32).convert("RGB"))).permute(2, 0, 1)[None]

    red_circle = ShapeObject("circle", "red", "large", (1, 1))
    originals = torch.cat([u8([red_circle])] * 3)
    recons = torch.cat([u8([red_circle]),  # the same object
                        u8([ShapeObject("circle", "red", "large", (0, 0))]),  # moved: colour+shape only
                        u8([ShapeObject("square", "red", "large", (1, 1))])])  # reshaped: colour+cell only
    got = checker_recovery(originals, recons)
    assert got["checker_objects"] == 3
    assert got["checker_recovered"] == pytest.approx(1 / 3, abs=1e-4)
    assert got["checker_recovered_colour_shape"] == pytest.approx(2 / 3, abs=1e-4)
    assert got["checker_recovered_colour_cell"] == pytest.approx(2 / 3, abs=1e-4)


def _patch_config(**kw) -> VQConfig:
    return get_preset("patch48", **{"resolution": 16, "patch_size": 4, "embed_dim": 48, "z_channels": 48,
                                    "codebook_size": 8, **kw})


def test_patch_tokenizer_codes_are_pixel_patches_and_decode_pastes_them():
    """architecture="patch": a code is a patch of pixels; decoding pastes the codebook's
    patches, so decode(codes) equals the lookup of the codes, rearranged to pixels."""
    vq = VQModel(_patch_config()).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    codes = vq.encode(x)
    assert codes.shape == (2, 4, 4) and vq.num_parameters == 8 * 48
    patches = vq.quantize.embedding.weight[codes]  # (B, h, w, 3*4*4)
    expected = torch.nn.functional.pixel_shuffle(patches.permute(0, 3, 1, 2), 4)
    assert torch.equal(vq.decode(codes), expected.clamp(-1, 1))


def test_patch_tokenizer_fit_is_lossless_with_enough_codes_and_clusters_otherwise(tmp_path):
    from cm3leon.tokenizers.image_train import fit_patch_codebook

    g = torch.Generator().manual_seed(0)
    tiles = torch.randint(0, 256, (5, 3, 4, 4), generator=g, dtype=torch.uint8)  # 5 distinct patches
    pick = torch.randint(0, 5, (20, 4, 4), generator=g)
    images = tiles[pick].permute(0, 3, 1, 4, 2, 5).reshape(20, 3, 16, 16)  # (B, C, h*4, w*4)
    vq = VQModel(_patch_config())
    fit = fit_patch_codebook(vq, images, iters=10, max_vectors=1000, seed=0)
    assert fit == {"distinct_patches": 5, "kmeans_vectors": 5, "lossless": True}
    x = images.float() / 127.5 - 1
    assert torch.allclose(vq.decode(vq.encode(x)), x, atol=1e-6)
    small = VQModel(_patch_config(codebook_size=3))
    assert fit_patch_codebook(small, images, iters=10, max_vectors=1000, seed=0)["lossless"] is False
    assert small.encode(x).unique().numel() == 3
    small.save_pretrained(tmp_path / "vq")
    assert torch.equal(VQModel.from_pretrained(tmp_path / "vq").encode(x), small.encode(x))


def test_patch_tokenizer_config_errors_name_the_field():
    with pytest.raises(CM3LeonError, match="in_channels x patch_size"):
        _patch_config(embed_dim=12)
    with pytest.raises(CM3LeonError, match="codebook_type"):
        _patch_config(codebook_type="ema")
    with pytest.raises(CM3LeonError, match="divisible by patch_size"):
        _patch_config(resolution=18)
    with pytest.raises(CM3LeonError, match="architecture"):
        VQConfig(architecture="vit")
