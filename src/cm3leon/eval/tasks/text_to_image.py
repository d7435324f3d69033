"""Text -> image on the split's captions: "shapes" (the checker's prompt accuracy: colour,
shape, both, size, position; object precision / recall and exact scene by number of objects
where the prompt describes the whole scene), "clip" (CLIP score of each image with its prompt:
the retriever's cosine similarity), "fid" (Fréchet distance between generated and real
images of the split: "FD-CLIP" / "FD-retriever" in the retriever's feature space by default,
"FID" only with local InceptionV3 weights)."""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any, Sequence

from cm3leon.errors import CM3LeonError
from cm3leon.eval.fid import FDScorer, fd_extractor, retriever_name
from cm3leon.eval.tasks import GRID_MAX, TaskContext, save_png

METRICS = ("shapes", "clip", "fid")


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


def run(ctx: TaskContext) -> None:
    """Generate an image for every caption of the split and score the requested metrics."""
    from cm3leon.eval.report import image_grid

    t2i = [m for m in METRICS if m in ctx.metrics]
    if "shapes" in t2i and not ctx.data.is_shapes:
        ctx.skip("shapes", f"{ctx.source}: no shapes annotations (annotations.jsonl): not a shapes dataset")
        t2i.remove("shapes")
    if "clip" in t2i and ctx.retriever is None:
        ctx.skip("clip", "no retriever to score with: the model directory has no retriever/ and no clip_retriever given")
        t2i.remove("clip")
    extractor = None
    if "fid" in t2i:
        extractor, why = fd_extractor(ctx.fid_features, ctx.retriever)
        if extractor is None:
            ctx.skip("fid", why)
            t2i.remove("fid")
        elif len(ctx.data.images) < 2:
            ctx.skip("fid", f"Fréchet distance needs at least 2 images; split {ctx.data.split!r} gave "
                            f"{len(ctx.data.images)}")
            t2i.remove("fid")
    if t2i:
        t0 = time.perf_counter()
        prompts = [c.prompt for c in ctx.data.images]
        generated = generate_images(ctx.model, prompts, ctx.decoding, ctx.seed, ctx.batch_size)
        ctx.seconds_per_image = (time.perf_counter() - t0) / len(generated)  # generation alone
        rows = [{"task": "text_to_image", "prompt": p, "source": c.key, "image": f"images/t2i/{i:05d}.png"}
                for i, (p, c) in enumerate(zip(prompts, ctx.data.images))]
        for r, im in zip(rows, generated):
            save_png(im, ctx.out / r["image"])
        marks = None
        if "shapes" in t2i:
            summary, per = score_shapes_images(generated, prompts, [c.objects for c in ctx.data.images])
            ctx.results["shapes"] = summary
            for r, v in zip(rows, per):
                r["verdict"] = v
            marks = [None if v is None else v["all_ok"] for v in per]
        if "clip" in t2i:
            cs = clip_scores(ctx.retriever, generated, prompts)
            real = clip_scores(ctx.retriever, [c.image for c in ctx.data.images], prompts)
            ctx.results["clip"] = {"name": f"CLIP score ({retriever_name(ctx.retriever)})",
                                   "value": sum(cs) / len(cs), "real_images": sum(real) / len(real), "n": len(cs)}
            for r, v in zip(rows, cs):
                r["clip_score"] = v
        if "fid" in t2i:
            ctx.results["fid"] = FDScorer(extractor, [c.image for c in ctx.data.images])(generated)
        ctx.samples += rows
        k = min(GRID_MAX, len(generated))
        save_png(image_grid(generated[:k], captions=prompts[:k], marks=marks[:k] if marks else None),
                 ctx.out / "grid_text_to_image.png")
        ctx.log.log(task="text_to_image", n=len(generated), seconds=round(time.perf_counter() - t0, 2))

