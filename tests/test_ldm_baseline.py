"""The latent-diffusion baseline (cm3leon.baselines.ldm) on a tiny config, the one FLOP count of
the comparison, and `cm3leon ablate --baselines` (cm3leon.run.baselines) on a tiny run."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from cm3leon.baselines.ldm import (LDMConfig, LatentDiffusion, build_unet, diffusion_loss, load_ldm, make_scheduler,
                                   train_ldm)
from cm3leon.errors import CM3LeonError, MissingDependencyError

PROMPTS = ["a red circle", "a large blue square in the top left"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread, no barrier stalls when other jobs share the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**kw) -> LDMConfig:
    return LDMConfig(**{**dict(block_out_channels=(8, 16), cross_attention=(True, False), attention_heads=2,
                               norm_groups=4, max_text_tokens=16, batch_size=8, lr=2e-3, warmup_steps=0,
                               num_inference_steps=4, log_every=1, ckpt_every=2), **kw})


def tiny_model(seed: int = 0) -> LatentDiffusion:
    """A random tiny LDM: `tiny` VQ latents (8 channels, 4x4), a tiny bi-encoder's text states."""
    from cm3leon.retrieval.encoder import BiEncoder, BiEncoderConfig, BiEncoderRetriever
    from cm3leon.tokenizers.image import VQModel, get_preset

    torch.manual_seed(seed)
    vq = VQModel(get_preset("tiny"))
    enc = BiEncoderRetriever(BiEncoder(BiEncoderConfig(image_size=16, embed_dim=8, text_max_bytes=64, text_width=16,
                                                       text_layers=1, text_heads=2, image_channels=(8, 8),
                                                       image_pool=2)))
    cfg = tiny_config()
    unet = build_unet(cfg, vq.config.embed_dim, vq.config.grid[0], enc.text_width)
    return LatentDiffusion(unet, cfg, {"shift": 0.0, "scale": 1.0, "channels": vq.config.embed_dim, "side": 4},
                           vq, enc)


def test_training_steps_lower_the_loss_on_a_fixed_batch():
    from cm3leon.train.loop import build_optimizer

    model = tiny_model()
    unet, cfg = model.unet.train(), model.config
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(8, 8, 4, 4, generator=g)
    states, mask = model.encode_prompts(PROMPTS * 4)
    noise = torch.randn(z0.shape, generator=g)
    t = torch.randint(0, cfg.num_train_timesteps, (8,), generator=g)
    scheduler, opt = make_scheduler(cfg), build_optimizer(unet, cfg)
    losses = []
    for _ in range(20):
        loss = diffusion_loss(unet, scheduler, z0, states, mask, noise, t)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    with torch.no_grad():
        after = diffusion_loss(unet, scheduler, z0, states, mask, noise, t).item()
    assert losses[1] < losses[0]  # one step lowers it
    assert after < 0.7 * losses[0], losses


def test_sampling_is_deterministic_given_the_seed():
    model = tiny_model()
    a = model.sample_latents(PROMPTS, seed=5)
    assert torch.equal(a, model.sample_latents(PROMPTS, seed=5))
    assert not torch.allclose(a, model.sample_latents(PROMPTS, seed=6))
    images = [np.asarray(im) for im in model.text_to_image(PROMPTS, seed=5)]
    again = [np.asarray(im) for im in model.text_to_image(PROMPTS, seed=5)]
    assert all(np.array_equal(x, y) for x, y in zip(images, again)) and images[0].shape == (16, 16, 3)


def test_cfg_scale_zero_is_the_unconditional_prediction_and_one_the_conditional():
    model = tiny_model()
    with torch.no_grad():  # a random U-Net whose output projection is not zero (diffusers zero-inits it)
        for p in model.unet.conv_out.parameters():
            p.normal_(0, 0.3)
    z = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(1))
    t = torch.tensor(500)
    states, mask = model.encode_prompts(PROMPTS)
    null, null_mask = model.null_states.expand(2, -1, -1), model.null_mask.expand(2, -1)
    with torch.no_grad():
        uncond = model.unet(z, t, encoder_hidden_states=null, encoder_attention_mask=null_mask).sample
        cond = model.unet(z, t, encoder_hidden_states=states, encoder_attention_mask=mask).sample
        assert not torch.allclose(uncond, cond, atol=1e-4)  # the text matters
        # equal up to the rounding of a batch twice the size (both streams run as one batch)
        torch.testing.assert_close(model.guided_prediction(z, t, states, mask, 0.0), uncond)
        torch.testing.assert_close(model.guided_prediction(z, t, states, mask, 1.0), cond)
        torch.testing.assert_close(model.guided_prediction(z, t, states, mask, 3.0), uncond + 3.0 * (cond - uncond),
                                   rtol=1e-5, atol=1e-5)
    # at scale 0 the caption drops out entirely: any prompt, the same picture
    one = model.sample_latents(["a red circle"], seed=3, cfg_scale=0.0)
    other = model.sample_latents(["a green triangle at the bottom"], seed=3, cfg_scale=0.0)
    torch.testing.assert_close(one, other, rtol=1e-5, atol=1e-6)


