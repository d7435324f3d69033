"""The quality bar of a run's preset (`PipelinePreset.quality_bar`, found by `quality_bar_for`),
judged on a run folder's own figures (`quality_bar_checks`), and what those figures say bounds it
(`quality_bar_limits`). The pipeline writes both into RUN/metrics.json; the run report shows
them in its summary."""

from __future__ import annotations

import os
from typing import Any

from cm3leon.run.config import PIPELINE_PRESETS, QualityBar
from cm3leon.run.folder import run_preset_name
from cm3leon.run.summaries import (
    CaptionFigures, EditFigures, Evaluation, ImageTokenizerSummary, RunFolder, TrainSummary, VQAFigures,
    final_evaluation, number, relative,
)


def quality_bar_for(run_dir: str | os.PathLike) -> QualityBar:
    """The bar of the pipeline preset a run folder was made with (the demo's for a name that is
    not a preset)."""
    preset = PIPELINE_PRESETS.get(run_preset_name(run_dir))
    return preset.quality_bar if preset is not None else QualityBar()


def percent(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}%"


def or_unknown(v: Any) -> Any:
    """A figure in a sentence: "?" where the file does not give it."""
    return "?" if v is None else v


def single_object(run: RunFolder) -> tuple[float | None, int | None, str]:
    """Share of single-object prompts (where the figures say so) drawn with colour and shape
    right by the run's decoding (TopP + CFG in the demo, best-of-N in the long preset; the
    source names it), from the final evaluation (its one producer: the generate stage's grid
    of a few fixed prompts is for looking at, not for the bar)."""
    ev = final_evaluation(run)
    if ev is None:
        return None, None, "no evaluation with text->image figures (eval not run)"
    where = relative(run, ev.path)
    if ev.text_to_image.both is None:
        return None, None, f"{where}: no text->image figures"
    method = ev.decoding_method or "?"
    one = ev.single_object
    if one is not None and one.both is not None:
        return float(one.both), one.n, f"{where}: shapes, single-object prompts, {method}"
    return number(ev.text_to_image.both), ev.text_to_image.n, f"{where}: shapes both, {method}"


def quality_bar_checks(run_dir: str | os.PathLike, bar: QualityBar | None = None) -> list[dict]:
    """The quality bar judged on a run folder: one row per criterion {"criterion", "figure",
    "bar", "n", "met" (True / False / None when not measured), "verdict", "source"}. The bar
    defaults to the run's preset's (`quality_bar_for`)."""
    bar = bar or quality_bar_for(run_dir)
    run = RunFolder(run_dir)
    rows = []

    def add(criterion: str, value: float | None, threshold: float, n: Any, source: str) -> None:
        met = None if value is None else bool(value >= threshold)
        rows.append({"criterion": criterion, "figure": percent(value), "bar": f"≥ {100 * threshold:.0f}%", "n": n,
                     "met": met, "verdict": {None: "not measured", True: "met", False: "NOT met"}[met],
                     "value": value, "source": source})

    v, n, src = single_object(run)
    add("single-object prompts right (colour and shape)", v, bar.text_to_image, n, src)
    ev = final_evaluation(run)
    where = relative(run, ev.path) if ev is not None else "eval not run"
    caps = ev.captions if ev is not None else CaptionFigures()
    add("captions naming the right colour and shape", number(caps.correct), bar.captions, caps.checked,
        f"{where}: cider.shapes.correct" if caps.correct is not None else f"{where}: no caption figures")
    if bar.scenes is not None:
        v, n = several_objects(ev)
        add("prompts of 2-3 objects right (every object's colour and shape, nothing more)", v, bar.scenes, n,
            f"{where}: shapes.scene, exact scenes of 2-3 objects" if v is not None else f"{where}: no scene figures")
    if bar.edits is not None:
        edit = ev.edit if ev is not None else EditFigures()
        done = number(edit.done_rate)
        add("edits done (checker)", done, bar.edits, edit.n,
            f"{where}: edit.done_rate" if done is not None else f"{where}: no edit figures")
    if bar.vqa is None:
        return rows
    vqa = ev.vqa if ev is not None else VQAFigures()
    acc = number(vqa.accuracy)
    add("VQA accuracy", None if acc is None else acc / 100.0, bar.vqa, vqa.n,  # VQAv2 accuracy is in percent
        f"{where}: vqa.vqa_accuracy" if acc is not None else f"{where}: no VQA figures")
    kinds = {t: number(k.accuracy) for t, k in vqa.by_type.items() if number(k.accuracy) is not None}
    if kinds and bar.vqa_kind is not None:  # only where the questions come with their kinds (the built-in data's do)
        weakest = min(kinds, key=kinds.__getitem__)
        add("VQA accuracy of every question kind", kinds[weakest] / 100.0, bar.vqa_kind,
            or_unknown(vqa.by_type[weakest].n), f"{where}: vqa.by_type, the weakest: {weakest}")
    return rows


