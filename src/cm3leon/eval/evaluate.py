"""Model-level evaluation: generate on a dataset split with a trained model and score it.

    cm3leon eval model --model runs/demo/sft/model --data data/shapes --out runs/demo/eval

Tasks and their metrics (each metric skips itself, with a note in metrics.json, when its
inputs are absent):
- text -> image on the split's captions: "shapes" (the checker's prompt accuracy: colour,
  shape, both, size, position; object precision / recall and exact scene by number of
  objects where the prompt describes the whole scene), "clip" (CLIP score of each image with
  its prompt: the retriever's cosine similarity), "fid" (Fréchet distance between generated
  and real images of the split: "FD-CLIP" / "FD-retriever" in the retriever's feature space
  by default, "FID" only with local InceptionV3 weights);
- image -> text on the split's images: "cider" (CIDEr-D and BLEU-4 against every reference
  caption; on shapes data also the rate of captions naming the right colours and shapes);
- "vqa": answers to the split's `vqa.jsonl` questions, VQAv2 accuracy, also by question type;
- "edit": on `edits.jsonl`, the rate at which the checker finds the edited image equal to the
  target scene (shapes data).

Each task lives in its module of `cm3leon.eval.tasks` with its model-free scorer
(`score_shapes_images`, `score_captions`, `score_vqa`, `score_edits` take generated
outputs), so any system's outputs, or the real images themselves, go through exactly the
same path; the data it reads is `cm3leon.eval.data`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Mapping, Sequence

from cm3leon.decode.config import DecodingConfig
from cm3leon.errors import CM3LeonError
from cm3leon.eval.data import check_num, load_eval_data
from cm3leon.eval.tasks import TaskContext
from cm3leon.eval.tasks.text_to_image import METRICS as T2I_METRICS

METRICS = (*T2I_METRICS, "cider", "vqa", "edit")
DEFAULT_METRICS = METRICS

# ---- models and feature spaces --------------------------------------------------------------


def load_model(model_dir, device: str = "auto"):
    """A CM3Leon from a directory; an already loaded model (anything with CM3Leon's task
    methods taking lists: `text_to_image`, `image_to_text`, `answer`, `edit`) is returned as is."""
    if not isinstance(model_dir, (str, os.PathLike)):
        return model_dir
    import torch

    from cm3leon.api import CM3Leon

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return CM3Leon.from_pretrained(model_dir, device=device)


def scoring_retriever(model, clip_retriever: str | os.PathLike | None = None):
    """The retriever that scores images (CLIP score, FD features): `clip_retriever` (a
    retriever directory, e.g. one made from real CLIP weights) if given, else the model's own
    (`retriever/` of the model directory); None when there is neither."""
    if clip_retriever is not None:
        from cm3leon.retrieval import load_retriever

        return load_retriever(clip_retriever)
    return getattr(model, "retriever", None)


# ---- the evaluation -------------------------------------------------------------------------


def _parse_metrics(metrics) -> list[str]:
    if isinstance(metrics, str):
        metrics = [m.strip() for m in metrics.split(",") if m.strip()]
    metrics = list(dict.fromkeys(metrics))
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise CM3LeonError(f"metrics: unknown {bad} (choose from {', '.join(METRICS)})" if bad
                           else f"metrics: none given (choose from {', '.join(METRICS)})")
    return metrics


def evaluate_model(
    model_dir,
    data: str | os.PathLike,
    out_dir: str | os.PathLike,
    metrics: Sequence[str] | str = DEFAULT_METRICS,
    split: str | None = "test",
    num_prompts: int | None = 200,
    decoding=None,
    seed: int = 0,
    batch_size: int = 16,
    fid_features: str = "retriever",
    clip_retriever: str | os.PathLike | None = None,
    images: str | os.PathLike | None = None,
    device: str = "auto",
) -> dict:
    """Evaluate a model on a dataset split; write metrics.json, metrics.md, samples.jsonl,
    generated images (images/) and sample grids (grid_*.png) into `out_dir`.

    model_dir: a model directory or an already loaded model. metrics: any of METRICS
    (or a comma-separated string). num_prompts: items per task (None: the whole split).
    decoding: text->image settings, a `DecodingConfig` or a dict of its fields applied over
    the model's (`CM3Leon.decoding`: the paper's defaults with the model directory's
    decoding.json; None values keep them); a loaded model of another kind (the latent-diffusion
    baseline) names its own options in `decoding_keys` and their defaults in `decoding`. fid_features:
    "retriever" (the scoring retriever: `clip_retriever` or the model's own),
    "retriever:DIR", "inception:WEIGHTS.pth" or "pixelstats".
    images: the image folder of a COCO captions JSON. Returns the metrics.json content."""
    from cm3leon.eval.tasks import captioning, editing, text_to_image, vqa
    from cm3leon.utils.io import write_json, write_jsonl, write_text
    from cm3leon.utils.logging import MetricsLogger

    metrics = _parse_metrics(metrics)
    check_num(num_prompts)
    if batch_size < 1:
        raise CM3LeonError(f"batch_size must be >= 1, got {batch_size}")
    if decoding is not None and not isinstance(decoding, (DecodingConfig, Mapping)):
        raise CM3LeonError(f"decoding must be a DecodingConfig or a dict of its fields, got {type(decoding).__name__}")
    t_start = time.perf_counter()
    model = load_model(model_dir, device)
    own = getattr(model, "decoding_keys", None)  # a model of another kind names its own options
    if own is None:
        decoding = decoding if isinstance(decoding, DecodingConfig) else \
            getattr(model, "decoding", DecodingConfig()).replace(**(decoding or {}))
    else:
        if isinstance(decoding, DecodingConfig):
            raise CM3LeonError(f"decoding: {type(model).__name__} takes a dict of {', '.join(own)}, not a DecodingConfig")
        bad = sorted(set(decoding or {}) - set(own))
        if bad:
            raise CM3LeonError(f"decoding: unknown option(s) {bad}; expected some of {', '.join(own)}")
        decoding = {**model.decoding, **{k: v for k, v in (decoding or {}).items() if v is not None}}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    size = getattr(model, "resolution", None)
    data_ = load_eval_data(data, split, num_prompts, size=size, images=images)
    ctx = TaskContext(model=model, data=data_, source=str(data), out=out, metrics=metrics, decoding=decoding,
                      seed=seed, batch_size=batch_size, num=num_prompts, size=size,
                      retriever=scoring_retriever(model, clip_retriever), fid_features=fid_features,
                      log=MetricsLogger(out / "eval_log.jsonl"))
    for task in (text_to_image, captioning, vqa, editing):
        task.run(ctx)
    ctx.log.close()

    report = {
        "model": str(model_dir) if isinstance(model_dir, (str, os.PathLike)) else type(model_dir).__name__,
        "data": str(data), "split": split, "num_prompts": num_prompts, "num_images": len(data_.images),
        "decoding": decoding.to_dict() if isinstance(decoding, DecodingConfig) else decoding, "seed": seed, "fid_features": fid_features,
        "metrics": {m: ctx.results[m] for m in metrics if m in ctx.results},
        "seconds_per_image": ctx.seconds_per_image,  # text->image generation, `batch_size` prompts per call
        "notes": data_.notes, "seconds": round(time.perf_counter() - t_start, 2),
    }
    write_jsonl(out / "samples.jsonl", ctx.samples)
    write_json(out / "metrics.json", report)
    write_text(out / "metrics.md", metrics_markdown(report))
    return report


def headline_rows(metrics: dict) -> list[dict]:
    """One row per metric: {"metric", "value", "n", "note"} (skipped metrics carry their note)."""
    rows = []
    for m, r in metrics.items():
        if "skipped" in r:
            rows.append({"metric": m, "value": None, "n": None, "note": "skipped: " + r["skipped"]})
        elif m == "shapes":
            rows.append({"metric": "shapes: colour+shape right (text->image)", "value": r["both"], "n": r["n"],
                         "note": f"colour {r['colour']:.3f}, shape {r['shape']:.3f}, position {r['position']:.3f}, "
                                 f"all {r['all']:.3f}"})
            if "scene" in r:
                s = r["scene"]
                rows.append({"metric": "shapes: exact scene (colour, shape)", "value": s["exact_scene"], "n": s["n"],
                             "note": f"object precision {s['precision']:.3f}, recall {s['recall']:.3f}"})
        elif m == "clip":
            rows.append({"metric": r["name"], "value": r["value"], "n": r["n"],
                         "note": f"real images: {r['real_images']:.4g} (cosine similarity)"})
        elif m == "fid":
            rows.append({"metric": r["name"], "value": r["value"], "n": r["n_fake"],
                         "note": f"vs {r['n_real']} real images, {r['feature_dim']}-d features"
                                 + ("" if r["name"] == "FID" else "; not comparable with papers' FID")})
        elif m == "cider":
            rows.append({"metric": "CIDEr-D", "value": r["CIDEr-D"], "n": r["n"], "note": ""})
            rows.append({"metric": "BLEU-4", "value": r["BLEU-4"], "n": r["n"], "note": ""})
            if "shapes" in r:
                rows.append({"metric": "shapes: caption names the right objects", "value": r["shapes"]["correct"],
                             "n": r["shapes"]["n"], "note": ""})
        elif m == "vqa":
            rows.append({"metric": "VQA accuracy (%)", "value": r["vqa_accuracy"], "n": r["n"], "note": ", ".join(
                f"{t} {v['vqa_accuracy']:.1f}" for t, v in r.get("by_type", {}).items())})
        elif m == "edit":
            rows.append({"metric": "edit done rate", "value": r["done_rate"], "n": r["n"],
                         "note": f"do-nothing baseline {r.get('do_nothing_baseline', float('nan')):.3f}"})
    return rows


def metrics_markdown(report: dict) -> str:
    """metrics.md: settings, the headline table and the breakdowns."""
    from cm3leon.eval.report import markdown_table

    d = report["decoding"]
    lines = [f"# Evaluation of {report['model']}", "",
             f"Data: {report['data']} (split {report['split']}, {report['num_images']} images); "
             f"decoding: {', '.join(f'{k}={v}' for k, v in d.items())}; seed {report['seed']}.", "",
             markdown_table(headline_rows(report["metrics"]), ["metric", "value", "n", "note"])]
    m = report["metrics"]
    if "by_num_objects" in m.get("shapes", {}):
        lines += ["## Shapes accuracy by number of objects in the prompt", "",
                  markdown_table([{"objects": k, **v} for k, v in m["shapes"]["by_num_objects"].items()])]
    if "scene" in m.get("shapes", {}):
        rows = [{"scene": name, "objects": k, **{x: v[x] for x in ("precision", "recall", "exact_scene", "n")}}
                for name in ("scene", "scene_layout") if name in m["shapes"]
                for k, v in m["shapes"][name]["by_num_objects"].items()]
        lines += ["## Scenes (scene: colour + shape; scene_layout: also size and cell)", "", markdown_table(rows)]
    if "by_type" in m.get("vqa", {}):
        lines += ["## VQA by question type", "",
                  markdown_table([{"type": t, **v} for t, v in m["vqa"]["by_type"].items()])]
    if "by_type" in m.get("edit", {}):
        lines += ["## Editing by type", "", markdown_table([{"type": t, **v} for t, v in m["edit"]["by_type"].items()])]
    if report.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"
