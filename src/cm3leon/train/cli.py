"""`cm3leon pretrain`: CM3 + retrieval-augmented pretraining on code shards.

One process:      cm3leon pretrain --data runs/x/tokenize --out runs/x/pretrain --preset demo
From a file:      cm3leon pretrain --config configs/pretrain_demo.yaml --set train.lr=1e-3
Several (FSDP2):  torchrun --nproc_per_node=8 -m cm3leon.cli pretrain --config configs/pretrain_350m.yaml
The plan only:    cm3leon pretrain --config configs/pretrain_350m_cc3m.yaml --dry-run --world-size 8
"""

from __future__ import annotations

import json
import os
from dataclasses import fields
from pathlib import Path
from typing import Any

from cm3leon.errors import CM3LeonError
from cm3leon.train.config import DTYPES

# Folders named in the code shards' meta.json that belong in the model directory.
# What a model directory carries beside its weights (pretraining and SFT copy them along).
MODEL_DIR_PARTS = ("text_tokenizer", "image_tokenizer", "retriever", "index")
DATA_OPTIONS = ("num_retrieved", "retrieval_dropout", "order", "image_first_prob", "val_query_records")
DEFAULT_VAL_QUERY_RECORDS = 256  # validation records scored by the query-pair loss


def _resolve(codes_dir: Path, value: str) -> Path:
    p = Path(value)
    return p if p.is_absolute() or p.exists() else codes_dir / p


def _fresh_model_with_codebook(config, seed: int, image_tokenizer: Path | None, vocab):
    """A new model (seeded as the trainer seeds it) whose image-code embeddings start from the
    image tokenizer's codebook (`ModelConfig.image_embedding_init`)."""
    import torch

    from cm3leon.model.transformer import CM3LeonTransformer
    from cm3leon.tokenizers.image import VQModel

    if image_tokenizer is None:
        raise CM3LeonError("model.image_embedding_init needs the image tokenizer, but the codes' meta.json "
                           "names none")
    codebook = VQModel.from_pretrained(image_tokenizer).quantize.codebook()
    if codebook.shape[0] != vocab.image_vocab_size:
        raise CM3LeonError(f"{image_tokenizer}: {codebook.shape[0]} codes, but the codes' vocabulary has "
                           f"{vocab.image_vocab_size}")
    torch.manual_seed(seed)
    net = CM3LeonTransformer(config)
    net.init_image_embeddings(codebook, vocab.image_offset, config.image_embedding_init,
                              config.image_embedding_power)
    return net


