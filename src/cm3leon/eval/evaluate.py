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

Scoring is separate from generation (`score_text_to_image`, `score_captions`, `score_vqa`,
`score_edits` take generated outputs), so any system's outputs, or the real images
themselves, go through exactly the same path.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from cm3leon.decode.config import DecodingConfig
from cm3leon.errors import CM3LeonError

METRICS = ("shapes", "clip", "fid", "cider", "vqa", "edit")
T2I_METRICS = ("shapes", "clip", "fid")  # the text->image ones
DEFAULT_METRICS = METRICS
GRID_MAX = 32  # images per sample grid

# ---- data -----------------------------------------------------------------------------------


@dataclass
class CaptionedImage:
    """One image of the split with every reference caption; `objects` is its shapes
    annotation (None outside shapes data)."""

    key: str
    image: Any  # PIL image
    references: list[str]
    objects: list[dict] | None = None

    @property
    def prompt(self) -> str:
        return self.references[0]


@dataclass
class EvalData:
    """What the evaluation reads from a dataset: images with their captions (any format the
    readers open: folder, webdataset shards, COCO JSON) and, for a folder, its instruction
    files (vqa.jsonl, edits.jsonl) and shapes annotations."""

    path: Path
    split: str | None
    images: list[CaptionedImage]
    folder: Path | None  # the dataset folder (None for shards / COCO)
    is_shapes: bool = False
    notes: list[str] = field(default_factory=list)


def _stem(rel: str) -> str:
    # the readers' split key: the file name up to its first dot
    return rel.replace("\\", "/").rsplit("/", 1)[-1].split(".", 1)[0]


def _row_split(row: dict) -> str:
    from cm3leon.data.readers import hash_split

    return row.get("split") or hash_split(_stem(row["image"]))


def check_num(num: int | None) -> None:
    """A prompt count: a positive integer, or None for all of them."""
    if num is not None and (isinstance(num, bool) or not isinstance(num, int) or num < 1):
        raise CM3LeonError(f"num_prompts must be a positive integer or None (all), got {num!r}")


def load_eval_data(data: str | os.PathLike, split: str | None = "test", num: int | None = None,
                   size: int | None = None, images: str | os.PathLike | None = None) -> EvalData:
    """The first `num` images of `split` (None: all) with all their captions, read by the
    dataset readers; images are decoded only for the images kept (`size`: short-side resize
    + centre crop, None keeps them as stored). `images`: a COCO image folder."""
    from cm3leon.data.readers import detect_format, load_image, SkipRecord
    from cm3leon.utils.io import read_jsonl

    from cm3leon.data.codes import SPLITS

    check_num(num)
    if split is not None and split not in SPLITS:
        raise CM3LeonError(f"split: unknown split {split!r}; expected one of {SPLITS} or None (all)")
    source = detect_format(data, images)
    groups: dict[Any, dict] = {}
    for unit in source.units():
        for item in source.items(unit, True):
            if isinstance(item, SkipRecord) or (split is not None and item.split != split):
                continue
            gid = item.meta.get("image_id", str(item.image) if isinstance(item.image, Path) else item.key)
            g = groups.get(gid)
            if g is None:
                if num is not None and len(groups) >= num:
                    continue  # still read on: later rows may add captions of kept images
                g = groups[gid] = {"item": item, "refs": []}
            refs = item.meta.get("references")
            if refs:  # COCO: every caption of the image comes with each record
                g["refs"] = [r for r in refs if isinstance(r, str) and r.strip()]
            else:
                g["refs"].append(item.text)
    folder = Path(data) if Path(data).is_dir() and (Path(data) / "captions.jsonl").is_file() else None
    annotations: dict[str, list[dict]] = {}
    if folder is not None and (folder / "annotations.jsonl").is_file():
        for row in read_jsonl(folder / "annotations.jsonl"):
            if isinstance(row.get("image"), str) and isinstance(row.get("objects"), list):
                annotations[str((folder / row["image"]).resolve())] = row["objects"]
    out = EvalData(Path(data), split, [], folder, is_shapes=bool(annotations))
    skipped = 0
    for g in groups.values():
        item = g["item"]
        try:
            im = load_image(item.image, size)
        except SkipRecord:
            skipped += 1
            continue
        objects = annotations.get(str(Path(item.image).resolve())) if isinstance(item.image, Path) else None
        out.images.append(CaptionedImage(item.key, im, g["refs"], objects))
    if skipped:
        out.notes.append(f"{skipped} unreadable image(s) of split {split!r} skipped")
    if not out.images:
        raise CM3LeonError(f"{data}: no readable images in split {split!r}")
    return out