def test_bad_settings_and_a_missing_diffusers_name_what_to_do(monkeypatch):
    with pytest.raises(CM3LeonError, match="cross_attention"):
        LDMConfig(block_out_channels=(32, 64), cross_attention=(True,))
    with pytest.raises(CM3LeonError, match="divisible"):
        LDMConfig(block_out_channels=(48,), cross_attention=(True,), norm_groups=32)
    model = tiny_model()
    with pytest.raises(CM3LeonError, match="cfg_scale"):
        model.sample_latents(PROMPTS, cfg_scale=-1.0)
    with pytest.raises(CM3LeonError, match="num_inference_steps"):
        model.sample_latents(PROMPTS, num_inference_steps=0)
    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if not installed
    with pytest.raises(MissingDependencyError, match=r"cm3leon\[baselines\]"):
        tiny_model()


def test_flops_are_counted_by_one_function_that_reproduces_6n_for_the_transformer():
    from cm3leon.baselines.ldm import unet_flops_per_sample
    from cm3leon.model.config import ModelConfig
    from cm3leon.model.transformer import CM3LeonTransformer, flops_per_token
    from cm3leon.train.flops import forward_flops, training_flops_per_sample

    cfg = ModelConfig.from_preset("tiny", vocab_size=300)
    net = CM3LeonTransformer(cfg)
    block = torch.zeros(1, cfg.max_seq_len, dtype=torch.long)
    # 6N + 12 L d T per token (PaLM App. B): the attention is counted too (CPU's fused kernel)
    assert training_flops_per_sample(net, block) == flops_per_token(cfg, cfg.max_seq_len) * cfg.max_seq_len
    model = tiny_model()
    per_sample = unet_flops_per_sample(model.unet, model.latent, model.config, 16)
    z = torch.zeros(4, 8, 4, 4)
    states, mask = torch.zeros(4, 16, 16), torch.ones(4, 16, dtype=torch.bool)
    batch = forward_flops(model.unet, z, torch.zeros(4, dtype=torch.long), encoder_hidden_states=states,
                          encoder_attention_mask=mask)
    assert per_sample > 0 and batch == pytest.approx(4 * per_sample / 3, rel=1e-9)  # linear in the batch


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from conftest import build_tiny_run

    return build_tiny_run(tmp_path_factory.mktemp("baselines") / "run")