def pretrain(codes_dir: str | Path, out_dir: str | Path, preset: str = "demo", **overrides: Any) -> dict:
    """Pretrain a CM3Leon decoder on a tokenized directory; returns the train summary.

    preset: names both the model preset and the train preset (tiny, demo-small, demo, 350m,
    760m, 7b). overrides: any TrainConfig field (steps, seq_len, lr, batch_tokens, parallel,
    seed, ...); CM3Config fields (poisson_lambda, min_spans, max_spans, mask_segments);
    num_retrieved (default: 2 when the codes have neighbors.npy, else 0); retrieval_dropout
    (the fraction of training records shown without their retrieved documents); order
    (text_first | image_first | random); image_first_prob; val_query_records (the first N
    validation records, scored by the query-pair loss when val_loss_on is "query" or
    "both"); init (a model directory to start from instead of a fresh model); model (a dict
    of ModelConfig overrides). A config file maps onto these: see `cm3leon.train.options`."""
    import numpy as np

    from cm3leon.data.codes import CodeDataset
    from cm3leon.objectives.sequences import NEIGHBORS_FILE, CM3PretrainStream, query_pair_cm3, vocab_for_codes
    from cm3leon.model.config import ModelConfig
    from cm3leon.objectives.cm3 import CM3Config
    from cm3leon.tokenizers.vocab import Vocab
    from cm3leon.train.config import TrainConfig
    from cm3leon.train.loop import VAL, VAL_QUERY, train
    from cm3leon.train.options import check_sequence_options

    codes_dir, out_dir = Path(codes_dir), Path(out_dir)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    train_keys = {f.name for f in fields(TrainConfig)}
    cm3_keys = {f.name for f in fields(CM3Config)}
    unknown = sorted(set(overrides) - train_keys - cm3_keys - set(DATA_OPTIONS) - {"init", "model"})
    if unknown:
        raise CM3LeonError(f"pretrain: unknown option(s) {unknown}")
    cfg = TrainConfig.from_preset(preset, **{k: v for k, v in overrides.items() if k in train_keys})
    cm3 = CM3Config(**{k: v for k, v in overrides.items() if k in cm3_keys})
    check_sequence_options({k: overrides.get(k) for k in DATA_OPTIONS})

    codes = CodeDataset(codes_dir)
    vocab = vocab_for_codes(codes)
    if "init" in overrides:
        init = Path(overrides["init"])
        if (init / "vocab.json").is_file() and Vocab.load(init) != vocab:
            raise CM3LeonError(f"--init {init}: its vocab.json differs from the vocabulary of {codes_dir}")
        model: Any = init
    else:
        model = fresh_model_config(preset, vocab, overrides.get("model", {}))

    num_retrieved = overrides.get("num_retrieved")
    if num_retrieved is None:
        nb = codes_dir / NEIGHBORS_FILE
        num_retrieved = min(2, int(np.load(nb, mmap_mode="r").shape[1])) if nb.is_file() else 0
    data_kw = dict(seq_len=cfg.seq_len, num_retrieved=num_retrieved, order=overrides.get("order", "text_first"),
                   image_first_prob=overrides.get("image_first_prob", 0.5), cm3=cm3, vocab=vocab, seed=cfg.seed)
    train_data = CM3PretrainStream(codes_dir, "train", retrieval_dropout=overrides.get("retrieval_dropout", 0.0),
                                   **data_kw)
    has_val = int(codes.meta.get("splits", {}).get("val", 0)) > 0
    val_data = {}
    if has_val and cfg.val_loss_on in ("all", "both"):
        val_data[VAL] = CM3PretrainStream(codes_dir, "val", shuffle=False, epochs=1, **data_kw)
    if has_val and cfg.val_loss_on in ("query", "both"):
        # The query pair alone, unmasked, after its retrieved documents: the same tokens of
        # the same records at any num_retrieved (a fair k = 2 vs k = 0 comparison).
        val_data[VAL_QUERY] = CM3PretrainStream(
            codes_dir, "val", shuffle=False, epochs=1, **{**data_kw, "cm3": query_pair_cm3()},
            max_items=int(overrides.get("val_query_records", DEFAULT_VAL_QUERY_RECORDS)))

    # The tokenizers are named in the shards' meta.json; the retriever and its index in
    # neighbors.json, written beside the shards by `cm3leon index neighbors`.
    sources = dict(codes.meta)
    if num_retrieved and (codes_dir / "neighbors.json").is_file():
        nb_meta = json.loads((codes_dir / "neighbors.json").read_text())
        sources.update({k: nb_meta[k] for k in ("retriever", "index") if nb_meta.get(k)})
    extra_files = {name: _resolve(codes_dir, sources[name]) for name in MODEL_DIR_PARTS if sources.get(name)}
    if isinstance(model, ModelConfig) and model.image_embedding_init > 0:
        model = _fresh_model_with_codebook(model, cfg.seed, extra_files.get("image_tokenizer"), vocab)
    summary = {"codes_dir": str(codes_dir), "preset": preset, "num_retrieved": num_retrieved,
               "retrieval_dropout": train_data.retrieval_dropout,
               "order": data_kw["order"], "cm3": cm3.to_dict(),
               "init": str(overrides["init"]) if "init" in overrides else None,
               "val_query_records": val_data[VAL_QUERY].num_items if VAL_QUERY in val_data else None}
    return train(model, train_data, val_data or None, cfg, out_dir, vocab, extra_files=extra_files,
                 extra_summary=summary)


def fresh_model_config(preset: str, vocab, model_overrides: dict):
    """The ModelConfig of a new model for `preset` over `vocab` (None: the preset's or the
    overrides' own vocab_size): segment positions (when the preset or --set
    model.segment_positions asks) restart after the vocabulary's <break> and <eos>."""
    from cm3leon.model.config import ModelConfig

    kw = {} if vocab is None else {"vocab_size": vocab.size, "segment_delimiters": [vocab.break_id, vocab.eos_id]}
    return ModelConfig.from_preset(preset, **{**kw, **model_overrides})


def plan_pretrain(data: str | Path | None, preset: str, world_size: int, assumed_mfu: float = 0.4,
                  gpu_memory_gib: float | None = None, **overrides: Any) -> dict:
    """`training_plan` of the run `pretrain(data, preset=preset, **overrides)` would start,
    on `world_size` ranks, without data or a GPU: the vocabulary comes from `data`'s
    meta.json when there is one, else from the preset (or `model.vocab_size`)."""
    from cm3leon.objectives.sequences import vocab_for_codes
    from cm3leon.train.config import TrainConfig
    from cm3leon.train.plan import training_plan

    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "init" in overrides:
        raise CM3LeonError("--dry-run plans a fresh model; drop --init")
    train_keys = {f.name for f in fields(TrainConfig)}
    cfg = TrainConfig.from_preset(preset, **{k: v for k, v in overrides.items() if k in train_keys})
    vocab = vocab_for_codes(data) if data is not None and (Path(data) / "meta.json").is_file() else None
    try:
        model = fresh_model_config(preset, vocab, overrides.get("model", {}))
    except CM3LeonError as e:
        if "needs vocab_size" not in str(e):
            raise
        raise CM3LeonError(f"--dry-run: preset {preset!r} names no vocabulary size; pass --data (a tokenized "
                           "directory) or --set model.vocab_size=N") from None
    return training_plan(model, cfg, world_size, assumed_mfu=assumed_mfu, peak_tflops=cfg.peak_tflops or None,
                         gpu_memory_gib=gpu_memory_gib)


