"""CM3Leon against a DALL-E-style autoregressive baseline and a latent-diffusion baseline on the
same training data and the same budget, measured two ways: training FLOPs and training wall
time. CM3Leon's headline is efficiency: a better COCO FID than diffusion and autoregressive
models at a fraction of their training compute (Yu et al. 2023, arXiv:2309.02591, Sec. 1 and
Figure 1). This is that comparison at the scale of one CPU run.

    cm3leon ablate --run runs/demo --baselines

Three text->image models, trained on the run's training split:
- CM3Leon: the run's own pretraining recipe (its pipeline preset), CM3 objective with k
  retrieved documents per sequence (paper Sec. 2), sampled with TopP + CFG and k documents;
- DALL-E-style: the same transformer, recipe and steps, trained left to right on text-first
  pairs, no CM3 spans, no retrieval (DALL-E, Ramesh et al. 2021, arXiv:2102.12092), sampled
  with TopP (it never saw an unconditional prompt);
- LDM: the latent-diffusion baseline of `cm3leon.baselines.ldm` (U-Net on the image
  tokenizer's pre-quantization latents, the retriever's frozen text encoder, DDIM + CFG).

The budgets are CM3Leon's: its training FLOPs F and its training wall time W (seconds spent in
training steps, data included; not start-up, validation or checkpoints). FLOPs are counted by
one function for all three models, `cm3leon.train.flops.training_flops_per_sample`: 3x the
forward FLOPs of one sample as torch's FlopCounterMode counts them (a block of seq_len tokens
for the transformers, where it equals 6N + attention exactly; one latent for the U-Net), times
the samples seen. The DALL-E-style model trains CM3Leon's steps of the same blocks (the same F;
its own wall time is reported beside W); the LDM trains until it has both spent F and trained
for W, keeping its weights at each. Weights are also kept at equal fractions of F along every
run: the quality-vs-compute curves. Every model and checkpoint is evaluated by
`cm3leon.eval.evaluate.evaluate_model` on the same test prompts and seeds: shapes-checker
colour+shape accuracy, FD and CLIP score in the run's retriever space, seconds per image; the
LDM at its FLOPs budget also with other numbers of DDIM steps.

Writes RUN/ablate/baselines/: metrics.json (budgets, one row per model and budget, the curves,
notes), results.md and baselines_compute.png, which the run report shows under "Ablations".
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cm3leon.errors import CM3LeonError
from cm3leon.run.folder import RunInputs
from cm3leon.run.summaries import DONE

MODELS = ("cm3leon", "dalle", "ldm")
LABELS = {"cm3leon": "CM3Leon", "dalle": "DALL-E-style AR", "ldm": "LDM"}
BUDGETS = ("FLOPs", "wall time")
METRICS = ("both", "fd", "clip_score")
METRIC_LABELS = {"both": "colour+shape accuracy", "fd": "FD (retriever features)",
                 "clip_score": "CLIP score (retriever)"}
# pretrain() settings the comparison sets itself: validation only at the end, a checkpoint at
# every curve point, every step's time logged
OWN_TRAIN_KEYS = ("eval_every", "ckpt_every", "keep_checkpoints", "log_every")
NOTES = (
    "Wall time is the time of the training steps alone (data included; not start-up, validation, checkpoints or "
    "the one-off encoding of the LDM's latents and text states), measured on this machine while the run shared it "
    "with whatever else ran.",
    "FD and CLIP score are computed in the run's retriever feature space, the same scorer for every model; the LDM "
    "is conditioned on that retriever's text encoder and CM3Leon retrieves with it, so the CLIP score may favour both "
    "over the DALL-E-style model. Judge by the checker's accuracy first.",
    "Seconds per image: generation alone (prompt encoding, sampling, decoding), in batches of the evaluation's "
    "batch size, on this machine.",
)


@dataclass
class BaselinesSpec:
    """What is compared. The transformers' recipe and steps (CM3Leon's) set both budgets."""

    preset: str = "demo-small"  # model + train preset of both transformers
    train: dict = field(default_factory=dict)  # pretrain() overrides of both (the run's recipe and steps)
    num_retrieved: int = 2  # CM3Leon's k: retrieved documents per training sequence and per prompt
    cfg_scale: float = 1.5  # CM3Leon's TopP + CFG scale
    ldm: dict = field(default_factory=dict)  # LDMConfig overrides (steps, min_seconds, keep_steps: from the budgets)
    ldm_sampling_steps: tuple[int, ...] = (10, 25, 50)  # DDIM steps swept at the FLOPs budget
    curve_points: int = 4  # checkpoints evaluated along each run, at i / curve_points of the FLOPs budget
    num_prompts: int | None = 100  # text->image prompts per evaluation (test split captions)
    eval_batch_size: int = 50  # prompts per generation call, every model

    def __post_init__(self) -> None:
        from cm3leon.train.config import TrainConfig

        self.train = {"steps": TrainConfig.from_preset(self.preset).steps, **self.train}  # the preset's, unless set
        self.ldm_sampling_steps = tuple(int(n) for n in self.ldm_sampling_steps)
        if self.curve_points < 1 or self.eval_batch_size < 1 or self.num_retrieved < 0:
            raise CM3LeonError(f"BaselinesSpec: curve_points and eval_batch_size must be >= 1 and num_retrieved >= 0, "
                               f"got {self.curve_points}, {self.eval_batch_size}, {self.num_retrieved}")
        steps = int(self.train.get("steps", 0))
        if steps < self.curve_points:
            raise CM3LeonError(f"BaselinesSpec.train needs steps >= curve_points ({self.curve_points}), got {steps}")
        own = sorted(set(self.train) & set(OWN_TRAIN_KEYS))
        if own:
            raise CM3LeonError(f"BaselinesSpec.train: {own} are set by the comparison itself")
        self.ldm_config()  # fails early on a bad field
        if any(k in self.ldm for k in ("steps", "min_seconds", "keep_steps")):
            raise CM3LeonError("BaselinesSpec.ldm: steps, min_seconds and keep_steps come from the budgets")
        if not self.ldm_sampling_steps or min(self.ldm_sampling_steps) < 1:
            raise CM3LeonError(f"BaselinesSpec.ldm_sampling_steps must be integers >= 1, got {self.ldm_sampling_steps}")

    @property
    def steps(self) -> int:
        return int(self.train["steps"])

    @property
    def ar_points(self) -> list[int]:
        """The transformers' checkpoint steps (the last one is the budget)."""
        every = self.steps // self.curve_points
        return sorted({every * i for i in range(1, self.curve_points + 1)} | {self.steps})

    def train_overrides(self, model: str, seed: int) -> dict:
        """pretrain() settings of one transformer."""
        every = self.steps // self.curve_points
        common = {**self.train, "seed": seed, "eval_every": 0, "ckpt_every": every,
                  "keep_checkpoints": len(self.ar_points), "log_every": 1}
        if model == "cm3leon":
            return {**common, "num_retrieved": self.num_retrieved}
        # left to right: text first, no CM3 spans (neither Poisson nor whole-segment), no retrieval
        return {**common, "num_retrieved": 0, "order": "text_first", "poisson_lambda": 0.0, "whole_segment_prob": 0.0}

    def decoding(self, model: str) -> dict:
        if model == "cm3leon":
            return {"method": "cfg", "cfg_scale": float(self.cfg_scale), "num_retrieved": self.num_retrieved}
        if model == "dalle":
            return {"method": "topp", "num_retrieved": 0}
        cfg = self.ldm_config()
        return {"cfg_scale": cfg.cfg_scale, "num_inference_steps": cfg.num_inference_steps}

    def ldm_config(self, **budget):
        """The LDM's config: LDMConfig's defaults, `ldm` overrides, then `budget` (steps, min_seconds, keep_steps)."""
        from cm3leon.baselines.ldm import LDMConfig

        return LDMConfig.from_dict({**self.ldm, **budget}, "BaselinesSpec.ldm")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ldm_sampling_steps"] = list(self.ldm_sampling_steps)
        return d


