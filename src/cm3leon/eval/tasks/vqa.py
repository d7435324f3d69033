"""Visual question answering on a folder's `vqa.jsonl` questions of the split: VQAv2
accuracy, also by question type ("vqa")."""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Sequence

from cm3leon.decode.config import DecodingConfig
from cm3leon.eval.tasks import GRID_MAX, TaskContext, batched, save_png, with_options


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


def run(ctx: TaskContext) -> None:
    """Answer every question of the split and score the answers."""
    from cm3leon.eval.data import load_instruction_rows
    from cm3leon.eval.report import image_grid

    if "vqa" in ctx.metrics:
        rows = load_instruction_rows(ctx.data, "vqa.jsonl", ("image",), ctx.num, ctx.size)
        if rows is None:
            ctx.skip("vqa", f"{ctx.source}: no vqa.jsonl")
        elif not rows:
            ctx.skip("vqa", f"{ctx.source}: vqa.jsonl has no usable rows in split {ctx.data.split!r}")
        else:
            t0 = time.perf_counter()
            refs = []
            for r in rows:
                a = r.get("answers", r.get("answer"))
                a = [a] if isinstance(a, str) else [x["answer"] if isinstance(x, dict) else x for x in (a or [])]
                refs.append([x for x in a if isinstance(x, str)])
            keep = [i for i, a in enumerate(refs) if a and isinstance(rows[i].get("question"), str)]
            rows, refs = [rows[i] for i in keep], [refs[i] for i in keep]
            fn = ctx.model.answer
            if isinstance(ctx.decoding, DecodingConfig):  # the run's answer candidates
                fn = with_options(fn, num_candidates=ctx.decoding.answer_candidates)
            answers = batched(fn, [[r["image_pil"] for r in rows], [r["question"] for r in rows]],
                              ctx.batch_size, "vqa", ctx.seed)
            types = [r.get("type", r.get("question_type")) for r in rows]
            ctx.results["vqa"], per = score_vqa(answers, refs, types)
            ctx.samples += [{"task": "vqa", "source": r["image"], "question": r["question"], "answer": a,
                             "references": ref, "type": t, "accuracy": acc}
                            for r, a, ref, t, acc in zip(rows, answers, refs, types, per)]
            k = min(GRID_MAX, len(rows))
            save_png(image_grid([r["image_pil"] for r in rows[:k]],
                                captions=[f"{r['question']} -> {a}" for r, a in zip(rows[:k], answers)],
                                marks=[acc > 0 for acc in per[:k]], caption_lines=3), ctx.out / "grid_vqa.png")
            ctx.log.log(task="vqa", n=len(rows), seconds=round(time.perf_counter() - t0, 2))