def several_objects(ev: Evaluation | None) -> tuple[float | None, int | None]:
    """Share of the prompts of 2 or more objects drawn as an exact scene (every object's colour
    and shape, nothing more), and how many there were (None, None where not measured)."""
    groups = [g for k, g in (ev.exact_scenes if ev is not None else {}).items() if k >= 2]
    total = sum(n for _, n in groups)
    return (sum(share * n for share, n in groups) / total, total) if total else (None, None)


def quality_bar_limits(run_dir: str | os.PathLike, bar: QualityBar | None = None) -> list[str]:
    """What the run's own figures say bounds its quality bar, one sentence per finding: the
    image tokenizer's ceiling on text->image, colour against shape in each task, the VQA
    question kinds below the bar, and the language model's training budget. Empty when
    nothing the bar needs was measured."""
    bar = bar or quality_bar_for(run_dir)
    run = RunFolder(run_dir)
    found: list[str] = []
    vq = ImageTokenizerSummary.read(run)
    ceiling = number(vq.checker_recovered_colour_shape) if vq is not None else None
    if ceiling is not None:
        tail = ("below the text-to-image bar, which no language model can then reach with this tokenizer"
                if ceiling < bar.text_to_image else "room enough for the text-to-image bar")
        found.append(f"Image tokenizer: the shapes checker finds colour and shape in {percent(ceiling)} of held-out "
                     f"objects after encode → decode alone ({or_unknown(vq.tokens_per_image)} codes per image): "
                     f"{tail}.")
    ev = final_evaluation(run)
    if ev is not None:
        one = ev.single_object or ev.text_to_image
        caps, kinds = ev.captions, ev.vqa.by_type
        pairs = []
        if number(one.colour) is not None and number(one.shape) is not None:
            pairs.append(("text to image", one.colour, one.shape, bar.text_to_image))
        if number(caps.colour) is not None and number(caps.shape) is not None:
            pairs.append(("captions", caps.colour, caps.shape, bar.captions))
        vc, vs = ((kinds[k].accuracy if k in kinds else None) for k in ("color", "shape"))  # VQA question kinds
        if number(vc) is not None and number(vs) is not None and bar.vqa is not None:
            pairs.append(("VQA", vc / 100.0, vs / 100.0, bar.vqa))
        pairs = [(name, c, s) for name, c, s, b in pairs if min(c, s) < b]  # only where an attribute falls short
        if pairs:
            weaker = {"shape" if s < c else "colour" for _, c, s in pairs}
            lead = (f"{weaker.pop().capitalize()} is the weaker attribute in every task: " if len(weaker) == 1
                    else "Colour against shape: ")
            found.append(lead + "; ".join(f"{name} colour {percent(c)}, shape {percent(s)}" for name, c, s in pairs)
                         + ".")
        low = sorted((v.accuracy, k, v.n) for k, v in kinds.items()
                     if bar.vqa is not None and number(v.accuracy) is not None and v.accuracy / 100.0 < bar.vqa)
        if low:
            found.append("VQA question kinds below the VQA bar: "
                         + ", ".join(f"{k} {percent(a / 100.0)}" + (f" (n={n})" if n else "") for a, k, n in low) + ".")
    pre, sft = TrainSummary.read(run, "pretrain"), TrainSummary.read(run, "sft")
    if pre is not None and number(pre.tokens_seen) is not None:
        params = number(pre.num_parameters)
        tuned = (f" and {sft.tokens_seen / 1e6:.1f}M SFT tokens ({or_unknown(sft.steps)} steps)"
                 if sft is not None and number(sft.tokens_seen) is not None else "")
        found.append("Language model: " + (f"{params / 1e6:.1f}M parameters, " if params else "")
                     + f"{pre.tokens_seen / 1e6:.1f}M pretraining tokens ({or_unknown(pre.steps)} steps){tuned}"
                     + "; the paper's smallest model saw 1.4T pretraining tokens.")
    return found