def load_instruction_rows(data: EvalData, filename: str, image_keys: Sequence[str], num: int | None,
                          size: int | None) -> list[dict] | None:
    """The first `num` rows of `filename` (vqa.jsonl, edits.jsonl) in the data's split with
    their images loaded; None when the dataset has no such file."""
    from cm3leon.data.readers import confined_path, iter_jsonl_objects, load_image, SkipRecord

    if data.folder is None or not (data.folder / filename).is_file():
        return None
    rows = []
    for _, obj in iter_jsonl_objects(data.folder / filename):
        if num is not None and len(rows) >= num:
            break
        if isinstance(obj, SkipRecord) or not all(isinstance(obj.get(k), str) for k in image_keys):
            continue
        if data.split is not None and _row_split(obj) != data.split:
            continue
        try:
            rows.append({**obj, **{f"{k}_pil": load_image(confined_path(data.folder, obj[k]), size)
                                   for k in image_keys}})
        except SkipRecord:
            continue
    return rows


# ---- scoring (model-free) -------------------------------------------------------------------


def _group_means(results: Sequence[dict], keys: Sequence[str]) -> dict:
    n = len(results)
    return {k: sum(bool(r[k]) for r in results) / n for k in keys} | {"n": n}


def score_shapes_images(images: Sequence[Any], prompts: Sequence[str],
                        truths: Sequence[Sequence[dict] | None] | None = None) -> tuple[dict, list[dict]]:
    """Checker accuracy of generated images against their prompts (shapes captions).

    Returns (summary, per-image verdicts). Summary: prompt accuracy ("colour", "shape",
    "both", "size", "position", "all", "count": as many objects drawn as asked,
    "both_and_count": both and count, "n"), also `by_num_objects`; `scene`: object
    precision / recall and exact scene on (colour, shape) for prompts naming every object
    of the true scene, by number of objects; `scene_layout`: the same on all four attributes
    (shape, colour, size, cell) for prompts that state every size and position. Prompts that
    name no object are not scored (counted as "unparsed")."""
    from cm3leon.data.checker import check_prompt
    from cm3leon.data.shapes import parse_caption
    from cm3leon.eval.shapes_metrics import DEFAULT_MATCH_ON, prompt_accuracy, scene_metrics
    from cm3leon.utils.logging import progress

    if len(images) != len(prompts) or (truths is not None and len(truths) != len(prompts)):
        raise CM3LeonError(f"{len(images)} images, {len(prompts)} prompts"
                           + (f", {len(truths)} truths" if truths is not None else ""))
    verdicts: list[dict | None] = []
    parsed = []
    with progress(total=len(images), desc="shapes checker", unit="img") as bar:
        for im, p in zip(images, prompts):
            req = parse_caption(p)
            parsed.append(req)
            verdicts.append(check_prompt(im, req) if req else None)
            bar.update(1)
    idx = [i for i, v in enumerate(verdicts) if v is not None]
    if not idx:
        raise CM3LeonError("no prompt names a shape (\"[size] colour shape\"); the shapes metric needs shapes captions")
    flags = ("colour_ok", "shape_ok", "both_ok", "size_ok", "position_ok", "all_ok")
    acc = prompt_accuracy([i for i in idx], [prompts[i] for i in idx], check=lambda i, _p: verdicts[i])
    f = acc["fields"]
    summary: dict[str, Any] = {"colour": acc["colour"], "shape": acc["shape"], "both": acc["both"],
                               "size": f["size_ok"], "position": f["position_ok"], "all": f["all_ok"],
                               "count": f["count_ok"],  # as many objects drawn as asked
                               "n": acc["n"], "unparsed": len(prompts) - len(idx)}
    for v in verdicts:
        if v is not None:
            v["both_ok"] = bool(v["colour_ok"]) and bool(v["shape_ok"])
    # colour + shape right and no extra object drawn
    summary["both_and_count"] = sum(verdicts[i]["both_ok"] and bool(verdicts[i]["count_ok"]) for i in idx) / len(idx)
    by_n: dict[int, list[dict]] = defaultdict(list)
    for i in idx:
        by_n[len(parsed[i])].append(verdicts[i])
    summary["by_num_objects"] = {k: {n.replace("_ok", ""): v for n, v in _group_means(by_n[k], flags).items()}
                                 for k in sorted(by_n)}

    def detected(i: int) -> list[dict]:
        return verdicts[i]["detections"]

    if truths is not None:
        full = [i for i in idx if truths[i] is not None and len(parsed[i]) == len(truths[i])]
        if full:
            s = scene_metrics(full, [truths[i] for i in full], detect=detected, match_on=("shape", "color"))
            s.pop("per_image")
            summary["scene"] = s
        layout = [i for i in full if all(o["size"] and o["cell"] is not None for o in parsed[i])]
        if layout:
            s = scene_metrics(layout, [truths[i] for i in layout], detect=detected, match_on=DEFAULT_MATCH_ON)
            s.pop("per_image")
            summary["scene_layout"] = s
    per_image = [None if v is None else {**{k: bool(v[k]) for k in flags}, "count_ok": bool(v["count_ok"]),
                                         "detected": [f"{d['size']} {d['color']} {d['shape']} {d['position']}"
                                                      for d in v["detections"]]}
                 for v in verdicts]
    return summary, per_image


