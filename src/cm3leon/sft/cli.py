"""`cm3leon sft`: instruction tuning of a pretrained model on the paper's task templates.

    cm3leon sft --init runs/x/pretrain --data runs/x/data --out runs/x/sft --preset demo
    torchrun --nproc_per_node=8 -m cm3leon.cli sft --init ... --data ... --out ... --preset 350m

Reads the SFT records (`cm3leon.sft.data`), encodes every image once with the model's own
image tokenizer into `<out>/sft_data/`, samples the task mixture (`cm3leon.sft.mixture`) and
runs the same trainer as pretraining (`cm3leon.train.loop.train`) from the pretrained weights.
The output directory is a model directory (`CM3Leon.from_pretrained`), plus sft_summary.json
with the SFT loss of the model before and after, on fixed train and validation batches.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cm3leon.errors import CM3LeonError
from cm3leon.train.config import DTYPES
from cm3leon.utils.presets import lookup

# SFT changes to the train preset of the same name. Paper (Sec. 4): LR 5e-5, 150 warmup steps.
# The CPU presets fine-tune a model of a few million parameters for ~1-2 minutes: with so few
# steps the paper's LR barely moves it, so they use about a third of their pretraining peak
# (demo: 1.5e-3 -> 5e-4) and 10% warmup. Steps of the paper-size presets are not a paper
# figure: set --steps for your data.
SFT_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(steps=30, lr=1e-3, warmup_steps=3, eval_every=10, ckpt_every=30),
    "demo-small": dict(steps=150, lr=6e-4, warmup_steps=15, eval_every=50, ckpt_every=50),
    "demo": dict(steps=150, lr=5e-4, warmup_steps=15, eval_every=50, ckpt_every=50),
    "350m": dict(steps=3000, lr=5e-5, warmup_steps=150, eval_every=500, ckpt_every=500),
    "760m": dict(steps=3000, lr=5e-5, warmup_steps=150, eval_every=500, ckpt_every=500),
    "7b": dict(steps=3000, lr=5e-5, warmup_steps=150, eval_every=500, ckpt_every=500),
}
SFT_OPTIONS = ("tasks", "response_only", "encode_batch_size")


def _check_model_dir(init: Path) -> None:
    for name in ("config.json", "model.safetensors", "vocab.json", "text_tokenizer", "image_tokenizer"):
        if not (init / name).exists():
            raise CM3LeonError(f"--init {init}: not a model directory (no {name}); pass the output of "
                               "`cm3leon pretrain`")


def _parse_tasks(tasks: str | Sequence[str] | None) -> list[str] | None:
    if tasks is None:
        return None
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    if not tasks:
        raise CM3LeonError("--tasks is empty")
    return list(tasks)


def _wait_for_cache(out_dir: Path, timeout_s: float = 3600.0) -> Path:
    """Non-zero ranks wait for rank 0 to write the code cache."""
    from cm3leon.sft.data import CACHE_DIR

    path, t0 = out_dir / CACHE_DIR, time.time()
    while not (path / "meta.json").is_file():
        if time.time() - t0 > timeout_s:
            raise CM3LeonError(f"timed out waiting for rank 0 to write {path}")
        time.sleep(2.0)
    return path


def _check_lengths(sft, seq_len: int) -> None:
    """Refuse a task none of whose documents fits a block; warn when some do not."""
    import warnings

    for task, ix in sft.task_indices("train").items():
        lengths = np.array([len(sft.document(int(i)).tokens) for i in ix])
        too_long = int((lengths > seq_len).sum())
        if too_long == len(ix):
            raise CM3LeonError(f"no {task!r} document fits a {seq_len}-token block (shortest: {lengths.min()} "
                               "tokens); raise --seq-len (up to the model's context) or leave the task out with --tasks")
        if too_long:
            warnings.warn(f"{too_long} of {len(ix)} {task!r} documents exceed {seq_len} tokens and are skipped",
                          stacklevel=2)


def _fixed_batches(stream, micro_batch_size: int, count: int) -> list:
    """The first `count` micro-batches of a stream (a fixed set to compare models on)."""
    import torch

    out, rows = [], []

    def batch():
        cols = list(zip(*rows))  # tokens, targets[, position ids]
        return (torch.stack(cols[0]), torch.stack(cols[1]), torch.stack(cols[2]) if len(cols) > 2 else None)

    for tokens, targets, _, *positions in stream:
        rows.append((tokens, targets, *positions))
        if len(rows) == micro_batch_size:
            out.append(batch())
            rows = []
            if len(out) == count:
                return out
    if rows:
        out.append(batch())
    return out


def _loss(model_dir: Path, batches: list, device: str) -> float | None:
    """Mean loss per target token of a model directory on fixed batches (fp32)."""
    from contextlib import nullcontext

    import torch

    from cm3leon.model.transformer import CM3LeonTransformer
    from cm3leon.train.loop import evaluate
    from cm3leon.train.parallel import DistInfo

    if not batches:
        return None
    model = CM3LeonTransformer.from_pretrained(model_dir, device=device)
    loss = evaluate(model, batches, DistInfo(device=torch.device(device)), nullcontext)
    del model
    return loss


def run_sft(init_dir: str | Path, data: str | Path | Sequence[str | Path], out_dir: str | Path,
            preset: str = "demo", **overrides: Any) -> dict:
    """Instruction-tune the model in `init_dir` on `data` (dataset folders and/or SFT JSONL
    files); write a model directory to `out_dir`; return the train summary with
    `summary["sft"]` = SFT losses before/after on fixed train and validation batches.

    overrides: any TrainConfig field (steps, lr, warmup_steps, seq_len, batch_tokens, ...);
    MixtureConfig fields (weights, min_ratio, max_ratio, response_mask_prob, loss_on,
    epoch_size); CM3Config fields (poisson_lambda, min_spans, max_spans, mask_segments);
    tasks (list or "caption,vqa,..."); response_only (True -> loss_on="response");
    encode_batch_size (images per image-tokenizer batch)."""
    import torch

    from cm3leon.objectives.cm3 import CM3Config
    from cm3leon.sft.data import OPT_IN_TASKS, SFTData, build_sft_cache
    from cm3leon.sft.mixture import MixtureConfig, SFTStream
    from cm3leon.tokenizers.text import TextTokenizer
    from cm3leon.tokenizers.vocab import Vocab
    from cm3leon.train.config import TrainConfig
    from cm3leon.train.loop import train
    from cm3leon.utils.io import read_json, write_json

    init, out_dir = Path(init_dir), Path(out_dir)
    sources = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    train_keys = {f.name for f in fields(TrainConfig)}
    mix_keys = {f.name for f in fields(MixtureConfig)} - {"cm3"}
    cm3_keys = {f.name for f in fields(CM3Config)} - {"loss_on"}
    unknown = sorted(set(overrides) - train_keys - mix_keys - cm3_keys - set(SFT_OPTIONS))
    if unknown:
        raise CM3LeonError(f"sft: unknown option(s) {unknown}")
    sft_preset = lookup(SFT_PRESETS, preset, "SFT")
    _check_model_dir(init)

    model_cfg = read_json(init / "config.json", "model config")
    train_over = {**sft_preset, **{k: v for k, v in overrides.items() if k in train_keys}}
    cfg = TrainConfig.from_preset(preset, **train_over)
    max_len = int(model_cfg.get("max_seq_len", cfg.seq_len))
    if cfg.seq_len > max_len:
        if "seq_len" in overrides:
            raise CM3LeonError(f"--seq-len {cfg.seq_len} exceeds the model's context max_seq_len={max_len}")
        cfg = cfg.replace(seq_len=max_len)
    mix_over = {k: v for k, v in overrides.items() if k in mix_keys}
    if overrides.get("response_only"):
        mix_over["loss_on"] = "response"
    mix = MixtureConfig(**mix_over, cm3=CM3Config(**{k: v for k, v in overrides.items() if k in cm3_keys}))
    tasks = _parse_tasks(overrides.get("tasks"))

    vocab = Vocab.load(init)
    tok = TextTokenizer.load(init / "text_tokenizer")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if int(os.environ.get("RANK", "0")) == 0:
        opt_in = [t for t, w in (mix.weights or {}).items() if t in OPT_IN_TASKS and w > 0]
        cache = build_sft_cache(sources, out_dir, init / "image_tokenizer", tasks,
                                batch_size=int(overrides.get("encode_batch_size", 64)), device=device, opt_in=opt_in)
    else:
        cache = _wait_for_cache(out_dir)
    sft = SFTData(cache, vocab, tok)

    _check_lengths(sft, cfg.seq_len)
    stream_kw = dict(seq_len=cfg.seq_len, vocab=vocab, config=mix, seed=cfg.seed)
    train_data = SFTStream(sft, "train", mix=True, **stream_kw)
    has_val = any(len(ix) for ix in sft.task_indices("val").values())
    val_data = SFTStream(sft, "val", mix=False, shuffle=False, epochs=1, **stream_kw) if has_val else None

    # Fixed batches to compare the model before and after (fp32, rank 0 only), positioned as
    # the trainer positions its blocks.
    is_main = int(os.environ.get("RANK", "0")) == 0
    fixed = {}
    if is_main:
        from cm3leon.model.config import ModelConfig
        from cm3leon.train.loop import set_stream_positions

        model_config = ModelConfig.from_dict(model_cfg)
        sample = SFTStream(sft, "train", mix=True, shuffle=False, epochs=1, **{**stream_kw, "seed": cfg.seed + 1})
        fixed_streams = {"train": sample}
        if val_data is not None:
            fixed_streams["val"] = SFTStream(sft, "val", mix=False, shuffle=False, epochs=1, **stream_kw)
        for name, stream in fixed_streams.items():
            set_stream_positions(stream, cfg, model_config)
            fixed[name] = _fixed_batches(stream, cfg.micro_batch_size, cfg.eval_batches)
    before = {k: _loss(init, b, device) for k, b in fixed.items()}

    from cm3leon.train.cli import MODEL_DIR_PARTS

    extra_files = {name: init / name for name in MODEL_DIR_PARTS if (init / name).exists()}
    extra_summary = {
        "stage": "sft", "init": str(init), "data": [str(s) for s in sources], "preset": preset,
        "tasks": sorted(train_data.sizes), "train_examples": train_data.sizes,
        "val_examples": val_data.sizes if val_data is not None else {},
        "mixture_probabilities": train_data.probabilities, "mixture": mix.to_dict(),
        "cache": {k: sft.meta[k] for k in ("num_examples", "num_images", "skipped")},
    }
    summary = train(init, train_data, val_data, cfg, out_dir, vocab, extra_files=extra_files,
                    extra_summary=extra_summary)

    after = {k: _loss(out_dir, b, device) for k, b in fixed.items()}
    metrics = {"train_loss_before": before.get("train"), "train_loss_after": after.get("train"),
               "val_loss_before": before.get("val"), "val_loss_after": after.get("val"),
               "eval_tokens": {k: int(sum(int((t != -100).sum()) for _, t, _ in b)) for k, b in fixed.items()},
               "skipped_too_long": train_data.skipped}
    summary["sft"] = metrics
    if is_main:
        write_json(out_dir / "sft_summary.json", {**extra_summary, **metrics})
    return summary


def _weights(s: str | None) -> dict[str, float] | None:
    if s is None:
        return None
    out = {}
    for part in s.split(","):
        name, sep, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise CM3LeonError(f"--weights: expected task=number pairs separated by commas, got {part!r}")
    return out


def register(sub) -> None:
    p = sub.add_parser("sft", help="instruction tuning (paper templates + task mixture) from a pretrained model")
    p.add_argument("--init", required=True, help="pretrained model directory (cm3leon pretrain output)")
    p.add_argument("--data", required=True, action="append",
                   help="dataset folder (captions/vqa/edits/layouts.jsonl, sft.jsonl) or an SFT .jsonl file; repeatable")
    p.add_argument("--out", required=True, help="output model directory; re-running resumes")
    p.add_argument("--preset", default="demo", help=f"train preset: {', '.join(SFT_PRESETS)}")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (paper: 5e-5)")
    p.add_argument("--warmup-steps", type=int, default=None, help="linear warmup steps (paper: 150)")
    p.add_argument("--tasks", default=None, help="comma-separated tasks, e.g. caption,vqa,edit,t2i,layout (default: all found; vqa_image, "
                        "the VQA records read the other way, only when named here or in --weights)")
    p.add_argument("--weights", default=None, help="target share per task, e.g. vqa=2,caption=1 (default: equal)")
    p.add_argument("--response-only", action="store_true", default=None, help="loss on the response tokens only")
    p.add_argument("--response-mask-prob", type=float, default=None,
                   help="P(response in its inference form) instead of random CM3 spans (default 0.5)")
    p.add_argument("--seq-len", type=int, default=None, help="block length (default: preset, capped at the model's context)")
    p.add_argument("--batch-tokens", type=int, default=None, help="tokens per optimizer step over all ranks")
    p.add_argument("--micro-batch-size", type=int, default=None, help="blocks per forward pass per rank")
    p.add_argument("--parallel", choices=("auto", "none", "ddp", "fsdp2"), default=None)
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="autocast dtype; auto: the faster of bf16 and fp32, measured at start")
    p.add_argument("--num-workers", type=int, default=None, help="DataLoader workers per rank")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--override-config", action="store_true", default=None,
                   help="resume even when the checkpoint was written with another training config (lr, seed, batch layout, ...)")
    p.set_defaults(func=_sft)


def _sft(args) -> int:
    keys = ("steps", "lr", "warmup_steps", "tasks", "response_only", "response_mask_prob", "seq_len",
            "batch_tokens", "micro_batch_size", "parallel", "dtype", "num_workers", "seed", "override_config")
    summary = run_sft(args.init, args.data, args.out, preset=args.preset, weights=_weights(args.weights),
                      **{k: getattr(args, k) for k in keys})
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"steps": summary["steps"], "tokens_seen": summary["tokens_seen"],
                          "mixture_probabilities": summary["mixture_probabilities"], **summary["sft"]}, indent=2))
    return 0
