"""Instruction editing on a folder's `edits.jsonl` of the split ("edit"): the rate at which
the checker finds the edited image equal to the target scene (shapes data), against what
returning the input unedited scores."""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any, Sequence

from cm3leon.decode.config import DecodingConfig
from cm3leon.errors import CM3LeonError
from cm3leon.eval.tasks import GRID_MAX, TaskContext, batched, save_png, with_options


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


def run(ctx: TaskContext) -> None:
    """Edit every image of the split as instructed and judge the result."""
    from cm3leon.eval.data import load_instruction_rows
    from cm3leon.eval.report import image_grid

    if "edit" in ctx.metrics:
        rows = load_instruction_rows(ctx.data, "edits.jsonl", ("image", "target_image"), ctx.num, ctx.size)
        if rows is None:
            ctx.skip("edit", f"{ctx.source}: no edits.jsonl")
        elif not ctx.data.is_shapes:
            ctx.skip("edit", f"{ctx.source}: editing is judged by the shapes checker; not a shapes dataset")
        elif not rows:
            ctx.skip("edit", f"{ctx.source}: edits.jsonl has no usable rows in split {ctx.data.split!r}")
        else:
            t0 = time.perf_counter()
            rows = [r for r in rows if isinstance(r.get("instruction"), str)]
            fn = ctx.model.edit
            if isinstance(ctx.decoding, DecodingConfig):  # the run's editing scales, sampling and
                d = ctx.decoding  # candidates, those of them the model's edit() takes
                fn = with_options(fn, image_guidance=d.image_guidance, text_guidance=d.text_guidance,
                                  temperature=d.temperature, top_p=d.top_p, top_k=d.top_k,
                                  num_candidates=d.edit_candidates)
            edited = batched(fn, [[r["image_pil"] for r in rows], [r["instruction"] for r in rows]],
                             ctx.batch_size, "editing", ctx.seed)
            targets = [edit_target_objects(r) for r in rows]
            ctx.results["edit"], per = score_edits(edited, targets, [r.get("type") for r in rows],
                                                   sources=[r["image_pil"] for r in rows])
            for i, (r, im, v) in enumerate(zip(rows, edited, per)):
                path = f"images/edit/{i:05d}.png"
                save_png(im, ctx.out / path)
                ctx.samples.append({"task": "edit", "source": r["image"], "instruction": r["instruction"],
                                    "image": path, "target_image": r["target_image"], "type": r.get("type"),
                                    "verdict": v})
            k = min(GRID_MAX // 3, len(rows))
            trip = [x for r, im in zip(rows[:k], edited) for x in (r["image_pil"], im, r["target_image_pil"])]
            caps = [x for r in rows[:k] for x in ("source", r["instruction"], "target")]
            marks = [x for v in per[:k] for x in (None, None if v is None else v["done"], None)]
            save_png(image_grid(trip, nrow=3, captions=caps, marks=marks), ctx.out / "grid_edit.png")
            ctx.log.log(task="edit", n=len(rows), seconds=round(time.perf_counter() - t0, 2))