def clip_scores(retriever, images: Sequence[Any], texts: Sequence[str], batch_size: int = 64) -> list[float]:
    """Cosine similarity of each image with its text in the retriever's space (CLIP score)."""
    from cm3leon.utils.logging import progress

    out: list[float] = []
    with progress(total=len(images), desc="clip score", unit="img") as bar:
        for i in range(0, len(images), batch_size):
            scores = retriever.clip_score(list(images[i:i + batch_size]), list(texts[i:i + batch_size]))
            out += [float(x) for x in scores]
            bar.update(min(batch_size, len(images) - i))
    return out


def retriever_name(retriever) -> str:
    """"CLIP" for a local CLIP retriever, "retriever" for the bi-encoder trained here."""
    return "CLIP" if getattr(retriever, "kind", None) == "clip" else "retriever"


def score_captions(captions: Sequence[str], references: Sequence[Sequence[str]],
                   truths: Sequence[Sequence[dict] | None] | None = None) -> tuple[dict, list[dict]]:
    """CIDEr-D and BLEU-4 against all references; with shapes truths also the checker's
    caption accuracy ("correct": colours and shapes named exactly right). -> (summary, per caption)."""
    from cm3leon.data.checker import caption_correct
    from cm3leon.eval.captioning import caption_metrics
    from cm3leon.eval.shapes_metrics import caption_accuracy

    if len(captions) != len(references):
        raise CM3LeonError(f"{len(captions)} captions but {len(references)} reference lists")
    summary = caption_metrics(list(captions), [list(r) for r in references])
    per = [{} for _ in captions]
    if truths is not None:
        idx = [i for i, t in enumerate(truths) if t is not None]
        if idx:
            acc = caption_accuracy([captions[i] for i in idx], [truths[i] for i in idx])
            summary["shapes"] = {"correct": acc["correct"], "colour": acc["fields"]["colour_ok"],
                                 "shape": acc["fields"]["shape_ok"], "n": acc["n"]}
            for i in idx:
                v = caption_correct(captions[i], truths[i])
                per[i] = {k: v[k] for k in ("colour_ok", "shape_ok", "all_ok")}
    return summary, per


def score_vqa(answers: Sequence[str], references: Sequence[Sequence[str]],
              types: Sequence[str | None] | None = None) -> tuple[dict, list[float]]:
    """VQAv2 accuracy (percent), overall and by question type. -> (summary, per question 0..1)."""
    from cm3leon.eval.vqa import vqa_score

    res = vqa_score(list(answers), [list(r) for r in references])
    per = res.pop("per_question")
    if types is not None:
        groups: dict[str, list[float]] = defaultdict(list)
        for t, a in zip(types, per):
            groups[str(t or "other")].append(a)
        res["by_type"] = {t: {"vqa_accuracy": 100.0 * sum(v) / len(v), "n": len(v)} for t, v in sorted(groups.items())}
    return res, per


def edit_target_objects(row: dict) -> list[dict] | None:
    """The objects the edited image should show: the row's `target_objects`, else what the
    checker reads off the rendered target image (exact on clean renderings); None when the
    target cannot be read (an unnamed shape)."""
    from cm3leon.data.checker import UNKNOWN_SHAPE, detect_objects

    if isinstance(row.get("target_objects"), list):
        return row["target_objects"]
    dets = detect_objects(row["target_image_pil"])
    if any(d.shape == UNKNOWN_SHAPE for d in dets):
        return None
    return [{"shape": d.shape, "color": d.color, "size": d.size, "cell": list(d.cell)} for d in dets]


