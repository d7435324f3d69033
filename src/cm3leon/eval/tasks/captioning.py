"""Image -> text on the split's images: "cider" (CIDEr-D and BLEU-4 against every reference
caption; on shapes data also the rate of captions naming the right colours and shapes)."""

from __future__ import annotations

import time
from typing import Sequence

from cm3leon.decode.config import DecodingConfig
from cm3leon.errors import CM3LeonError
from cm3leon.eval.tasks import GRID_MAX, TaskContext, batched, save_png, with_options


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


def run(ctx: TaskContext) -> None:
    """Caption every image of the split and score the captions."""
    from cm3leon.eval.report import image_grid

    if "cider" in ctx.metrics:
        t0 = time.perf_counter()
        src = [c.image for c in ctx.data.images]
        fn = ctx.model.image_to_text
        if isinstance(ctx.decoding, DecodingConfig):  # the run's caption candidates and their ranking
            fn = with_options(fn, num_candidates=ctx.decoding.caption_candidates, scorer=ctx.decoding.scorer)
        captions = batched(fn, [src], ctx.batch_size, "captioning", ctx.seed)
        truths = [c.objects for c in ctx.data.images] if ctx.data.is_shapes else None
        summary, per = score_captions(captions, [c.references for c in ctx.data.images], truths)
        ctx.results["cider"] = summary
        ctx.samples += [{"task": "captioning", "source": c.key, "caption": cap, "references": c.references,
                         **({"verdict": v} if v else {})} for c, cap, v in zip(ctx.data.images, captions, per)]
        k = min(GRID_MAX, len(src))
        save_png(image_grid(src[:k], captions=captions[:k], marks=[v.get("all_ok") for v in per[:k]]),
                 ctx.out / "grid_captioning.png")
        ctx.log.log(task="captioning", n=len(captions), seconds=round(time.perf_counter() - t0, 2))

