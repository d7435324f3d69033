"""The demo's quality bar, judged on a run folder's own figures (`quality_bar_checks`), and
what those figures say bounds it (`quality_bar_limits`). The pipeline writes both into
RUN/metrics.json; the run report shows them in its summary."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from cm3leon.run.folder import RunFolder, eval_metrics, number, relative


@dataclass
class QualityBar:
    """The demo's quality bar: fractions in [0, 1] a run should reach on the shapes data."""

    text_to_image_cfg: float = 0.90  # single-object prompts with colour and shape right, TopP+CFG
    captions: float = 0.90  # captions naming the right colour and shape
    vqa: float = 0.90  # VQAv2 accuracy


def percent(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}%"


def single_object_cfg(run: RunFolder) -> tuple[float | None, int | None, str]:
    """Share of single-object prompts (where the figures say so) drawn with colour and shape
    right by TopP + CFG, from the final evaluation (its one producer: the generate stage's
    grid of a few fixed prompts is for looking at, not for the bar)."""
    d = run.final_eval_dir()
    if d is None:
        return None, None, "no evaluation with text->image figures (eval not run)"
    from cm3leon.utils.io import read_json

    report = read_json(d / "metrics.json")
    shapes = report.get("metrics", {}).get("shapes", {})
    where = relative(run, d / "metrics.json")
    if (report.get("decoding") or {}).get("method") != "cfg" or "both" not in shapes:
        return None, None, f"{where}: no text->image figures with CFG"
    one = (shapes.get("by_num_objects") or {}).get("1")
    if isinstance(one, dict) and number(one.get("both")) is not None:
        return float(one["both"]), one.get("n"), f"{where}: shapes, single-object prompts"
    return number(shapes["both"]), shapes.get("n"), f"{where}: shapes both"


def quality_bar_checks(run_dir: str | os.PathLike, bar: QualityBar | None = None) -> list[dict]:
    """The quality bar judged on a run folder: one row per criterion {"criterion", "figure",
    "bar", "n", "met" (True / False / None when not measured), "verdict", "source"}."""
    bar = bar or QualityBar()
    run = RunFolder(run_dir)
    rows = []

    def add(criterion: str, value: float | None, threshold: float, n: Any, source: str) -> None:
        met = None if value is None else bool(value >= threshold)
        rows.append({"criterion": criterion, "figure": percent(value), "bar": f"≥ {100 * threshold:.0f}%", "n": n,
                     "met": met, "verdict": {None: "not measured", True: "met", False: "NOT met"}[met],
                     "value": value, "source": source})

    v, n, src = single_object_cfg(run)
    add("single-object prompts right with CFG (colour and shape)", v, bar.text_to_image_cfg, n, src)
    d = run.final_eval_dir()
    m = eval_metrics(d)
    where = relative(run, d / "metrics.json") if d is not None else "eval not run"
    caps = (m.get("cider") or {}).get("shapes") or {}
    add("captions naming the right colour and shape", number(caps.get("correct")), bar.captions, caps.get("n"),
        f"{where}: cider.shapes.correct" if caps else f"{where}: no caption figures")
    vqa = m.get("vqa") or {}
    acc = number(vqa.get("vqa_accuracy"))
    add("VQA accuracy", None if acc is None else acc / 100.0, bar.vqa, vqa.get("n"),  # VQAv2 accuracy is in percent
        f"{where}: vqa.vqa_accuracy" if acc is not None else f"{where}: no VQA figures")
    return rows


def quality_bar_limits(run_dir: str | os.PathLike, bar: QualityBar | None = None) -> list[str]:
    """What the run's own figures say bounds its quality bar, one sentence per finding: the
    image tokenizer's ceiling on text->image, colour against shape in each task, the VQA
    question kinds below the bar, and the language model's training budget. Empty when
    nothing the bar needs was measured."""
    bar = bar or QualityBar()
    run = RunFolder(run_dir)
    found: list[str] = []
    vq = run.json("image_tokenizer", "metrics.json") or {}
    ceiling = number(vq.get("checker_recovered_colour_shape"))
    if ceiling is not None:
        tail = ("below the text-to-image bar, which no language model can then reach with this tokenizer"
                if ceiling < bar.text_to_image_cfg else "room enough for the text-to-image bar")
        found.append(f"Image tokenizer: the shapes checker finds colour and shape in {percent(ceiling)} of held-out "
                     f"objects after encode → decode alone ({vq.get('tokens_per_image', '?')} codes per image): {tail}.")
    m = eval_metrics(run.final_eval_dir())
    shapes = m.get("shapes") or {}
    one = (shapes.get("by_num_objects") or {}).get("1") or shapes
    caps = (m.get("cider") or {}).get("shapes") or {}
    vqa = (m.get("vqa") or {}).get("by_type") or {}
    pairs = []
    if number(one.get("colour")) is not None and number(one.get("shape")) is not None:
        pairs.append(("text to image (CFG)", one["colour"], one["shape"], bar.text_to_image_cfg))
    if number(caps.get("colour")) is not None and number(caps.get("shape")) is not None:
        pairs.append(("captions", caps["colour"], caps["shape"], bar.captions))
    vc, vs = ((vqa.get(k) or {}).get("vqa_accuracy") for k in ("color", "shape"))
    if number(vc) is not None and number(vs) is not None:
        pairs.append(("VQA", vc / 100.0, vs / 100.0, bar.vqa))
    pairs = [(name, c, s) for name, c, s, b in pairs if min(c, s) < b]  # only where an attribute falls short
    if pairs:
        weaker = {"shape" if s < c else "colour" for _, c, s in pairs}
        lead = (f"{weaker.pop().capitalize()} is the weaker attribute in every task: " if len(weaker) == 1
                else "Colour against shape: ")
        found.append(lead + "; ".join(f"{name} colour {percent(c)}, shape {percent(s)}" for name, c, s in pairs) + ".")
    low = sorted((v["vqa_accuracy"], k, v.get("n")) for k, v in vqa.items()
                 if isinstance(v, dict) and number(v.get("vqa_accuracy")) is not None
                 and v["vqa_accuracy"] / 100.0 < bar.vqa)
    if low:
        found.append("VQA question kinds below the VQA bar: "
                     + ", ".join(f"{k} {percent(a / 100.0)}" + (f" (n={n})" if n else "") for a, k, n in low) + ".")
    pre, sft = run.json("pretrain", "train_summary.json") or {}, run.json("sft", "train_summary.json") or {}
    if number(pre.get("tokens_seen")) is not None:
        params = number(pre.get("num_parameters"))
        found.append("Language model: " + (f"{params / 1e6:.1f}M parameters, " if params else "")
                     + f"{pre['tokens_seen'] / 1e6:.1f}M pretraining tokens ({pre.get('steps', '?')} steps)"
                     + (f" and {sft['tokens_seen'] / 1e6:.1f}M SFT tokens ({sft.get('steps', '?')} steps)"
                        if number(sft.get("tokens_seen")) is not None else "")
                     + "; the paper's smallest model saw 1.4T pretraining tokens.")
    return found
