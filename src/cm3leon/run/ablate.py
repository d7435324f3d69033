"""Ablations on one pipeline run: model size, retrieved documents k, decoding method, and a
DALL-E-style baseline, all trained on the same token budget (CM3Leon, Yu et al. 2023,
arXiv:2309.02591, Sec. 3 and Figures 2-4: larger models, retrieval and CFG / CD-K each lower
FID; the baseline is the plain left-to-right text->image model of DALL-E / Parti).

    cm3leon ablate --run runs/demo --preset quick
    cm3leon ablate --run runs/demo --baselines      # the "baselines" group instead

The "baselines" group (`cm3leon.run.baselines`) compares CM3Leon with a DALL-E-style model and a
latent-diffusion model at the same training FLOPs and the same training wall time, with
quality-vs-compute curves; it writes RUN/ablate/baselines/.

A finished run folder's shared stages are reused as they are: the tokenizers, the code shards
(RUN/tokenize, never re-tokenised) and the retriever with its memory bank (RUN/retrieval).
Each variant trains with `cm3leon.train.cli.pretrain` into RUN/ablate/<variant>/model for the
same number of steps of the same number of tokens, and is evaluated by
`cm3leon.eval.evaluate.evaluate_model` on text->image (shapes checker accuracy, FD and CLIP
score in the retriever's feature space, the same scorer for every variant). Variants whose
training settings are equal share one trained model; a variant with a `.done` marker is
skipped on a re-run, and an interrupted training resumes from its checkpoints.

Writes RUN/ablate/results.json ({"rows": [one per variant], ...}), results.md and PNG plots,
which the run report shows in its "Ablations" section.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from cm3leon.decode.config import DecodingConfig
from cm3leon.errors import CM3LeonError
from cm3leon.eval.evaluate import T2I_METRICS
from cm3leon.run.folder import RunInputs, codes_with_neighbors, run_inputs, run_preset_name
from cm3leon.run.summaries import DONE

if TYPE_CHECKING:
    from cm3leon.run.baselines import BaselinesSpec

ABLATION_PRESETS = ("quick", "full")
GROUPS = ("size", "retrieval", "decoding", "baseline")
METHODS = ("topp", "cfg", "cdk", "best_of_n")
# Settings that make the token budget: equal for every trained variant.
BUDGET_KEYS = ("steps", "seq_len", "batch_tokens", "warmup_steps", "eval_every", "eval_batches", "ckpt_every",
               "log_every", "micro_batch_size")
# The CPU demo sizes: a smaller decoder than demo-small, demo-small and demo.
CPU_SIZES = (("xs", "demo-small", {"n_layer": 2, "n_head": 2, "d_model": 128}),
             ("demo-small", "demo-small", {}), ("demo", "demo", {}))
PAPER_SIZES = (("350m", "350m", {}), ("760m", "760m", {}), ("7b", "7b", {}))
NOTES = (
    "Captioning (CIDEr) and VQA are instruction-tuning (SFT) metrics: these variants are pretrained only, so they "
    "are not measured here (see the run's eval/ for the SFT model).",
    "Validation losses compare only between variants with the same objective and k: retrieval and the "
    "baseline change what the loss is measured on.",
    "FD and CLIP score are computed in the run's retriever feature space (the same scorer for every variant); "
    "they are not comparable with published FID / CLIP numbers.",
    "Best-of-N re-ranks its candidates with the same retriever that computes the CLIP score: its CLIP score is "
    "optimistic by construction; judge it by the checker and FD.",
)


@dataclass
class AblationSpec:
    """What is compared and on what budget. Every trained variant gets `budget` (steps,
    block length, tokens per step, ...), so all see the same number of tokens."""

    base_preset: str = "demo-small"  # model + train preset of the reference model
    budget: dict = field(default_factory=dict)  # TrainConfig overrides shared by every trained variant
    sizes: tuple = CPU_SIZES  # (label, model + train preset, ModelConfig overrides) per size
    ks: tuple[int, ...] = (0, 1, 2)  # retrieved documents per training sequence compared
    base_k: int = 2  # k of the reference model (paper default: 2)
    order: str = "random"  # pair order of the CM3Leon variants (both directions, as the pipeline trains)
    methods: tuple[str, ...] = METHODS  # decoding methods compared on the reference model
    cfg_scale: float = DecodingConfig.cfg_scale  # CFG scale α of every CFG evaluation (the paper's 3)
    num_candidates: int = 4  # N of best-of-N
    num_prompts: int | None = 32  # text->image prompts per evaluation (test split captions)
    eval_batch_size: int = 16

    def __post_init__(self) -> None:
        self.sizes = tuple((str(a), str(b), dict(c)) for a, b, c in self.sizes)
        self.ks, self.methods = tuple(int(k) for k in self.ks), tuple(self.methods)
        if not self.sizes:
            raise CM3LeonError("AblationSpec.sizes: at least one model size is needed")
        if len({s[0] for s in self.sizes}) != len(self.sizes):
            raise CM3LeonError(f"AblationSpec.sizes: labels must be unique, got {[s[0] for s in self.sizes]}")
        if any(k < 0 for k in self.ks) or self.base_k < 0:
            raise CM3LeonError(f"AblationSpec: k must be >= 0, got ks={self.ks}, base_k={self.base_k}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise CM3LeonError(f"AblationSpec.methods: unknown {bad}; choose from {METHODS}")
        unknown = sorted(set(self.budget) - set(BUDGET_KEYS) - {"lr", "seed", "dtype", "num_workers"})
        if unknown:
            raise CM3LeonError(f"AblationSpec.budget: unknown option(s) {unknown}; expected some of {BUDGET_KEYS}")
        if self.num_candidates < 1:
            raise CM3LeonError(f"AblationSpec.num_candidates must be >= 1, got {self.num_candidates}")

    @property
    def base_size(self) -> str:
        """The label of the size that is the reference model (its preset, no overrides)."""
        for label, preset, over in self.sizes:
            if preset == self.base_preset and not over:
                return label
        return self.base_preset

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sizes"] = [list(s) for s in self.sizes]
        return d


@dataclass(frozen=True)
class Variant:
    """One row of the table: a trained model (pretrain() settings) and a decoding."""

    name: str
    group: str  # one of GROUPS
    changed: str  # what differs from the reference model, in words
    size: str  # size label
    preset: str  # model + train preset passed to pretrain()
    train: dict  # pretrain() overrides (budget included)
    decoding: dict  # evaluate_model decoding options

    def train_key(self) -> str:
        return json.dumps({"preset": self.preset, **self.train}, sort_keys=True)

    def eval_key(self) -> str:
        return self.train_key() + json.dumps(self.decoding, sort_keys=True)

    def to_dict(self) -> dict:
        return asdict(self)


# ---- presets ---------------------------------------------------------------------------------


def ablation_spec(preset: str, run_dir: str | os.PathLike | None = None, steps: int | None = None,
                  num_prompts: int | None = None) -> AblationSpec:
    """The comparison of an ablation preset.

    quick: three CPU sizes around demo-small, 250 steps of 4096 tokens (1.0M tokens) per trained
    variant (six trainings), 32 prompts per evaluation (ten evaluations). Measured on the demo
    run on an idle 2-core CPU: 9 minutes in all (demo-small trains at ~11k tokens/s); a busy
    machine is 2-3x slower. Its models are far from trained: the comparison is of early
    learning (losses, colour/shape accuracy, FD, CLIP score), with 32 prompts per variant. full: the
    run's pipeline preset (pipeline.json) with its full pretraining budget per variant, its
    evaluation size and CFG scale; the paper's three sizes for the 350m / 760m / 7b presets."""
    from cm3leon.run.config import get_pipeline_preset
    from cm3leon.train.config import TrainConfig

    if preset not in ABLATION_PRESETS:
        raise CM3LeonError(f"--preset: unknown ablation preset {preset!r}; choose one of {ABLATION_PRESETS}")
    if preset == "quick":
        budget = dict(steps=250, seq_len=512, micro_batch_size=8, batch_tokens=4096, warmup_steps=25,
                      eval_every=0, eval_batches=8, ckpt_every=50, log_every=10)
        spec = AblationSpec(base_preset="demo-small", budget=budget, sizes=CPU_SIZES, num_candidates=4,
                            num_prompts=32)
    else:
        p = get_pipeline_preset(run_preset_name(run_dir) if run_dir is not None else "demo")
        train_keys = {f.name for f in fields(TrainConfig)}  # the preset also sets objective options
        cfg = TrainConfig.from_preset(p.model, **{k: v for k, v in p.pretrain.items() if k in train_keys})
        paper = p.model in ("350m", "760m", "7b")
        keys = [k for k in BUDGET_KEYS if not (paper and k == "micro_batch_size")]  # per-size memory
        spec = AblationSpec(base_preset=p.model, budget={k: getattr(cfg, k) for k in keys},
                            sizes=PAPER_SIZES if paper else CPU_SIZES, cfg_scale=p.decoding.cfg_scale,
                            num_candidates=8, num_prompts=p.eval_num)
    if steps is not None:
        if steps < 1:
            raise CM3LeonError(f"--steps must be >= 1, got {steps}")
        spec.budget = {**spec.budget, "steps": int(steps),
                       "warmup_steps": min(int(spec.budget.get("warmup_steps", 0)), max(0, steps // 5))}
    if num_prompts is not None:
        spec.num_prompts = int(num_prompts)
    return spec


def plan_variants(spec: AblationSpec, seed: int = 0) -> list[Variant]:
    """Every variant of the spec, in table order: sizes, k, decoding methods, baseline."""

    def train(k: int, model: dict | None = None, **extra) -> dict:
        return {**spec.budget, "seed": seed, "num_retrieved": k, "order": spec.order, "poisson_lambda": 1.0,
                "model": dict(model or {}), **extra}

    def t2i(method: str, k: int) -> dict:
        d: dict[str, Any] = {"method": method, "num_retrieved": k}
        if method in ("cfg", "best_of_n"):
            d["cfg_scale"] = float(spec.cfg_scale)
        if method == "best_of_n":
            d["num_candidates"] = int(spec.num_candidates)
        return d

    base = spec.base_size
    cfg = t2i("cfg", spec.base_k)
    out = [Variant(f"size-{label}", "size", "reference" if label == base else f"model size {label}", label, preset,
                   train(spec.base_k, over), cfg) for label, preset, over in spec.sizes]
    out += [Variant(f"k{k}", "retrieval", "reference" if k == spec.base_k else f"{k} retrieved documents", base,
                    spec.base_preset, train(k), t2i("cfg", k)) for k in spec.ks]
    out += [Variant(f"decode-{m}", "decoding", f"decoding {_method_label(t2i(m, spec.base_k))}", base,
                    spec.base_preset, train(spec.base_k), t2i(m, spec.base_k)) for m in spec.methods]
    # DALL-E-style: left-to-right text->image only, no CM3 masking, no retrieval. Sampled
    # plainly (its own decoding) and with CFG (whose unconditional stream, a <mask:0> prompt,
    # this model never saw in training).
    dalle = train(0, order="text_first", poisson_lambda=0.0)
    what = "DALL-E-style baseline (text first, no CM3 masking, no retrieval)"
    out += [Variant("dalle-baseline", "baseline", what, base, spec.base_preset, dalle, t2i("topp", 0)),
            Variant("dalle-baseline-cfg", "baseline", what, base, spec.base_preset, dalle, t2i("cfg", 0))]
    return out


def _method_label(decoding: dict) -> str:
    m = decoding["method"]
    if m == "cfg":
        return f"TopP+CFG a={decoding['cfg_scale']:g}"
    if m == "best_of_n":
        return f"best-of-{decoding['num_candidates']}"
    return {"topp": "TopP", "cdk": "CD-K"}[m]


# ---- running -----------------------------------------------------------------------------------


def run_ablations(run_dir: str | os.PathLike, preset: str = "quick", out: str | os.PathLike | None = None,
                  seed: int = 0, spec: AblationSpec | BaselinesSpec | None = None,
                  variants: Sequence[str] | None = None, data: str | os.PathLike | None = None, force: bool = False,
                  device: str = "auto", baselines: bool = False) -> dict:
    """Train and evaluate the ablation variants of a finished pipeline run; returns results.json.

    preset: "quick" (CPU, minutes) or "full" (the run's full pretraining budget per variant);
    `spec` replaces the preset's comparison (e.g. tiny settings). variants: names to run (with
    the variants whose models they reuse); None: all. out: default RUN/ablate. A variant with a
    `.done` marker is not run again (force: it is). results.json has one row per finished variant.
    baselines: run the "baselines" group instead (`cm3leon.run.baselines.run_baselines`, with a
    `BaselinesSpec`, default `baselines_spec(run_dir)`), into OUT/baselines; returns its metrics.json."""
    from cm3leon.utils.io import read_json, write_json

    inputs = run_inputs(run_dir, data)
    out = Path(out) if out is not None else inputs.run / "ablate"
    if baselines:
        from cm3leon.run.baselines import BaselinesSpec, baselines_spec, run_baselines

        if variants is not None:
            raise CM3LeonError("variants select ablation variants; the baselines comparison runs as a whole")
        if spec is not None and not isinstance(spec, BaselinesSpec):
            raise CM3LeonError(f"baselines=True takes a BaselinesSpec, got {type(spec).__name__}")
        return run_baselines(inputs, out / "baselines", spec or baselines_spec(run_dir), seed=seed, force=force,
                             device=device)
    if spec is not None and not isinstance(spec, AblationSpec):
        raise CM3LeonError(f"spec: an AblationSpec, got {type(spec).__name__} (a BaselinesSpec needs baselines=True)")
    spec = spec or ablation_spec(preset, run_dir)
    plan = plan_variants(spec, seed)
    names = [v.name for v in plan]
    if variants is not None:
        unknown = sorted(set(variants) - set(names))
        if unknown:
            raise CM3LeonError(f"variants: unknown {unknown}; this preset has {', '.join(names)}")
    trainer = {}  # train key -> the first variant that trains it
    for v in plan:
        trainer.setdefault(v.train_key(), v)
    selected = set(names if variants is None else variants)
    selected |= {trainer[v.train_key()].name for v in plan if v.name in selected}
    todo = [v for v in plan if v.name in selected]

    max_k = max([v.train["num_retrieved"] for v in todo] + [0])
    if max_k > 0 and max_k > inputs.neighbor_columns and inputs.index is None:
        todo = [v for v in todo if v.train["num_retrieved"] == 0]
        print(f"ablate: {inputs.run} has no memory bank: only k=0 variants run", file=sys.stderr)
        max_k = 0
    out.mkdir(parents=True, exist_ok=True)
    codes = codes_with_neighbors(inputs, max_k, out / f"codes_k{max_k}", seed) if max_k else inputs.codes
    write_json(out / "plan.json", {"run": str(inputs.run), "data": str(inputs.data), "codes": str(codes),
                                   "preset": preset, "seed": seed, "spec": spec.to_dict(),
                                   "variants": [v.to_dict() for v in plan]})

    from cm3leon.train.loop import CHECKPOINTS
    from cm3leon.utils.logging import MetricsLogger, progress

    t_all = time.time()
    bar = progress(total=len(todo), desc="ablate", unit="variant")
    with MetricsLogger(out / "ablate_log.jsonl") as log:
        for v in todo:
            vdir = out / v.name
            marker = vdir / DONE
            # variant.json is written first: an unfinished variant resumes only with its own settings
            started = vdir / "variant.json"
            if started.is_file() and not force and read_json(started) != v.to_dict():
                raise CM3LeonError(f"{vdir} was made with other settings (another preset, steps or seed); use "
                                   "another --out, or --force to run it again")
            if marker.is_file() and not force:
                print(f"ablate: {v.name}: already done, skipping", file=sys.stderr)
                bar.update(1)
                continue
            if force and vdir.exists():
                shutil.rmtree(vdir)
            write_json(started, v.to_dict())
            t0 = time.time()
            row = _run_variant(v, trainer[v.train_key()], plan, spec, inputs, codes, out, seed, device)
            write_json(marker, {"variant": v.to_dict(), "row": row, "seconds": round(time.time() - t0, 2)})
            # The exported model is all later variants need; checkpoints only served a resume.
            shutil.rmtree(vdir / "model" / CHECKPOINTS, ignore_errors=True)
            log.log(variant=v.name, seconds=round(time.time() - t0, 2), **_scalar(row))
            bar.update(1)
    bar.close()
    rows = [read_json(out / v.name / DONE)["row"] for v in plan if (out / v.name / DONE).is_file()]
    return write_results(out, rows, spec, preset, inputs, seed, seconds=time.time() - t_all)


def _scalar(row: dict) -> dict:
    return {k: v for k, v in row.items() if isinstance(v, (int, float, str, bool)) and k not in ("name",)}


def _run_variant(v: Variant, trains: Variant, plan: list[Variant], spec: AblationSpec, inputs: RunInputs,
                 codes: Path, out: Path, seed: int, device: str) -> dict:
    """Train (unless another variant trained the same model) and evaluate one variant."""
    from cm3leon.utils.io import read_json

    if trains is v:
        from cm3leon.train.cli import pretrain

        print(f"ablate: {v.name}: training ({v.changed})", file=sys.stderr)
        summary = pretrain(codes, out / v.name / "model", preset=v.preset, **v.train)
    else:
        summary = read_json(out / trains.name / "model" / "train_summary.json")
    model_dir = out / trains.name / "model"
    row = _train_row(v, trains, model_dir, summary)
    same = next((u for u in plan if u.eval_key() == v.eval_key() and (out / u.name / DONE).is_file()), None)
    if same is not None:
        got = read_json(out / same.name / DONE)["row"]
        row.update({k: got[k] for k in ("colour", "shape", "both", "fd", "fd_metric", "clip_score", "eval_seconds")
                    if k in got})
        row["eval_same_as"] = same.name
        return row
    from cm3leon.eval.evaluate import evaluate_model

    report = evaluate_model(model_dir, inputs.data, out / v.name / "eval", metrics=T2I_METRICS,
                            num_prompts=spec.num_prompts, decoding=v.decoding, seed=seed,
                            batch_size=spec.eval_batch_size, clip_retriever=inputs.retriever, device=device)
    m = report["metrics"]
    shapes, fd, clip = m.get("shapes", {}), m.get("fid", {}), m.get("clip", {})
    row.update({"colour": shapes.get("colour"), "shape": shapes.get("shape"), "both": shapes.get("both"),
                "fd": fd.get("value"), "fd_metric": fd.get("name"), "clip_score": clip.get("value"),
                "eval_seconds": report["seconds"]})
    skipped = [f"{k}: {r['skipped']}" for k, r in m.items() if "skipped" in r]
    if skipped:
        row["eval_notes"] = skipped
    return row


def _train_row(v: Variant, trains: Variant, model_dir: Path, summary: dict) -> dict:
    from cm3leon.model.config import ModelConfig
    from cm3leon.model.transformer import flops_per_token

    cfg = ModelConfig.from_dict(json.loads((model_dir / "config.json").read_text(encoding="utf-8")))
    tokens = int(summary["tokens_seen"])
    return {
        "name": v.name, "group": v.group, "changed": v.changed, "size": v.size, "params": summary["num_parameters"],
        "layers": cfg.n_layer, "d_model": cfg.d_model, "k": summary["num_retrieved"], "order": summary["order"],
        "poisson_lambda": summary["cm3"]["poisson_lambda"], "decoding": _method_label(v.decoding),
        "tokens": tokens, "train_flops": flops_per_token(cfg, summary["train_config"]["seq_len"]) * tokens,
        "train_seconds": summary["train_seconds"], "final_train_loss": summary["final_train_loss"],
        "final_val_loss": summary["final_val_loss"], "model_from": trains.name,
    }


# ---- results -----------------------------------------------------------------------------------

COLUMNS = ("name", "changed", "params", "k", "decoding", "tokens", "train_seconds", "final_train_loss",
           "final_val_loss", "colour", "shape", "both", "fd", "clip_score")
LABELS = {"both": "shapes accuracy (colour and shape right)", "fd": "FD (retriever features)",
          "clip_score": "CLIP score (retriever)", "final_val_loss": "validation loss"}


def write_results(out: Path, rows: list[dict], spec: AblationSpec, preset: str, inputs: RunInputs, seed: int,
                  seconds: float | None = None) -> dict:
    """results.json, results.md and the plots from the finished rows."""
    from cm3leon.eval.report import markdown_table
    from cm3leon.utils.io import write_json, write_text

    notes = list(NOTES)
    trained = {r["model_from"]: r["tokens"] for r in rows}
    if len(set(trained.values())) > 1:
        notes.append(f"token budgets differ between trained variants: {trained}")
    for r in rows:
        notes += [f"{r['name']}: {n}" for n in r.get("eval_notes", [])]
    plots = write_plots(out, rows)
    budget = spec.budget
    result = {"run": str(inputs.run), "data": str(inputs.data), "preset": preset, "seed": seed,
              "budget": {**budget, "tokens_per_variant": rows[0]["tokens"] if rows else None},
              "base": {"size": spec.base_size, "k": spec.base_k, "order": spec.order, "cfg_scale": spec.cfg_scale},
              "num_prompts": spec.num_prompts, "rows": rows, "plots": [p.name for p in plots], "notes": notes,
              "seconds": None if seconds is None else round(seconds, 2)}
    write_json(out / "results.json", result)
    md = ["# Ablations", "",
          f"Run {inputs.run}, preset {preset}, seed {seed}. Every trained variant: {budget.get('steps')} steps of "
          f"{budget.get('batch_tokens')} tokens ({result['budget']['tokens_per_variant']} tokens), blocks of "
          f"{budget.get('seq_len')}. Reference: size {spec.base_size}, k={spec.base_k}, order {spec.order}, "
          f"CM3 masking, TopP+CFG a={spec.cfg_scale:g}. Text->image on {spec.num_prompts} test captions.", ""]
    if rows:
        md += [markdown_table(rows, [c for c in COLUMNS if any(c in r for r in rows)]), ""]
    else:
        md += ["No variant has finished yet.", ""]
    md += [f"- {n}" for n in notes] + [""] + [f"![{p.stem}]({p.name})" for p in plots]
    write_text(out / "results.md", "\n".join(md) + "\n")
    return result


def _metrics(rows: list[dict], with_loss: bool) -> list[str]:
    keys = ("both", "fd", "clip_score") + (("final_val_loss",) if with_loss else ())
    return [m for m in keys if any(isinstance(r.get(m), (int, float)) for r in rows)]


def write_plots(out: Path, rows: list[dict]) -> list[Path]:
    """ablation_model_size.png (metrics vs parameters), ablation_retrieval_k.png (vs k),
    ablation_decoding.png and ablation_baseline.png (bars); each only when it has rows."""
    paths = []
    by = {g: [r for r in rows if r["group"] == g] for g in GROUPS}
    if len(by["size"]) >= 1:
        paths.append(_panels(by["size"], "params", out / "ablation_model_size.png", "metric vs model size",
                             "parameters", logx=True))
    if len(by["retrieval"]) >= 1:
        paths.append(_panels(by["retrieval"], "k", out / "ablation_retrieval_k.png",
                             "metric vs retrieved documents k", "k (retrieved documents in training and prompts)"))
    if by["decoding"]:
        paths.append(_panels(by["decoding"], "decoding", out / "ablation_decoding.png",
                             "decoding methods (same model, prompts and seeds)", None, bars=True))
    if by["baseline"]:
        ref = [r for r in by["decoding"] if r["decoding"] in {b["decoding"] for b in by["baseline"]}]
        both = [{**r, "label": f"CM3Leon {r['decoding']}"} for r in ref]
        both += [{**r, "label": f"DALL-E-style {r['decoding']}"} for r in by["baseline"]]
        paths.append(_panels(both, "label", out / "ablation_baseline.png",
                             "CM3Leon objective vs DALL-E-style baseline (same token budget)", None, bars=True))
    return [p for p in paths if p is not None]


def _panels(rows: list[dict], x: str, out_png: Path, title: str, xlabel: str | None, logx: bool = False,
            bars: bool = False) -> Path | None:
    """One panel per metric present in the rows: lines against a numeric x, or bars per label.
    Validation loss only where it compares (the model size: same objective and k)."""
    from cm3leon.eval.report import new_figure, save_figure

    metrics = _metrics(rows, with_loss=x == "params")
    if not metrics:
        return None
    fig = new_figure(figsize=(3.2 * len(metrics) + 0.6, 3.4))
    for i, m in enumerate(metrics, 1):
        ax = fig.add_subplot(1, len(metrics), i)
        pts = [(r[x], r[m]) for r in rows if isinstance(r.get(m), (int, float))]
        if bars:
            ax.bar(range(len(pts)), [y for _, y in pts], color="#4c72b0")
            ax.set_xticks(range(len(pts)))
            ax.set_xticklabels([str(a) for a, _ in pts], rotation=30, ha="right", fontsize=7)
        else:
            pts.sort()
            ax.plot([a for a, _ in pts], [y for _, y in pts], marker="o")
            if logx:
                ax.set_xscale("log")
            ax.set_xlabel(xlabel or x, fontsize=8)
        ax.set_title(LABELS.get(m, m), fontsize=8)
        ax.grid(True, alpha=0.3)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, out_png)


def plan_table(spec: AblationSpec, seed: int = 0) -> str:
    """The variants of a spec as a markdown table (name, what changed, trained or reused)."""
    from cm3leon.eval.report import markdown_table

    plan = plan_variants(spec, seed)
    first: dict[str, str] = {}
    rows = []
    for v in plan:
        t = first.setdefault(v.train_key(), v.name)
        rows.append({"variant": v.name, "changed": v.changed, "size": v.size, "preset": v.preset,
                     "k": v.train["num_retrieved"], "decoding": _method_label(v.decoding),
                     "trains": "yes" if t == v.name else f"reuses {t}"})
    steps, bt = spec.budget.get("steps"), spec.budget.get("batch_tokens")
    evals = len({v.eval_key() for v in plan})
    head = (f"{sum(r['trains'] == 'yes' for r in rows)} trainings of {steps} steps x {bt} tokens, "
            f"{evals} evaluations on {spec.num_prompts} prompts")
    return head + "\n\n" + markdown_table(rows)