def register(sub) -> None:
    p = sub.add_parser("pretrain", help="CM3 + retrieval-augmented pretraining on code shards (torchrun-aware)")
    p.add_argument("--config", default=None,
                   help="YAML/JSON file of options (preset, data, out, train:, model:, cm3:, sequences:); "
                        "see configs/pretrain_demo.yaml. Flags and --set override it")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override one option, e.g. --set train.lr=3e-4 --set cm3.max_spans=4 (repeatable)")
    p.add_argument("--data", default=None, help="tokenized directory (cm3leon tokenize output)")
    p.add_argument("--out", default=None, help="run/model directory; re-running resumes from its checkpoints")
    p.add_argument("--preset", default=None,
                   help="model + train preset: tiny, demo-small, demo (default), 350m, 760m, 7b")
    p.add_argument("--init", default=None, help="model directory to start from instead of a fresh model")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps")
    p.add_argument("--batch-tokens", type=int, default=None, help="tokens per step over all ranks (paper 8M)")
    p.add_argument("--micro-batch-size", type=int, default=None, help="blocks per forward pass per rank")
    p.add_argument("--seq-len", type=int, default=None, help="block length in tokens")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate")
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--num-retrieved", type=int, default=None,
                   help="retrieved documents per sample (default 2 with neighbors.npy, else 0)")
    p.add_argument("--retrieval-dropout", type=float, default=None,
                   help="fraction of training samples shown without their retrieved documents (default 0)")
    p.add_argument("--order", choices=("text_first", "image_first", "random"), default=None,
                   help="pair order: text_first (text->image), image_first, random per sample")
    p.add_argument("--val-loss-on", choices=("all", "query", "both"), default=None,
                   help="validation loss on all CM3 targets, on the query pair only (val_query_loss: "
                        "comparable across --num-retrieved), or both")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="per-device peak TFLOP/s for MFU (default: measured by a matmul in the run's dtype)")
    p.add_argument("--parallel", choices=("auto", "none", "ddp", "fsdp2"), default=None,
                   help="auto: fsdp2 under torchrun, else none")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="autocast dtype; auto: the faster of bf16 and fp32, measured at start")
    p.add_argument("--activation-checkpointing", action="store_true", default=None)
    p.add_argument("--compile", action="store_true", default=None)
    p.add_argument("--num-workers", type=int, default=None, help="DataLoader workers per rank")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--override-config", action="store_true", default=None,
                   help="resume even when the checkpoint was written with another training config (lr, seed, batch layout, ...)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (parameters, FSDP2 shards and memory per rank, steps, tokens, tokens/s at "
                        "an assumed MFU) from a model built on the meta device; nothing is trained, no GPU needed")
    p.add_argument("--world-size", type=int, default=None,
                   help="--dry-run: ranks to plan for (default: $WORLD_SIZE, else 1)")
    p.add_argument("--assumed-mfu", type=float, default=0.4,
                   help="--dry-run: model FLOPs utilisation assumed for tokens/s (default 0.4)")
    p.add_argument("--gpu-memory-gib", type=float, default=None,
                   help="--dry-run: memory per GPU, to say whether the plan fits")
    p.set_defaults(func=_pretrain)


FLAGS = ("data", "out", "preset", "init", "steps", "batch_tokens", "micro_batch_size", "seq_len", "lr",
         "warmup_steps", "num_retrieved", "retrieval_dropout", "order", "val_loss_on", "peak_tflops", "parallel", "dtype",
         "activation_checkpointing", "compile", "num_workers", "seed", "override_config")


def _pretrain(args) -> int:
    from cm3leon.train.options import load_pretrain_options

    data, out, preset, overrides = load_pretrain_options(args.config, args.sets,
                                                         {k: getattr(args, k) for k in FLAGS})
    if args.dry_run:
        from cm3leon.train.plan import format_plan

        world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
        plan = plan_pretrain(data, preset, world, assumed_mfu=args.assumed_mfu, gpu_memory_gib=args.gpu_memory_gib,
                             **overrides)
        print(format_plan(plan))
        return 0
    for name, value in (("data", data), ("out", out)):
        if value is None:
            raise CM3LeonError(f"pretrain: no {name} directory; pass --{name} or set `{name}:` in --config")
    summary = pretrain(data, out, preset=preset, **overrides)
    if int(os.environ.get("RANK", "0")) == 0:
        keys = ("steps", "tokens_seen", "final_train_loss", "final_text_loss", "final_image_loss", "final_val_loss",
                "final_val_query_loss", "tokens_per_second", "mfu", "parallel", "world_size")
        print(json.dumps({k: summary[k] for k in keys if k in summary}, indent=2))
    return 0
