"""`cm3leon pipeline` and `cm3leon demo`: every stage in order, each reading and writing a
folder under OUT. A stage whose folder holds a `.done` marker is skipped, so a re-run resumes
after the last finished stage and Ctrl-C never damages finished stages."""

from __future__ import annotations

import importlib
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from cm3leon.errors import CM3LeonError
from cm3leon.run.summaries import DONE, RunFolder, StageDone
from cm3leon.utils.io import read_json, write_json


@dataclass
class PipelineContext:
    data: Path  # the dataset the pipeline runs on
    out: Path  # run folder: one subfolder per stage
    preset: str = "demo"
    quick: bool = False
    seed: int = 0
    results: dict = field(default_factory=dict)  # stage name -> what it returned

    def stage_dir(self, name: str) -> Path:
        return self.out / name


@dataclass
class Stage:
    name: str
    target: str  # "module:function" taking (ctx, out_dir) -> dict
    about: str

    def load(self) -> Callable:
        """The stage's function."""
        module, func = self.target.split(":")
        return getattr(importlib.import_module(module), func)


STAGES = (
    Stage("text_tokenizer", "cm3leon.run.stages:text_tokenizer", "byte-level BPE on the captions"),
    Stage("image_tokenizer", "cm3leon.run.stages:image_tokenizer", "VQ image tokenizer"),
    Stage("tokenize", "cm3leon.run.stages:tokenize", "dataset -> code shards"),
    Stage("retrieval", "cm3leon.run.stages:retrieval", "bi-encoder, memory bank, neighbours"),
    Stage("pretrain", "cm3leon.run.stages:pretrain", "CM3 + retrieval pretraining"),
    Stage("sft", "cm3leon.run.stages:sft", "instruction tuning"),
    Stage("generate", "cm3leon.run.stages:generate", "samples with every decoding method"),
    Stage("eval", "cm3leon.run.stages:evaluate", "metrics"),
    Stage("report", "cm3leon.run.stages:report", "report.html"),
)


def run_pipeline(ctx: PipelineContext, stages=STAGES, force: bool = False) -> dict:
    ctx.out.mkdir(parents=True, exist_ok=True)
    summary = {"data": str(ctx.data), "out": str(ctx.out), "preset": ctx.preset, "quick": ctx.quick, "stages": {}}
    t_all = time.time()
    for i, stage in enumerate(stages, 1):
        d = ctx.stage_dir(stage.name)
        marker = d / DONE
        head = f"[{i}/{len(stages)}] {stage.name}"
        done = StageDone.read(RunFolder(ctx.out), stage.name) if not force else None
        if done is not None:
            ctx.results[stage.name] = done.result
            summary["stages"][stage.name] = {"status": "skipped (already done)"}
            print(f"{head}: already done, skipping", file=sys.stderr)
            continue
        fn = stage.load()
        print(f"{head}: {stage.about} ...", file=sys.stderr)
        if d.exists():
            shutil.rmtree(d)  # an unfinished earlier attempt
        d.mkdir(parents=True)
        t0 = time.time()
        result = fn(ctx, d) or {}
        dt = time.time() - t0
        ctx.results[stage.name] = result
        write_json(marker, {"stage": stage.name, "seconds": round(dt, 2), "result": result})
        summary["stages"][stage.name] = {"status": "done", "seconds": round(dt, 2)}
        print(f"{head}: done in {dt:.1f}s (elapsed {time.time() - t_all:.0f}s)", file=sys.stderr)
        write_json(ctx.out / "pipeline.json", {**summary, "seconds": round(time.time() - t_all, 2), "finished": False})
    summary["seconds"] = round(time.time() - t_all, 2)
    summary["finished"] = True
    write_json(ctx.out / "pipeline.json", summary)
    return summary


def register(sub) -> None:
    p = sub.add_parser("pipeline", help="run every stage on a dataset, then the report")
    p.add_argument("--data", required=True, help="dataset folder (captions.jsonl, .tar shards or COCO JSON)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--preset", default=None, help="size preset (default demo; quick with --quick)")
    p.add_argument("--quick", action="store_true", help="smallest settings (the quick preset): a smoke run in minutes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="re-run finished stages")
    p.set_defaults(func=_pipeline)

    d = sub.add_parser("demo", help="synthesize the shapes dataset and run the whole pipeline on it")
    d.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    d.add_argument("--quick", action="store_true", help="smoke run in about 3 minutes (the quick preset)")
    d.add_argument("--preset", default=None, choices=DEMO_PRESETS,
                   help="demo (default), quick, or long: scenes of 1-3 objects and a longer recipe (<= 60 min)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--force", action="store_true", help="re-run finished stages")
    d.set_defaults(func=_demo)


def _pipeline(args) -> int:
    data = Path(args.data)
    if not data.exists():
        raise FileNotFoundError(f"--data: {data} does not exist")
    preset = args.preset or ("quick" if args.quick else "demo")
    ctx = PipelineContext(data=data, out=Path(args.out), preset=preset, quick=args.quick, seed=args.seed)
    summary = run_pipeline(ctx, force=args.force)
    print(json.dumps(summary, indent=2))
    return 0


DEMO_PRESETS = ("quick", "demo", "long")  # the presets `cm3leon demo` runs on built-in data


def _demo(args) -> int:
    from cm3leon.run.config import get_pipeline_preset
    from cm3leon.data.shapes import synthesize

    if args.quick and args.preset not in (None, "quick"):
        raise CM3LeonError(f"--quick is the quick preset; it cannot be combined with --preset {args.preset}")
    preset = args.preset or ("quick" if args.quick else "demo")
    out = Path(args.out)
    data = out / "data"
    marker = data / DONE
    # 48 px: the patch48 tokenizer's 8-px patches tile the scenes' 3x3 layout (config.py)
    settings = dict(get_pipeline_preset(preset).demo_data)
    if marker.is_file() and not args.force and read_json(marker).get("settings") != settings:
        raise CM3LeonError(f"{data} was synthesized with {read_json(marker).get('settings')}, not the {preset} "
                           f"preset's {settings}: use another --out, or --force to start over")
    if not marker.is_file() or args.force:
        if data.exists():
            shutil.rmtree(data)
        print(f"[0] synth: shapes dataset {settings}", file=sys.stderr)
        synthesize(data, seed=args.seed, **settings)
        write_json(marker, {"stage": "synth", "settings": settings})
    ctx = PipelineContext(data=data, out=out, preset=preset, quick=preset == "quick", seed=args.seed)
    summary = run_pipeline(ctx, force=args.force)
    print(json.dumps(summary, indent=2))
    return 0


def require_stage(ctx: PipelineContext, name: str) -> dict:
    if name not in ctx.results:
        raise CM3LeonError(f"stage {name!r} has not run in {ctx.out}")
    return ctx.results[name]