def baselines_spec(run_dir, steps: int | None = None, num_prompts: int | None = None) -> BaselinesSpec:
    """The comparison for a run folder: both transformers with the run's pipeline preset's
    model and pretraining recipe and budget (steps: override its steps), its k and CFG scale,
    the LDM with `LDMConfig`'s CPU defaults; as many prompts as the run's evaluation."""
    from cm3leon.run.config import get_pipeline_preset
    from cm3leon.run.folder import run_preset_name

    p = get_pipeline_preset(run_preset_name(run_dir))
    train = {k: v for k, v in p.pretrain.items() if k not in OWN_TRAIN_KEYS}
    if steps is not None:
        if steps < 1:
            raise CM3LeonError(f"--steps must be >= 1, got {steps}")
        train["steps"] = int(steps)
        train["warmup_steps"] = min(int(train.get("warmup_steps", 0)), max(0, steps // 5))
    return BaselinesSpec(preset=p.model, train=train, num_retrieved=p.num_retrieved, cfg_scale=p.decoding.cfg_scale,
                         num_prompts=p.eval_num if num_prompts is None else int(num_prompts))


# ---- training ----------------------------------------------------------------------------------


def step_seconds(rows: list[dict]) -> dict[int, float]:
    """Cumulative seconds of training steps at each logged step of a pretraining
    metrics.jsonl: each training row's tokens since the previous row over its `tokens_per_s`
    (the rate of those steps alone)."""
    out, total, prev = {}, 0.0, 0
    for r in rows:
        if isinstance(r.get("tokens_per_s"), (int, float)) and r["tokens_per_s"] > 0 and "step" in r:
            total += (r["tokens"] - prev) / r["tokens_per_s"]
            prev = r["tokens"]
            out[int(r["step"])] = total
    return out


def transformer_flops_per_block(model_dir: Path, seq_len: int) -> float:
    """Training FLOPs of one block of `seq_len` tokens, counted on the model built on the meta
    device (shapes only: any size fits in memory)."""
    import torch

    from cm3leon.model.config import ModelConfig
    from cm3leon.model.transformer import CM3LeonTransformer
    from cm3leon.train.flops import training_flops_per_sample
    from cm3leon.utils.io import read_json

    cfg = ModelConfig.from_dict(read_json(model_dir / "config.json", "model config"))
    with torch.device("meta"):
        net = CM3LeonTransformer(cfg)
    return training_flops_per_sample(net, torch.zeros(1, seq_len, dtype=torch.long, device="meta"))


def _train_transformer(model: str, spec: BaselinesSpec, codes: Path, d: Path, seed: int) -> dict:
    """Pretrain one transformer (once: a `.done` marker holds what the comparison needs of it)."""
    from cm3leon.train.cli import pretrain
    from cm3leon.train.loop import CHECKPOINTS, METRICS
    from cm3leon.utils.io import read_json, write_json
    from cm3leon.utils.logging import read_metrics

    if (d / DONE).is_file():
        return read_json(d / DONE)
    model_dir = d / "model"
    print(f"baselines: training {LABELS[model]} ({spec.steps} steps)", file=sys.stderr)
    summary = pretrain(codes, model_dir, preset=spec.preset, **spec.train_overrides(model, seed))
    seq_len = int(summary["train_config"]["seq_len"])
    per_block = transformer_flops_per_block(model_dir, seq_len)
    blocks_per_step = summary["tokens_per_step"] / seq_len
    seconds = step_seconds(read_metrics(model_dir / METRICS))
    points = [{"step": s, "flops": per_block * blocks_per_step * s, "seconds": seconds[s],
               "weights": str(model_dir / CHECKPOINTS / f"step-{s:08d}" / "model.safetensors")}
              for s in spec.ar_points]
    info = {"model": model, "params": summary["num_parameters"], "sample": f"a block of {seq_len} tokens",
            "flops_per_sample": per_block, "samples": summary["tokens_seen"] / seq_len,
            "train_flops": per_block * summary["tokens_seen"] / seq_len, "train_seconds": points[-1]["seconds"],
            "steps": summary["steps"], "final_train_loss": summary["final_train_loss"],
            "final_val_loss": summary["final_val_loss"], "model_dir": str(model_dir), "points": points}
    write_json(d / DONE, info)
    return info


def _train_ldm(spec: BaselinesSpec, d: Path, data: Path, image_tokenizer: Path, text_encoder: Path,
               budget: dict, seed: int) -> dict:
    """Train the LDM until it has spent the FLOPs budget and trained for the wall-time budget."""
    import torch

    from cm3leon.baselines.ldm import build_unet, train_ldm, unet_flops_per_sample
    from cm3leon.retrieval.encoder import load_retriever
    from cm3leon.tokenizers.image import VQModel
    from cm3leon.utils.io import read_json, write_json

    if (d / DONE).is_file():
        return read_json(d / DONE)
    cfg = spec.ldm_config()
    vq = VQModel.from_pretrained(image_tokenizer).config
    width = load_retriever(text_encoder, device="cpu").text_width
    latent = {"channels": vq.embed_dim, "side": vq.grid[0]}  # the tokenizer's latents before quantization
    with torch.device("meta"):
        unet = build_unet(cfg, latent["channels"], latent["side"], width)
    per_step = unet_flops_per_sample(unet, latent, cfg, width) * cfg.batch_size
    steps = max(1, math.ceil(budget["flops"] / per_step))
    keep = [max(1, math.ceil(steps * i / spec.curve_points)) for i in range(1, spec.curve_points + 1)]
    cfg = spec.ldm_config(steps=steps, min_seconds=budget["seconds"], keep_steps=keep, seed=seed)
    print(f"baselines: training {LABELS['ldm']} ({steps} steps of {cfg.batch_size} latents for the FLOPs budget, "
          f"at least {budget['seconds']:.0f} s for the wall-time budget)", file=sys.stderr)
    summary = train_ldm(data, d / "model", cfg, image_tokenizer=image_tokenizer, text_encoder=text_encoder)
    snaps = {s["step"]: s for s in summary["snapshots"]}
    points = [{"step": s, "flops": snaps[s]["flops"], "seconds": snaps[s]["seconds"], "snapshot": s}
              for s in sorted(snaps)]
    at_time = next(s["step"] for s in summary["snapshots"] if "seconds" in s["reasons"])
    info = {"model": "ldm", "params": summary["num_parameters"], "sample": "one image latent",
            "flops_per_sample": summary["flops_per_sample"], "samples": summary["samples"],
            "train_flops": summary["train_flops"], "train_seconds": summary["train_seconds"], "steps": summary["steps"],
            "flops_step": steps, "seconds_step": at_time, "final_train_loss": summary["final_train_loss"],
            "model_dir": str(d / "model"), "points": points}
    write_json(d / DONE, info)
    return info


# ---- evaluation --------------------------------------------------------------------------------


class _Evaluator:
    """Evaluates models and checkpoints with `evaluate_model`, each once (its metrics.json is
    reused on a re-run), all on the same prompts, seeds and scorer."""

    def __init__(self, inputs: RunInputs, spec: BaselinesSpec, out: Path, seed: int, device: str):
        self.inputs, self.spec, self.out, self.seed, self.device = inputs, spec, out, seed, device
        self._loaded: dict = {}

    def __call__(self, model: str, info: dict, point: dict, decoding: dict, tag: str) -> dict:
        from cm3leon.eval.evaluate import T2I_METRICS, evaluate_model
        from cm3leon.utils.io import read_json

        d = self.out / model / "eval" / tag
        if (d / "metrics.json").is_file():
            report = read_json(d / "metrics.json")
        else:
            print(f"baselines: evaluating {LABELS[model]} at step {point['step']} ({tag})", file=sys.stderr)
            report = evaluate_model(self._model(model, info, point), self.inputs.data, d, metrics=T2I_METRICS,
                                    num_prompts=self.spec.num_prompts, decoding=decoding, seed=self.seed,
                                    batch_size=self.spec.eval_batch_size, clip_retriever=self.inputs.retriever,
                                    device=self.device)
        m = report["metrics"]
        shapes, fd, clip = m.get("shapes", {}), m.get("fid", {}), m.get("clip", {})
        return {"colour": shapes.get("colour"), "shape": shapes.get("shape"), "both": shapes.get("both"),
                "fd": fd.get("value"), "fd_metric": fd.get("name"), "clip_score": clip.get("value"),
                "seconds_per_image": report.get("seconds_per_image"), "eval": str(d.relative_to(self.out))}

    def _model(self, model: str, info: dict, point: dict):
        """The model with the point's weights (transformers: loaded once, weights swapped)."""
        if model == "ldm":
            from cm3leon.baselines.ldm import load_ldm

            return load_ldm(info["model_dir"], snapshot=point["snapshot"])
        from cm3leon.eval.evaluate import load_model
        from cm3leon.utils.io import load_safetensors

        if model not in self._loaded:
            self._loaded[model] = load_model(info["model_dir"], self.device)
        api = self._loaded[model]
        api.model.load_state_dict(load_safetensors(point["weights"], "checkpoint weights", device=str(api.device)))
        return api


def _label(model: str, decoding: dict) -> str:
    if model == "ldm":
        return f"DDIM {decoding['num_inference_steps']} steps + CFG {decoding['cfg_scale']:g}"
    method = "TopP" if decoding["method"] == "topp" else f"TopP + CFG {decoding['cfg_scale']:g}"
    return method + (f", k={decoding['num_retrieved']}" if decoding.get("num_retrieved") else "")


# ---- running -----------------------------------------------------------------------------------


def run_baselines(inputs: RunInputs, out, spec: BaselinesSpec, seed: int = 0, force: bool = False,
                  device: str = "auto") -> dict:
    """Train CM3Leon, the DALL-E-style model and the LDM on the run's data, evaluate each along
    its run and at both budgets; returns metrics.json (written with results.md and the plot
    into `out`). Finished trainings and evaluations are reused on a re-run (force: start over)."""
    from cm3leon.run.folder import codes_with_neighbors
    from cm3leon.utils.io import read_json, write_json

    if inputs.retriever is None:
        raise CM3LeonError(f"the baselines comparison needs the run's retriever ({inputs.run / 'retrieval'} has "
                           "none): it is the LDM's text encoder and every model's scorer")
    out = Path(out)
    if force and out.exists():
        shutil.rmtree(out)
    plan = json.loads(json.dumps({"run": str(inputs.run), "data": str(inputs.data), "seed": seed,
                                  "spec": spec.to_dict()}))  # as spec.json reads back
    if (out / "spec.json").is_file() and read_json(out / "spec.json") != plan:
        raise CM3LeonError(f"{out} was made with other settings (another run, spec, steps or seed); use another --out, "
                           "or --force to run it again")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "spec.json", plan)
    t_all = time.time()
    k = spec.num_retrieved
    codes = codes_with_neighbors(inputs, k, out / f"codes_k{k}", seed) if k else inputs.codes

    runs = {m: _train_transformer(m, spec, codes, out / m, seed) for m in ("cm3leon", "dalle")}
    budget = {"flops": runs["cm3leon"]["train_flops"], "seconds": runs["cm3leon"]["train_seconds"]}
    image_tokenizer = Path(runs["cm3leon"]["model_dir"]) / "image_tokenizer"
    runs["ldm"] = _train_ldm(spec, out / "ldm", inputs.data, image_tokenizer, inputs.retriever, budget, seed)

    evaluate = _Evaluator(inputs, spec, out, seed, device)
    curves: dict[str, list[dict]] = {}
    for m in MODELS:
        dec = spec.decoding(m)
        curves[m] = [{**{k: p[k] for k in ("step", "flops", "seconds")}, **evaluate(m, runs[m], p, dec,
                                                                                     f"step-{p['step']}")}
                     for p in runs[m]["points"]]
    rows = []
    for budget_name in BUDGETS:
        for m in MODELS:
            step = runs[m]["steps"] if m != "ldm" else \
                runs[m]["flops_step" if budget_name == "FLOPs" else "seconds_step"]
            point = next(p for p in curves[m] if p["step"] == step)
            rows.append(_row(m, budget_name, runs[m], point, spec.decoding(m)))
    ldm = runs["ldm"]
    at_flops = next(p for p in ldm["points"] if p["step"] == ldm["flops_step"])
    default = spec.decoding("ldm")
    for n in spec.ldm_sampling_steps:
        dec = {**default, "num_inference_steps": n}
        if n == default["num_inference_steps"]:
            continue  # the FLOPs row itself
        got = evaluate("ldm", ldm, at_flops, dec, f"step-{at_flops['step']}-ddim{n}")
        rows.append(_row("ldm", "FLOPs", ldm, {**{k: at_flops[k] for k in ("step", "flops", "seconds")}, **got}, dec))
    for m in MODELS:  # the checkpoints served the evaluations only; the final weights stay
        shutil.rmtree(Path(runs[m]["model_dir"]) / "checkpoints", ignore_errors=True)
    shutil.rmtree(Path(runs["ldm"]["model_dir"]) / "snapshots", ignore_errors=True)
    return write_baselines(out, inputs, spec, seed, runs, budget, rows, curves, seconds=time.time() - t_all)


def _row(model: str, budget: str, run: dict, point: dict, decoding: dict) -> dict:
    return {"model": LABELS[model], "budget": budget, "params": run["params"], "step": point["step"],
            "train_flops": point["flops"], "train_seconds": round(point["seconds"], 1),
            "decoding": _label(model, decoding), **{k: point.get(k) for k in (
                "seconds_per_image", "colour", "shape", "both", "fd", "clip_score")},
            "fd_metric": point.get("fd_metric"), "eval": point.get("eval")}


# ---- results -----------------------------------------------------------------------------------

COLUMNS = ("model", "budget", "params", "train_flops", "train_seconds", "decoding", "seconds_per_image", "colour",
           "shape", "both", "fd", "clip_score")


def write_baselines(out: Path, inputs: RunInputs, spec: BaselinesSpec, seed: int, runs: dict, budget: dict,
                    rows: list[dict], curves: dict, seconds: float | None = None) -> dict:
    """metrics.json, results.md and baselines_compute.png."""
    from cm3leon.eval.report import markdown_table
    from cm3leon.utils.io import write_json, write_text

    notes = list(NOTES)
    dalle = runs["dalle"]["train_seconds"]
    notes.append(f"The DALL-E-style model trained CM3Leon's steps of the same blocks (the same FLOPs) in {dalle:.0f} s "
                 f"against CM3Leon's {budget['seconds']:.0f} s: its wall-time row is its whole run.")
    ldm = runs["ldm"]
    notes.append(f"The LDM reached the FLOPs budget at step {ldm['flops_step']} and the wall-time budget at step "
                 f"{ldm['seconds_step']} ({ldm['samples']} latents seen in all, {ldm['train_seconds']:.0f} s).")
    plot = plot_compute(curves, budget, out / "baselines_compute.png")
    result = {"run": str(inputs.run), "data": str(inputs.data), "seed": seed, "spec": spec.to_dict(),
              "budgets": {"train_flops": budget["flops"], "train_seconds": budget["seconds"]},
              "flops_counting": "cm3leon.train.flops.training_flops_per_sample: 3 x the forward FLOPs of one sample "
                                "counted by torch FlopCounterMode (matmuls, convolutions, attention), x samples seen",
              "models": {m: {k: v for k, v in runs[m].items() if k not in ("points",)} for m in MODELS},
              "rows": rows, "curves": curves, "plots": [plot.name] if plot else [], "notes": notes,
              "seconds": None if seconds is None else round(seconds, 1)}
    write_json(out / "metrics.json", result)
    md = ["# Baselines at CM3Leon's budget", "",
          f"Run {inputs.run}, seed {seed}. Budgets (CM3Leon's): {budget['flops']:.3g} training FLOPs, "
          f"{budget['seconds']:.0f} s of training steps. Text->image on {spec.num_prompts} test captions.", "",
          markdown_table(rows, list(COLUMNS)), ""]
    md += [f"- {n}" for n in notes] + [""] + ([f"![{plot.stem}]({plot.name})"] if plot else [])
    write_text(out / "results.md", "\n".join(md) + "\n")
    return result


def plot_compute(curves: dict, budget: dict, out_png: Path) -> Path | None:
    """Quality against training compute, a line per model through its checkpoints: against
    training FLOPs (top) and training seconds (bottom), the budgets dashed."""
    from cm3leon.eval.report import new_figure, save_figure

    metrics = [m for m in METRICS if any(isinstance(p.get(m), (int, float)) for c in curves.values() for p in c)]
    if not metrics:
        return None
    fig = new_figure(figsize=(3.3 * len(metrics) + 0.6, 6.4))
    for row, (x, xlabel, limit) in enumerate((("flops", "training FLOPs", budget["flops"]),
                                              ("seconds", "training seconds", budget["seconds"]))):
        for i, m in enumerate(metrics):
            ax = fig.add_subplot(2, len(metrics), row * len(metrics) + i + 1)
            for model, points in curves.items():
                pts = sorted((p[x], p[m]) for p in points if isinstance(p.get(m), (int, float)))
                ax.plot([a for a, _ in pts], [y for _, y in pts], marker="o", label=LABELS[model])
            ax.axvline(limit, color="grey", linestyle="--", linewidth=0.8)
            ax.set_xlim(left=0)
            ax.set_xlabel(xlabel, fontsize=8)
            ax.tick_params(labelsize=7)
            ax.set_title(METRIC_LABELS[m], fontsize=8)
            ax.grid(True, alpha=0.3)
            if row == 0 and i == 0:
                ax.legend(fontsize=7)
    fig.suptitle("quality vs training compute (checkpoints along each run; dashed: CM3Leon's budget)", fontsize=9)
    return save_figure(fig, out_png)


def plan_text(spec: BaselinesSpec) -> str:
    """What `--baselines` trains and evaluates, in words (`cm3leon ablate --baselines --plan`)."""
    cfg = spec.ldm_config()
    evals = 3 * spec.curve_points + len(set(spec.ldm_sampling_steps) - {cfg.num_inference_steps}) + 1
    return "\n".join([
        f"CM3Leon: preset {spec.preset}, {spec.steps} steps of the run's recipe, k={spec.num_retrieved}, "
        f"TopP + CFG {spec.cfg_scale:g}; sets the budgets (its training FLOPs and seconds)",
        "DALL-E-style AR: the same transformer and steps, text first, no CM3 spans, no retrieval, TopP",
        f"LDM: U-Net {cfg.block_out_channels} x {cfg.layers_per_block} layer(s), batch {cfg.batch_size}, "
        f"lr {cfg.lr:g}, "
        f"DDIM {cfg.num_inference_steps} steps + CFG {cfg.cfg_scale:g}; trained until both budgets are spent",
        f"about {evals} evaluations of {spec.num_prompts} prompts ({spec.curve_points} checkpoints per model, the "
        f"LDM's wall-time point, DDIM steps {list(spec.ldm_sampling_steps)})"])