def score_edits(edited: Sequence[Any], targets: Sequence[Sequence[dict] | None], types: Sequence[str | None],
                sources: Sequence[Any] | None = None) -> tuple[dict, list[dict | None]]:
    """The rate of edited images whose detected scene equals the target scene exactly
    ("done_rate"), object precision / recall, by edit type; with `sources`, the same rate for
    the unedited source image ("do_nothing_baseline": what returning the input scores)."""
    from cm3leon.data.checker import detect_objects, score_scene

    per: list[dict | None] = []
    groups: dict[str, list[dict]] = defaultdict(list)
    base = []
    for i, (im, tgt, t) in enumerate(zip(edited, targets, types)):
        if tgt is None:
            per.append(None)
            continue
        s = score_scene(detect_objects(im), tgt)
        v = {"done": bool(s["exact"]), "precision": s["precision"], "recall": s["recall"]}
        per.append(v)
        groups[str(t or "other")].append(v)
        if sources is not None:
            base.append(bool(score_scene(detect_objects(sources[i]), tgt)["exact"]))
    judged = [v for v in per if v is not None]
    if not judged:
        raise CM3LeonError("no edit target could be read by the checker")

    def agg(vs: list[dict]) -> dict:
        n = len(vs)
        return {"done_rate": sum(v["done"] for v in vs) / n, "precision": sum(v["precision"] for v in vs) / n,
                "recall": sum(v["recall"] for v in vs) / n, "n": n}

    out = agg(judged) | {"unjudged": len(per) - len(judged)}
    out["by_type"] = {t: agg(vs) for t, vs in sorted(groups.items())}
    if base:
        out["do_nothing_baseline"] = sum(base) / len(base)
    return out, per


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


def fd_extractor(spec: str, retriever) -> tuple[Any | None, str | None]:
    """(feature extractor, None) for --fid-features, or (None, why not): "retriever" = the
    scoring retriever, "retriever:DIR", "inception:WEIGHTS", "pixelstats"."""
    from cm3leon.eval.fid import RetrieverExtractor, make_extractor

    if spec == "retriever":
        if retriever is None:
            return None, ("no retriever to extract features with (the model directory has no retriever/); "
                          "pass fid_features='inception:WEIGHTS.pth' or 'pixelstats', or clip_retriever=DIR")
        return RetrieverExtractor(retriever, name=retriever_name(retriever)), None
    return make_extractor(spec), None


class FDScorer:
    """Fréchet distance of generated image sets against one real set, whose features are
    extracted once."""

    def __init__(self, extractor, real_images: Sequence[Any], batch_size: int = 64):
        from cm3leon.eval.fid import extract_features, metric_name

        self.extractor = extractor
        self.name = metric_name(extractor)
        self.batch_size = batch_size
        self.real = extract_features(real_images, extractor, batch_size, desc="features (real)")

    def __call__(self, fake_images: Sequence[Any]) -> dict:
        from cm3leon.eval.fid import extract_features, frechet_distance

        fake = extract_features(fake_images, self.extractor, self.batch_size, desc="features (generated)")
        return {"name": self.name, "value": frechet_distance(self.real, fake), "n_real": int(self.real.shape[0]),
                "n_fake": int(fake.shape[0]), "feature_dim": int(self.real.shape[1])}


def generate_images(model, prompts: Sequence[str], decoding, seed: int, batch_size: int,
                    desc: str = "text->image") -> list:
    """One image per prompt, `batch_size` prompts per call (decoding: a DecodingConfig);
    batch b uses seed + b."""
    from cm3leon.utils.logging import progress

    out: list = []
    with progress(total=len(prompts), desc=desc, unit="img") as bar:
        for b, i in enumerate(range(0, len(prompts), batch_size)):
            chunk = list(prompts[i:i + batch_size])
            out += model.text_to_image(chunk, seed=seed + b, decoding=decoding)
            bar.update(len(chunk))
    return out


def _batched(fn: Callable, columns: Sequence[Sequence], batch_size: int, desc: str, seed: int) -> list:
    from cm3leon.utils.logging import progress

    n = len(columns[0])
    out: list = []
    with progress(total=n, desc=desc, unit="item") as bar:
        for b, i in enumerate(range(0, n, batch_size)):
            out += fn(*[list(c[i:i + batch_size]) for c in columns], seed=seed + b)
            bar.update(min(batch_size, n - i))
    return out