def test_training_resumes_to_the_uninterrupted_runs_weights(run, tmp_path):
    from cm3leon.utils.io import load_safetensors

    parts = dict(image_tokenizer=run / "image_tokenizer", text_encoder=run / "retrieval" / "retriever")
    cfg = tiny_config(steps=4, keep_steps=(2,))
    straight = train_ldm(run / "data", tmp_path / "straight", cfg, **parts)
    train_ldm(run / "data", tmp_path / "resumed", cfg.replace(steps=2), **parts)
    resumed = train_ldm(run / "data", tmp_path / "resumed", cfg, **parts)
    a = load_safetensors(tmp_path / "straight" / "unet.safetensors")
    b = load_safetensors(tmp_path / "resumed" / "unet.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["samples"] == straight["samples"] == 4 * 8 and resumed["train_records"] == straight["train_records"]
    assert [s["step"] for s in straight["snapshots"]] == [2]
    rows = [json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # each step logged once
    model = load_ldm(tmp_path / "straight", snapshot=2)  # the weights kept along the run load too
    assert model.text_to_image(["a red circle"], seed=0)[0].size == (16, 16)


def tiny_baselines_spec():
    from cm3leon.run.baselines import BaselinesSpec

    train = dict(steps=4, seq_len=128, micro_batch_size=2, batch_tokens=256, warmup_steps=1, eval_batches=1,
                 dtype="fp32")
    ldm = dict(block_out_channels=(8, 16), cross_attention=(True, False), attention_heads=2, norm_groups=4,
               max_text_tokens=16, batch_size=8, num_inference_steps=4, log_every=1)
    return BaselinesSpec(preset="tiny", train=train, num_retrieved=1, cfg_scale=2.0, ldm=ldm,
                         ldm_sampling_steps=(2, 4), curve_points=2, num_prompts=3, eval_batch_size=3)


def test_ablate_baselines_trains_three_models_to_the_same_budgets_and_evaluates_them_alike(run, monkeypatch):
    import cm3leon.baselines.ldm as ldm_module
    import cm3leon.eval.evaluate as evaluate
    import cm3leon.train.cli as train_cli
    from cm3leon.run.ablate import run_ablations
    from cm3leon.model.config import ModelConfig
    from cm3leon.model.transformer import flops_per_token
    from cm3leon.run.report import build_run_report

    result = run_ablations(run, spec=tiny_baselines_spec(), baselines=True)
    out = run / "ablate" / "baselines"
    rows = result["rows"]
    assert [(r["model"], r["budget"]) for r in rows] == [
        (m, b) for b in ("FLOPs", "wall time") for m in ("CM3Leon", "DALL-E-style AR", "LDM")] + [("LDM", "FLOPs")]
    by = {(r["model"], r["budget"], r["decoding"]): r for r in rows}
    cm3, dalle = by[("CM3Leon", "FLOPs", "TopP + CFG 2, k=1")], by[("DALL-E-style AR", "FLOPs", "TopP")]
    ldm_f, ldm_t = by[("LDM", "FLOPs", "DDIM 4 steps + CFG 3")], by[("LDM", "wall time", "DDIM 4 steps + CFG 3")]
    # the same FLOPs: the transformers exactly (6N + attention per token), the LDM within its last step
    cfg = ModelConfig.from_dict(json.loads((out / "cm3leon" / "model" / "config.json").read_text()))
    assert cm3["train_flops"] == dalle["train_flops"] == flops_per_token(cfg, 128) * 4 * 256
    ldm = result["models"]["ldm"]
    assert cm3["train_flops"] <= ldm_f["train_flops"] < cm3["train_flops"] + 8 * ldm["flops_per_sample"]
    # the same wall time: the LDM trained at least CM3Leon's seconds, at most one step more
    assert ldm_t["train_seconds"] >= result["budgets"]["train_seconds"] - 0.05 and ldm_t["step"] >= 1
    assert result["budgets"]["train_flops"] == cm3["train_flops"]
    sweep = by[("LDM", "FLOPs", "DDIM 2 steps + CFG 3")]
    assert sweep["step"] == ldm_f["step"] and sweep["seconds_per_image"] > 0
    for r in rows:
        assert 0.0 <= r["both"] <= 1.0 and r["fd"] >= 0 and -1.0 <= r["clip_score"] <= 1.0
        assert r["seconds_per_image"] > 0 and r["params"] > 0
    # curves: checkpoints along each run, compute growing
    for m in ("cm3leon", "dalle", "ldm"):
        flops = [p["flops"] for p in result["curves"][m]]
        assert len(flops) >= 2 and flops == sorted(flops)
    assert [p["step"] for p in result["curves"]["cm3leon"]] == [2, 4]
    # the DALL-E-style run really is left to right without spans or retrieval
    summary = json.loads((out / "dalle" / "model" / "train_summary.json").read_text())
    assert summary["num_retrieved"] == 0 and summary["order"] == "text_first"
    assert summary["cm3"]["poisson_lambda"] == 0.0 and summary["cm3"]["whole_segment_prob"] == 0.0
    # files: numbers, table, plot; checkpoints gone, the report shows it
    assert json.loads((out / "metrics.json").read_text())["rows"] == rows
    assert "| LDM | wall time |" in (out / "results.md").read_text()
    assert (out / "baselines_compute.png").stat().st_size > 1000
    assert not (out / "cm3leon" / "model" / "checkpoints").exists()
    assert not (out / "ldm" / "model" / "snapshots").exists()
    html = build_run_report(run).read_text()
    assert "Baselines at CM3Leon" in html and "DALL-E-style AR" in html

    def boom(*a, **k):
        raise AssertionError("a finished training or evaluation ran again")

    monkeypatch.setattr(train_cli, "pretrain", boom)
    monkeypatch.setattr(ldm_module, "train_ldm", boom)
    monkeypatch.setattr(evaluate, "evaluate_model", boom)
    again = run_ablations(run, spec=tiny_baselines_spec(), baselines=True)
    assert again["rows"] == rows
    other = tiny_baselines_spec()
    other.num_prompts = 2
    with pytest.raises(CM3LeonError, match="other settings"):
        run_ablations(run, spec=other, baselines=True)


def test_cli_plans_the_comparison_and_refuses_only(run, capsys):
    from cm3leon.cli import main

    assert main(["ablate", "--run", str(run), "--baselines", "--plan"]) == 0
    out = capsys.readouterr().out
    assert "LDM: U-Net (64, 128)" in out and "120 steps of the run's recipe" in out  # the "quick" preset's budget
    assert main(["ablate", "--run", str(run), "--baselines", "--only", "k0"]) == 2
    assert "--only" in capsys.readouterr().err
