"""Trainer: LR schedule, a tiny pretraining run, exact resume, checkpoints, torchrun DDP/FSDP2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cm3leon.errors import CM3LeonError
from cm3leon.model.config import ModelConfig
from cm3leon.model.transformer import CM3LeonTransformer
from cm3leon.objectives.cm3 import IGNORE_INDEX
from cm3leon.tokenizers.vocab import Vocab
from cm3leon.train import loop
from cm3leon.train.cli import pretrain
from cm3leon.train.config import TRAIN_PRESETS, TrainConfig
from cm3leon.train.schedule import lr_at
from cm3leon.utils.logging import read_metrics

sys.path.insert(0, str(Path(__file__).parent))
from test_sequences import make_codes  # noqa: E402


def losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def test_lr_warmup_then_linear_and_cosine_decay_to_ten_percent():
    assert lr_at(0, 1.0, 10, 110) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 10, 110) == pytest.approx(1.0)
    assert lr_at(10, 1.0, 10, 110) == pytest.approx(1.0)
    assert lr_at(60, 1.0, 10, 110, "linear") == pytest.approx(0.55)
    assert lr_at(60, 1.0, 10, 110, "cosine") == pytest.approx(0.55)  # the cosine's midpoint
    assert lr_at(35, 1.0, 10, 110, "cosine") > lr_at(35, 1.0, 10, 110, "linear")
    assert lr_at(110, 1.0, 10, 110) == pytest.approx(0.1)
    assert lr_at(500, 1.0, 10, 110, "cosine") == pytest.approx(0.1)


def test_presets_match_model_presets_and_paper_values():
    from cm3leon.model.config import PRESETS

    assert set(TRAIN_PRESETS) <= set(PRESETS)
    for name, lr in (("350m", 6e-4), ("760m", 5e-4), ("7b", 1.2e-4)):
        cfg = TrainConfig.from_preset(name)
        assert (cfg.lr, cfg.warmup_steps, cfg.betas, cfg.grad_clip) == (lr, 1500, (0.9, 0.98), 1.0)
        assert cfg.grad_accum_steps(world_size=8) * cfg.micro_batch_size * cfg.seq_len * 8 == 8 * 2**20
    with pytest.raises(CM3LeonError, match="unknown train preset"):
        TrainConfig.from_preset("huge")
    with pytest.raises(CM3LeonError, match="parallel"):
        TrainConfig(parallel="tp")


def _split_losses(model, batches, vocab: Vocab) -> dict[str, float]:
    """Reference: mean cross-entropy over all / text / image targets, from the logits."""
    import torch.nn.functional as F

    sums, counts = {"all": 0.0, "text": 0.0, "image": 0.0}, {"all": 0, "text": 0, "image": 0}
    with torch.no_grad():
        for tokens, targets, *_ in batches:
            logits, _ = model(tokens)
            ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
            t = targets.flatten().numpy()
            for name, keep in (("all", t != IGNORE_INDEX), ("text", vocab.is_text(t)), ("image", vocab.is_image(t))):
                sums[name] += float(ce[torch.from_numpy(keep)].double().sum())
                counts[name] += int(keep.sum())
    return {name: sums[name] / counts[name] for name in sums}


def test_tiny_pretrain_loss_decreases_and_writes_a_loadable_model_dir(tmp_path):
    codes = make_codes(tmp_path)
    out = tmp_path / "run"
    summary = pretrain(codes, out, preset="tiny", steps=30, val_loss_on="both")
    curve = [loss for _, loss in losses(out)]
    assert len(curve) == 30 and all(np.isfinite(curve))
    assert np.mean(curve[-5:]) < np.mean(curve[:5]) - 0.3
    assert summary["num_retrieved"] == 2 and summary["final_val_loss"] < curve[0]
    # Every row splits the loss by modality and reports throughput and MFU.
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    for r in rows:
        assert r["text_loss"] > 0 and r["image_loss"] > 0 and r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1
        assert r["ppl"] == pytest.approx(np.exp(r["loss"]))
    from cm3leon.model.transformer import flops_per_token

    assert summary["peak_tflops_measured"] and summary["peak_tflops"] > 0
    assert summary["mfu"] == pytest.approx(flops_per_token(ModelConfig.from_dict(
        json.loads((out / "config.json").read_text())), 128) * summary["step_tokens_per_second"]
        / (summary["peak_tflops"] * 1e12), rel=1e-3)
    model = CM3LeonTransformer.from_pretrained(out)
    assert Vocab.load(out) == Vocab(40, 32, 16)
    assert model.config.vocab_size == Vocab.load(out).size
    for name in ("text_tokenizer/config.json", "image_tokenizer/config.json", "train_summary.json", "loss.png"):
        assert (out / name).is_file(), name
    val_rows = [r for r in read_metrics(out / "metrics.jsonl") if "val_loss" in r]
    assert [r["step"] for r in val_rows] == [10, 20, 30]
    # The exported weights are the trained ones: they reproduce the final validation loss.
    from cm3leon.objectives.sequences import CM3PretrainStream

    val = CM3PretrainStream(codes, "val", seq_len=128, num_retrieved=2, vocab=Vocab.load(out), shuffle=False, epochs=1)
    batches = loop._val_batches(val, TrainConfig.from_preset("tiny"), loop.setup_distributed())
    assert loop.evaluate(model, batches, loop.setup_distributed(), loop.nullcontext) == pytest.approx(
        summary["final_val_loss"], rel=1e-5)
    # The text / image split of the validation loss matches a direct computation from logits.
    ref = _split_losses(model, batches, Vocab.load(out))
    assert (summary["final_val_loss"], summary["final_val_text_loss"], summary["final_val_image_loss"]) == \
        pytest.approx((ref["all"], ref["text"], ref["image"]), rel=1e-5)
    assert ref["text"] != pytest.approx(ref["image"], rel=1e-2)
    # The query-pair loss: the query's tokens only, unmasked, over the first validation records.
    from cm3leon.objectives.sequences import query_pair_cm3

    query = CM3PretrainStream(codes, "val", seq_len=128, num_retrieved=2, vocab=Vocab.load(out), shuffle=False,
                              epochs=1, cm3=query_pair_cm3())
    ref = _split_losses(model, loop._val_batches(query, TrainConfig.from_preset("tiny"), loop.setup_distributed(),
                                                 limit=10**6), Vocab.load(out))
    assert (summary["final_val_query_loss"], summary["final_val_query_image_loss"]) == pytest.approx(
        (ref["all"], ref["image"]), rel=1e-5)
    assert summary["final_val_query_loss"] != pytest.approx(summary["final_val_loss"], rel=1e-3)
    # Checkpoints: the newest two, each complete.
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step-00000020", "step-00000030"]
    # Running again finds the finished run and does not train again.
    again = pretrain(codes, out, preset="tiny", steps=30)
    assert again["resumed_from_step"] == 30 and len(losses(out)) == 30
    # --init starts a new run from these weights: its first loss is the trained model's.
    pretrain(codes, tmp_path / "continued", preset="tiny", steps=1, init=out)
    assert losses(tmp_path / "continued")[0][1] < np.mean(curve[:5]) - 0.3


def test_resume_after_interruption_reproduces_the_losses_bit_for_bit(tmp_path, monkeypatch):
    codes = make_codes(tmp_path)
    settings = dict(preset="tiny", steps=16, ckpt_every=5, seed=7, dtype="fp32", batch_tokens=1024, peak_tflops=2.0)
    pretrain(codes, tmp_path / "straight", **settings)

    real_lr_at = loop.lr_at

    def crash_at_step_13(step, *a, **k):
        if step == 13:
            raise KeyboardInterrupt
        return real_lr_at(step, *a, **k)

    monkeypatch.setattr(loop, "lr_at", crash_at_step_13)
    with pytest.raises(KeyboardInterrupt):
        pretrain(codes, tmp_path / "resumed", **settings)
    monkeypatch.setattr(loop, "lr_at", real_lr_at)
    assert len(losses(tmp_path / "resumed")) == 13
    summary = pretrain(codes, tmp_path / "resumed", **settings)
    assert summary["resumed_from_step"] == 10  # the newest checkpoint before the crash
    assert (summary["peak_tflops"], summary["peak_tflops_measured"]) == (2.0, False)  # a given peak is used as is
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")  # exact floats


def test_resume_skips_a_damaged_newest_checkpoint_and_stale_temporaries(tmp_path, monkeypatch):
    codes = make_codes(tmp_path)
    settings = dict(preset="tiny", steps=16, ckpt_every=5, seed=7, dtype="fp32", batch_tokens=1024, peak_tflops=2.0)
    pretrain(codes, tmp_path / "straight", **settings)
    real_lr_at = loop.lr_at
    monkeypatch.setattr(loop, "lr_at", lambda step, *a, **k: (_ for _ in ()).throw(KeyboardInterrupt)
                        if step == 13 else real_lr_at(step, *a, **k))
    with pytest.raises(KeyboardInterrupt):
        pretrain(codes, tmp_path / "resumed", **settings)
    monkeypatch.setattr(loop, "lr_at", real_lr_at)
    ckpts = tmp_path / "resumed" / "checkpoints"
    weights = ckpts / "step-00000010" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # the newest checkpoint is damaged
    stale = ckpts / ".step-00000015.abc123.tmp"  # a save killed half-way
    (stale / "step-00000015").mkdir(parents=True)
    with pytest.warns(UserWarning) as record:
        summary = pretrain(codes, tmp_path / "resumed", **settings)
    messages = " ".join(str(w.message) for w in record)
    assert "skipping damaged checkpoint" in messages and "step-00000010" in messages and "cleaned up" in messages
    assert not stale.exists()
    assert summary["resumed_from_step"] == 5  # the newest checkpoint that loads
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")  # no duplicate rows, exact floats


def test_resume_refuses_another_training_config_or_fewer_steps_unless_told(tmp_path):
    codes = make_codes(tmp_path, neighbors=0)
    settings = dict(preset="tiny", steps=4, ckpt_every=2, eval_every=0, seed=3)
    pretrain(codes, tmp_path / "run", **settings)
    for change, match in (({"lr": 1e-2}, "lr: "), ({"seed": 4}, "seed: 3 in the checkpoint, 4 now"),
                          ({"batch_tokens": 2048}, "batch_tokens")):
        with pytest.raises(CM3LeonError, match=rf"step-00000004: resuming with another training config.*{match}"):
            pretrain(codes, tmp_path / "run", **{**settings, **change, "steps": 6})
    with pytest.raises(CM3LeonError, match="steps 2 is below the checkpoint's step 4"):
        pretrain(codes, tmp_path / "run", **{**settings, "steps": 2})
    # what may change freely (more steps, logging, checkpoint cadence), and an explicit override
    assert pretrain(codes, tmp_path / "run", **{**settings, "steps": 5, "eval_every": 1, "ckpt_every": 5})["steps"] == 5
    summary = pretrain(codes, tmp_path / "run", **{**settings, "steps": 6, "lr": 1e-2, "override_config": True})
    assert summary["resumed_from_step"] == 5 and summary["steps"] == 6


def test_trains_a_map_style_dataset_of_blocks(tmp_path):
    """The loop is generic: any (tokens, targets) blocks, e.g. instruction-tuning data."""
    vocab = Vocab(32, 32, num_sentinels=4)
    rng = np.random.default_rng(0)
    blocks = []
    for _ in range(16):
        start = int(rng.integers(vocab.text_offset, vocab.size - 17))
        tokens = torch.arange(start, start + 16)  # predictable: next id = id + 1
        targets = torch.cat([tokens[1:], torch.tensor([IGNORE_INDEX])])
        blocks.append((tokens, targets))
    cfg = TrainConfig.from_preset("tiny", steps=40, lr=1e-2, seq_len=16, batch_tokens=64, eval_every=0,
                                 ckpt_every=0)
    model_cfg = ModelConfig.from_preset("tiny", vocab_size=vocab.size)
    summary = loop.train(model_cfg, blocks, blocks[:4], cfg, tmp_path / "m", vocab)
    curve = [loss for _, loss in losses(tmp_path / "m")]
    assert curve[-1] < curve[0] - 1.0 and summary["final_val_loss"] < curve[0]
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_rejects_blocks_longer_than_the_model_context(tmp_path):
    with pytest.raises(CM3LeonError, match="max_seq_len"):
        pretrain(make_codes(tmp_path, neighbors=0), tmp_path / "run", preset="tiny", seq_len=256, steps=1)


def _tiny_checkpoint(tmp_path: Path, n_layer: int = 2):
    from cm3leon.train import checkpoint as ckpt

    cfg = ModelConfig.from_preset("tiny", vocab_size=88, n_layer=n_layer)
    model = CM3LeonTransformer(cfg)
    opt = torch.optim.AdamW(model.parameters())
    info = loop.setup_distributed()
    path = ckpt.save_checkpoint(tmp_path / "ckpts", 3, model, opt, {"tokens_seen": 0, "data": None,
                                                                     "model_config": cfg.to_dict()}, info)
    return ckpt, path, model, opt, info, cfg


def test_truncated_missing_or_mismatched_checkpoint_is_a_clear_error(tmp_path):
    ckpt, path, model, opt, info, cfg = _tiny_checkpoint(tmp_path)
    assert ckpt.load_checkpoint(path, model, opt, info, cfg.to_dict())["step"] == 3
    # A checkpoint of another model config: refused before any weight is loaded.
    other = CM3LeonTransformer(cfg.replace(n_layer=3))
    with pytest.raises(CM3LeonError, match=r"step-00000003.*different model config.*n_layer: 2 in the checkpoint, 3"):
        ckpt.load_checkpoint(path, other, torch.optim.AdamW(other.parameters()), info, other.config.to_dict())
    # Without a config to compare (any module), the weights' shapes still give a clear error.
    with pytest.raises(CM3LeonError, match=r"step-00000003: checkpoint does not fit the model"):
        ckpt.load_checkpoint(path, other, torch.optim.AdamW(other.parameters()), info)
    damages = {  # file -> (damage, expected message)
        "model.safetensors": ("truncate", "checkpoint weights file truncated or corrupt"),
        "optimizer.pt": ("truncate", "optimizer state file truncated or corrupt"),
        "rng.pt": ("delete", "RNG state file missing"),
        "trainer_state.json": ("delete", "checkpoint state missing"),
    }
    garbage = {  # file -> (bytes, expected message)
        "rng.pt": (b"\x80\x02garbage" * 50, "RNG state file truncated or corrupt"),
        "optimizer.pt": (np.random.default_rng(0).bytes(4096), "optimizer state file truncated or corrupt"),
        "trainer_state.json": (b'{"step": "three"}', "checkpoint state without an integer step"),
    }
    for name, (damage, message) in [*damages.items(), *garbage.items()]:
        ckpt.save_checkpoint(tmp_path / "ckpts", 3, model, opt, {"tokens_seen": 0, "data": None}, info)
        file = path / name
        if isinstance(damage, bytes):
            file.write_bytes(damage)
        elif damage == "truncate":
            file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
        else:
            file.unlink()
        with pytest.raises(ckpt.DamagedCheckpoint, match=rf"step-00000003/{name}: {message}"):
            ckpt.load_checkpoint(path, model, opt, info)
    # an RNG file of the right kind but for fewer ranks than it claims
    ckpt.save_checkpoint(tmp_path / "ckpts", 3, model, opt, {"tokens_seen": 0, "data": None}, info)
    torch.save([], path / "rng.pt")
    with pytest.raises(ckpt.DamagedCheckpoint, match="not a list of RNG states"):
        ckpt.load_checkpoint(path, model, opt, info)


def test_truncated_or_incomplete_model_directory_is_a_clear_error(tmp_path):
    vocab = Vocab(40, 32, 16)
    CM3LeonTransformer(ModelConfig.from_preset("tiny", vocab_size=vocab.size)).save_pretrained(tmp_path / "m")
    assert isinstance(loop.build_model(tmp_path / "m", vocab), CM3LeonTransformer)
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    with pytest.raises(CM3LeonError, match=r"m/model.safetensors: model weights file truncated"):
        loop.build_model(tmp_path / "m", vocab)
    weights.unlink()
    with pytest.raises(CM3LeonError, match=r"m/model.safetensors: missing"):
        loop.build_model(tmp_path / "m", vocab)


def test_resuming_a_run_with_another_model_config_names_the_checkpoint(tmp_path):
    codes = make_codes(tmp_path, neighbors=0)
    pretrain(codes, tmp_path / "run", preset="tiny", steps=1, eval_every=0)
    with pytest.raises(CM3LeonError, match=r"step-00000001: checkpoint of a different model config.*d_model"):
        pretrain(codes, tmp_path / "run", preset="tiny", steps=2, model={"d_model": 64})


def test_config_file_flags_and_set_merge_with_typed_values(tmp_path):
    from cm3leon.objectives.cm3 import CM3Config
    from cm3leon.train.options import load_pretrain_options

    root = Path(__file__).resolve().parents[1] / "configs"
    # The shipped demo config spells out the demo preset exactly.
    data, out, preset, over = load_pretrain_options(root / "pretrain_demo.yaml")
    train_keys = set(TrainConfig.__dataclass_fields__)
    assert preset == "demo" and (data, out) == ("runs/demo/tokenize", "runs/demo/pretrain")
    assert TrainConfig.from_preset("demo", **{k: v for k, v in over.items() if k in train_keys}) == \
        TrainConfig.from_preset("demo")
    assert ModelConfig.from_preset("demo", vocab_size=100, **over["model"]) == ModelConfig.from_preset("demo", vocab_size=100)
    assert CM3Config(**{k: v for k, v in over.items() if k in CM3Config.__dataclass_fields__}) == CM3Config()
    _, _, preset, over = load_pretrain_options(root / "pretrain_350m.yaml")
    paper = TrainConfig.from_preset("350m")
    assert (over["lr"], over["steps"], over["batch_tokens"], over["warmup_steps"], over["betas"]) == \
        (paper.lr, paper.steps, paper.batch_tokens, paper.warmup_steps, paper.betas)
    # file < flags < --set; values typed by their field ("6e-4" is a float, "1,2" a tuple).
    cfg = tmp_path / "run.yaml"
    cfg.write_text("preset: tiny\ntrain:\n  lr: 6e-4\n  steps: 5\n  seed: 1\ncm3:\n  mask_segments: [-2, -1]\n"
                   "sequences:\n  order: random\n")
    _, _, preset, over = load_pretrain_options(cfg, ["seed=3", "train.betas=0.9,0.95", "compile=true",
                                                     "model.d_ff=null", "cm3.loss_on=[-1, spans]"],
                                               {"steps": 7, "seed": 2, "lr": None, "retrieval_dropout": 0.25})
    assert preset == "tiny"
    assert over == {"lr": 6e-4, "steps": 7, "seed": 3, "betas": (0.9, 0.95), "compile": True,
                    "mask_segments": [-2, -1], "loss_on": [-1, "spans"], "order": "random", "model": {"d_ff": None},
                    "retrieval_dropout": 0.25}
    (tmp_path / "run.json").write_text(json.dumps({"train": {"steps": 4}}))
    assert load_pretrain_options(tmp_path / "run.json")[3] == {"steps": 4}
    # Bad keys and values name the key and the file (or the --set).
    for text, match in (("train:\n  lrr: 1\n", r"run.yaml: unknown key 'train.lrr'"),
                        ("train:\n  lr: fast\n", r"run.yaml: train.lr must be float, got 'fast'"),
                        ("train:\n  steps: 2.5\n", r"run.yaml: train.steps must be int"),
                        ("train:\n  parallel: tp\n", r"run.yaml: TrainConfig.parallel must be one of"),
                        ("sequences:\n  order: sideways\n", r"run.yaml: sequences.order must be one of"),
                        ("sequences:\n  retrieval_dropout: 2\n", r"run.yaml: sequences.retrieval_dropout must be in"),
                        ("cm3: [1]\n", r"run.yaml: section 'cm3' must be a mapping"),
                        ("train: {steps: [\n", r"run.yaml: not valid YAML")):
        cfg.write_text(text)
        with pytest.raises(CM3LeonError, match=match):
            load_pretrain_options(cfg)
    with pytest.raises(CM3LeonError, match=r"--set max_spans=x: cm3.max_spans must be int"):
        load_pretrain_options(None, ["max_spans=x"])
    with pytest.raises(CM3LeonError, match=r"--set nope=1: unknown key 'nope'"):
        load_pretrain_options(None, ["nope=1"])
    with pytest.raises(CM3LeonError, match=r"--config .*missing.yaml: file not found"):
        load_pretrain_options(tmp_path / "missing.yaml")


def test_cli_pretrain_runs_from_a_config_file(tmp_path, capsys):
    from cm3leon.cli import main

    codes = make_codes(tmp_path, neighbors=0)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"preset: tiny\ndata: {codes}\nout: {tmp_path / 'run'}\ntrain:\n  steps: 3\n  lr: 2e-3\n"
                   "  eval_every: 0\n  log_every: 1\n")
    assert main(["pretrain", "--config", str(cfg), "--set", "train.steps=2", "--peak-tflops", "1.5"]) == 0
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["steps"] == 2 and summary["train_config"]["lr"] == 2e-3 and summary["peak_tflops"] == 1.5
    cfg.write_text("train:\n  steps: 0\n")
    assert main(["pretrain", "--config", str(cfg), "--data", str(codes), "--out", str(tmp_path / "x")]) == 2
    assert "TrainConfig.steps must be >= 1" in capsys.readouterr().err


def _torchrun(codes: Path, out: Path, parallel: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "cm3leon.cli", "pretrain", "--data", str(codes), "--out", str(out), "--preset", "tiny",
           "--steps", "8", "--parallel", parallel, "--num-retrieved", "1"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.slow
def test_torchrun_two_processes_fsdp2_and_ddp_agree_and_export_a_model(tmp_path):
    codes = make_codes(tmp_path)
    curves = {}
    for parallel in ("fsdp2", "ddp"):
        out = tmp_path / parallel
        proc = _torchrun(codes, out, parallel)
        assert proc.returncode == 0, proc.stderr[-3000:]
        summary = json.loads((out / "train_summary.json").read_text())
        assert (summary["world_size"], summary["parallel"]) == (2, parallel)
        curves[parallel] = [loss for _, loss in losses(out)]
        assert len(curves[parallel]) == 8 and all(np.isfinite(curves[parallel]))
        assert curves[parallel][-1] < curves[parallel][0]
        CM3LeonTransformer.from_pretrained(out)
        assert (out / "vocab.json").is_file() and (out / "checkpoints" / "step-00000008").is_dir()
    # Same data, same init, same maths: sharding the model must not change the losses.
    np.testing.assert_allclose(curves["fsdp2"], curves["ddp"], rtol=1e-5)

    # The FSDP2 run's outputs reload in ONE process: the model directory and the final
    # (sharded-then-gathered) checkpoint give identical logits, and together reproduce the
    # validation loss the two ranks measured (each rank's shard of the validation blocks).
    from cm3leon.objectives.sequences import CM3PretrainStream
    from cm3leon.train import checkpoint as ckpt

    out = tmp_path / "fsdp2"
    summary = json.loads((out / "train_summary.json").read_text())
    exported = CM3LeonTransformer.from_pretrained(out)
    fresh = CM3LeonTransformer(exported.config)
    info = loop.setup_distributed()
    state = ckpt.load_checkpoint(out / "checkpoints" / "step-00000008", fresh,
                                 torch.optim.AdamW(fresh.parameters()), info, exported.config.to_dict())
    assert state["step"] == 8 and state["world_size"] == 2
    tokens = torch.randint(0, exported.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(exported(tokens)[0], fresh.eval()(tokens)[0])
    cfg = TrainConfig.from_preset("tiny")
    batches = []
    for rank in range(2):
        val = CM3PretrainStream(codes, "val", seq_len=cfg.seq_len, num_retrieved=1, vocab=Vocab.load(out),
                                shuffle=False, epochs=1)
        val.set_shard(rank, 2)
        batches += loop._val_batches(val, cfg, info)
    assert loop.evaluate(exported, batches, info, loop.nullcontext) == pytest.approx(summary["final_val_loss"],
                                                                                     rel=1e-5)


def test_dtype_auto_takes_the_faster_of_bf16_and_fp32_as_measured(monkeypatch):
    """`dtype: auto` measures both matmul rates and takes bf16 only where it is faster by a
    margin (CPUs with bf16 units), fp32 where bf16 is slower or barely faster; the run's
    summary records the choice and the probe."""
    from cm3leon.train import flops

    rates = {}
    monkeypatch.setattr(flops, "measure_matmul_tflops", lambda dev, dtype, size, min_seconds: rates[dtype])
    for fp32, bf16, want in ((0.06, 0.001, "fp32"), (0.06, 0.36, "bf16"), (0.06, 0.062, "fp32")):
        rates.update({torch.float32: fp32, torch.bfloat16: bf16})
        dtype, probe = loop.resolve_dtype("auto", loop.setup_distributed())
        assert dtype == want and probe == {"fp32_gflops": fp32 * 1e3, "bf16_gflops": bf16 * 1e3}
    assert loop.resolve_dtype("fp32", loop.setup_distributed()) == ("fp32", {})
    with pytest.raises(CM3LeonError, match="dtype"):
        TrainConfig(dtype="fp16")


def test_pretrain_with_dtype_auto_records_the_measured_choice(tmp_path):
    codes = make_codes(tmp_path)
    summary = pretrain(codes, tmp_path / "run", preset="tiny", steps=2, dtype="auto", eval_every=0)
    assert summary["dtype"] in ("bf16", "fp32")
    assert set(summary["dtype_probe"]) == {"fp32_gflops", "bf16_gflops"}
    faster = "bf16" if summary["dtype_probe"]["bf16_gflops"] > 1.1 * summary["dtype_probe"]["fp32_gflops"] else "fp32"
    assert summary["dtype"] == faster


def test_pretrain_starts_image_embeddings_from_the_tokenizers_codebook(tmp_path, monkeypatch):
    """model.image_embedding_init: a fresh model's image rows are set from the codebook of the
    image tokenizer the codes name, before the first step; a tokenizer that cannot be read is a
    named error before training."""
    from cm3leon.model.transformer import CM3LeonTransformer
    from cm3leon.tokenizers.image import VQModel, get_preset
    from test_sequences import CODEBOOK

    codes = make_codes(tmp_path)
    with pytest.raises(CM3LeonError, match="image_tokenizer"):  # make_codes names a stand-in folder
        pretrain(codes, tmp_path / "bad", preset="tiny", steps=1, model={"image_embedding_init": 0.05})
    assert not (tmp_path / "bad" / "model.safetensors").exists()

    torch.manual_seed(0)
    tok = VQModel(get_preset("patch48", codebook_size=CODEBOOK))
    with torch.no_grad():
        tok.quantize.embedding.weight.normal_()
    tok.save_pretrained(tmp_path / "image_tokenizer")
    calls = []
    real = CM3LeonTransformer.init_image_embeddings

    def spy(self, codebook, image_offset, std, power=1.0):
        calls.append((codebook.clone(), image_offset, std, power))
        return real(self, codebook, image_offset, std, power)

    monkeypatch.setattr(CM3LeonTransformer, "init_image_embeddings", spy)
    pretrain(codes, tmp_path / "run", preset="tiny", steps=1, eval_every=0,
             model={"image_embedding_init": 0.05, "image_embedding_power": 0.5})
    (codebook, offset, std, power), = calls
    assert torch.equal(codebook, tok.quantize.codebook()) and (std, power) == (0.05, 0.5)
    assert offset == Vocab.load(tmp_path / "run").image_offset
    pretrain(codes, tmp_path / "plain", preset="tiny", steps=1, eval_every=0)
    assert len(calls) == 1  # the paper's init unless asked
    with pytest.raises(CM3LeonError, match="image_embedding_power"):
        ModelConfig.from_preset("tiny", vocab_size=100, image_embedding_power=-0.5)
