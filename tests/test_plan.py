"""`cm3leon pretrain --dry-run`: the plan counts the model FSDP2 would shard, and its memory,
tokens and speed follow the stated formulas."""

import math
from pathlib import Path

import pytest
import torch

from cm3leon.cli import main
from cm3leon.model.config import ModelConfig
from cm3leon.model.transformer import CM3LeonTransformer, flops_per_token
from cm3leon.train.config import TrainConfig
from cm3leon.train.plan import GIB, training_plan

ROOT = Path(__file__).resolve().parents[1]


def test_per_rank_shards_are_what_fully_shard_makes():
    """The plan's parameters per rank equal the local shards of the tiny model after
    `apply_parallelism(..., "fsdp2")` on 3 ranks of a fake process group (one process, no GPU)."""
    import torch.distributed as dist

    fake_pg = pytest.importorskip("torch.testing._internal.distributed.fake_pg")
    from cm3leon.train.parallel import DistInfo, apply_parallelism

    model = ModelConfig.from_preset("tiny", vocab_size=100)
    dist.init_process_group("fake", store=fake_pg.FakeStore(), rank=0, world_size=3)
    try:
        with torch.device("meta"):
            net = CM3LeonTransformer(model)
        apply_parallelism(net, DistInfo(0, 3, 0, torch.device("cpu")), "fsdp2", bf16=True)
        local = sum(p.to_local().numel() for p in net.parameters())
    finally:
        dist.destroy_process_group()
    plan = training_plan(model, TrainConfig.from_preset("tiny", parallel="fsdp2"), 3)
    assert plan["parallel"] == "fsdp2" and plan["parameters_per_rank"] == local
    assert plan["parameters"] == CM3LeonTransformer(model).num_parameters() > local * 2


def test_memory_tokens_and_speed_follow_the_formulas():
    model = ModelConfig.from_preset("tiny", vocab_size=100)
    cfg = TrainConfig.from_preset("tiny", dtype="bf16", parallel="fsdp2", steps=30)
    plan = training_plan(model, cfg, 2, assumed_mfu=0.5, peak_tflops=100.0, gpu_memory_gib=1.0)
    s, b, h, n = cfg.seq_len, cfg.micro_batch_size, model.d_model, model.n_layer
    block = 12 * h * h  # q, k, v, o + two MLP matrices of 4h, no biases
    root = model.padded_vocab_size * h + model.max_seq_len * h
    assert plan["fsdp2_groups"] == {"blocks": n, "parameters_per_block": block, "root_parameters": root}
    shard = sum(math.ceil(p.shape[0] / 2) * p[0].numel() for p in CM3LeonTransformer(model).parameters())
    mem = {k: round(v * GIB) for k, v in plan["memory_per_rank_gib"].items()}
    assert plan["parameters_per_rank"] == shard
    assert mem["weights_fp32"] == pytest.approx(4 * shard, abs=GIB * 1e-3)
    assert mem["adamw_moments_fp32"] == pytest.approx(8 * shard, abs=GIB * 1e-3)
    assert plan["memory_per_rank_gib"]["activations"] == round(n * 34 * s * b * h / GIB, 3)
    assert plan["memory_per_rank_gib"]["logits_and_loss"] == round(s * b * model.padded_vocab_size * 10 / GIB, 3)
    assert plan["fits"]
    assert plan["tokens_per_step"] == cfg.grad_accum_steps(2) * b * s * 2 and plan["tokens"] == 30 * plan["tokens_per_step"]
    assert plan["tokens_per_second_per_gpu"] == round(0.5 * 100e12 / flops_per_token(model, s))
    # checkpointing keeps each block's input only (+ one block recomputed); one rank gathers nothing
    ckpt = training_plan(model, cfg.replace(activation_checkpointing=True), 1)
    assert ckpt["parallel"] == "none" and ckpt["parameters_per_rank"] == plan["parameters"]
    assert ckpt["memory_per_rank_gib"]["gathered_working_copies"] == 0
    assert ckpt["memory_per_rank_gib"]["activations"] == round((n * 2 + 34) * s * b * h / GIB, 3)


def test_dry_run_cli_prints_the_plan_and_names_what_it_lacks(capsys):
    assert main(["pretrain", "--preset", "tiny", "--dry-run", "--world-size", "2", "--set", "model.vocab_size=100",
                 "--set", "train.peak_tflops=50", "--set", "parallel=fsdp2"]) == 0
    out = capsys.readouterr().out
    assert "parallel: fsdp2 over 2 rank(s)" in out and "assumed MFU of 40% of 50 TFLOP/s" in out
    assert main(["pretrain", "--preset", "tiny", "--dry-run"]) == 2
    assert "--set model.vocab_size=N" in capsys.readouterr().err


def test_the_cc3m_recipe_fits_an_80_gib_gpu_and_is_the_paper_350m():
    from cm3leon.train.cli import plan_pretrain
    from cm3leon.train.options import load_pretrain_options

    data, _, preset, over = load_pretrain_options(ROOT / "configs" / "pretrain_350m_cc3m.yaml")
    plan = plan_pretrain(data, preset, 8, gpu_memory_gib=80, **over)
    assert plan["fits"] and plan["activation_checkpointing"] and plan["parallel"] == "fsdp2"
    assert 350e6 < plan["parameters"] < 400e6 and plan["tokens_per_step"] == 2**20 and plan["grad_accum_steps"] == 4
    assert over["lr"] == TrainConfig.from_preset("350m").lr