# ---- the evaluation -------------------------------------------------------------------------


def _save_png(image, path: Path) -> None:
    from cm3leon.utils.io import atomic_path

    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


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
    from cm3leon.eval.report import image_grid
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
        bad = sorted(set(decoding or {}) - set(own))
        if bad:
            raise CM3LeonError(f"decoding: unknown option(s) {bad}; expected some of {', '.join(own)}")
        decoding = {**model.decoding, **{k: v for k, v in (decoding or {}).items() if v is not None}}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    size = getattr(model, "resolution", None)
    data_ = load_eval_data(data, split, num_prompts, size=size, images=images)
    retriever = scoring_retriever(model, clip_retriever)
    results: dict[str, dict] = {}
    samples: list[dict] = []
    seconds_per_image = None
    log = MetricsLogger(out / "eval_log.jsonl")

    def skip(metric: str, why: str) -> None:
        results[metric] = {"skipped": why}

    # --- text -> image -------------------------------------------------------------------
    t2i = [m for m in T2I_METRICS if m in metrics]
    if "shapes" in t2i and not data_.is_shapes:
        skip("shapes", f"{data}: no shapes annotations (annotations.jsonl): not a shapes dataset")
        t2i.remove("shapes")
    if "clip" in t2i and retriever is None:
        skip("clip", "no retriever to score with: the model directory has no retriever/ and no clip_retriever given")
        t2i.remove("clip")
    extractor = None
    if "fid" in t2i:
        extractor, why = fd_extractor(fid_features, retriever)
        if extractor is None:
            skip("fid", why)
            t2i.remove("fid")
        elif len(data_.images) < 2:
            skip("fid", f"Fréchet distance needs at least 2 images; split {split!r} gave {len(data_.images)}")
            t2i.remove("fid")
    if t2i:
        t0 = time.perf_counter()
        prompts = [c.prompt for c in data_.images]
        generated = generate_images(model, prompts, decoding, seed, batch_size)
        seconds_per_image = (time.perf_counter() - t0) / len(generated)  # generation alone
        rows = [{"task": "text_to_image", "prompt": p, "source": c.key, "image": f"images/t2i/{i:05d}.png"}
                for i, (p, c) in enumerate(zip(prompts, data_.images))]
        for r, im in zip(rows, generated):
            _save_png(im, out / r["image"])
        marks = None
        if "shapes" in t2i:
            summary, per = score_shapes_images(generated, prompts, [c.objects for c in data_.images])
            results["shapes"] = summary
            for r, v in zip(rows, per):
                r["verdict"] = v
            marks = [None if v is None else v["all_ok"] for v in per]
        if "clip" in t2i:
            cs = clip_scores(retriever, generated, prompts)
            real = clip_scores(retriever, [c.image for c in data_.images], prompts)
            results["clip"] = {"name": f"CLIP score ({retriever_name(retriever)})", "value": sum(cs) / len(cs),
                               "real_images": sum(real) / len(real), "n": len(cs)}
            for r, v in zip(rows, cs):
                r["clip_score"] = v
        if "fid" in t2i:
            results["fid"] = FDScorer(extractor, [c.image for c in data_.images])(generated)
        samples += rows
        k = min(GRID_MAX, len(generated))
        _save_png(image_grid(generated[:k], captions=prompts[:k], marks=marks[:k] if marks else None),
                  out / "grid_text_to_image.png")
        log.log(task="text_to_image", n=len(generated), seconds=round(time.perf_counter() - t0, 2))

    # --- image -> text -------------------------------------------------------------------
    if "cider" in metrics:
        t0 = time.perf_counter()
        src = [c.image for c in data_.images]
        captions = _batched(model.image_to_text, [src], batch_size, "captioning", seed)
        truths = [c.objects for c in data_.images] if data_.is_shapes else None
        summary, per = score_captions(captions, [c.references for c in data_.images], truths)
        results["cider"] = summary
        samples += [{"task": "captioning", "source": c.key, "caption": cap, "references": c.references,
                     **({"verdict": v} if v else {})} for c, cap, v in zip(data_.images, captions, per)]
        k = min(GRID_MAX, len(src))
        _save_png(image_grid(src[:k], captions=captions[:k], marks=[v.get("all_ok") for v in per[:k]]),
                  out / "grid_captioning.png")
        log.log(task="captioning", n=len(captions), seconds=round(time.perf_counter() - t0, 2))

    # --- VQA -----------------------------------------------------------------------------
    if "vqa" in metrics:
        rows = load_instruction_rows(data_, "vqa.jsonl", ("image",), num_prompts, size)
        if rows is None:
            skip("vqa", f"{data}: no vqa.jsonl")
        elif not rows:
            skip("vqa", f"{data}: vqa.jsonl has no usable rows in split {split!r}")
        else:
            t0 = time.perf_counter()
            refs = []
            for r in rows:
                a = r.get("answers", r.get("answer"))
                a = [a] if isinstance(a, str) else [x["answer"] if isinstance(x, dict) else x for x in (a or [])]
                refs.append([x for x in a if isinstance(x, str)])
            keep = [i for i, a in enumerate(refs) if a and isinstance(rows[i].get("question"), str)]
            rows, refs = [rows[i] for i in keep], [refs[i] for i in keep]
            answers = _batched(model.answer, [[r["image_pil"] for r in rows], [r["question"] for r in rows]],
                               batch_size, "vqa", seed)
            types = [r.get("type", r.get("question_type")) for r in rows]
            results["vqa"], per = score_vqa(answers, refs, types)
            samples += [{"task": "vqa", "source": r["image"], "question": r["question"], "answer": a,
                         "references": ref, "type": t, "accuracy": acc}
                        for r, a, ref, t, acc in zip(rows, answers, refs, types, per)]
            k = min(GRID_MAX, len(rows))
            _save_png(image_grid([r["image_pil"] for r in rows[:k]],
                                 captions=[f"{r['question']} -> {a}" for r, a in zip(rows[:k], answers)],
                                 marks=[acc > 0 for acc in per[:k]], caption_lines=3), out / "grid_vqa.png")
            log.log(task="vqa", n=len(rows), seconds=round(time.perf_counter() - t0, 2))

    # --- editing -------------------------------------------------------------------------
    if "edit" in metrics:
        rows = load_instruction_rows(data_, "edits.jsonl", ("image", "target_image"), num_prompts, size)
        if rows is None:
            skip("edit", f"{data}: no edits.jsonl")
        elif not data_.is_shapes:
            skip("edit", f"{data}: editing is judged by the shapes checker; not a shapes dataset")
        elif not rows:
            skip("edit", f"{data}: edits.jsonl has no usable rows in split {split!r}")
        else:
            t0 = time.perf_counter()
            rows = [r for r in rows if isinstance(r.get("instruction"), str)]
            edited = _batched(model.edit, [[r["image_pil"] for r in rows], [r["instruction"] for r in rows]],
                              batch_size, "editing", seed)
            targets = [edit_target_objects(r) for r in rows]
            results["edit"], per = score_edits(edited, targets, [r.get("type") for r in rows],
                                               sources=[r["image_pil"] for r in rows])
            for i, (r, im, v) in enumerate(zip(rows, edited, per)):
                path = f"images/edit/{i:05d}.png"
                _save_png(im, out / path)
                samples.append({"task": "edit", "source": r["image"], "instruction": r["instruction"], "image": path,
                                "target_image": r["target_image"], "type": r.get("type"), "verdict": v})
            k = min(GRID_MAX // 3, len(rows))
            trip = [x for r, im in zip(rows[:k], edited) for x in (r["image_pil"], im, r["target_image_pil"])]
            caps = [x for r in rows[:k] for x in ("source", r["instruction"], "target")]
            marks = [x for v in per[:k] for x in (None, None if v is None else v["done"], None)]
            _save_png(image_grid(trip, nrow=3, captions=caps, marks=marks), out / "grid_edit.png")
            log.log(task="edit", n=len(rows), seconds=round(time.perf_counter() - t0, 2))
    log.close()

    report = {
        "model": str(model_dir) if isinstance(model_dir, (str, os.PathLike)) else type(model_dir).__name__,
        "data": str(data), "split": split, "num_prompts": num_prompts, "num_images": len(data_.images),
        "decoding": decoding.to_dict() if isinstance(decoding, DecodingConfig) else decoding, "seed": seed, "fid_features": fid_features,
        "metrics": {m: results[m] for m in metrics if m in results},
        "seconds_per_image": seconds_per_image,  # text->image generation, `batch_size` prompts per call
        "notes": data_.notes, "seconds": round(time.perf_counter() - t_start, 2),
    }
    write_jsonl(out / "samples.jsonl", samples)
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
