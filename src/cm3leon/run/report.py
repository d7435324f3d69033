"""`cm3leon report`: one self-contained `report.html` for a pipeline run folder.

    cm3leon report --run runs/demo            # writes runs/demo/report.html

It reads what the stages wrote (see `cm3leon.run.pipeline`): their summaries (through the typed
readers of `cm3leon.run.summaries`), sample grids, training logs, code shards and neighbours, and
lays them out as ten sections: summary with the quality bar, text->image samples per decoding
method, captions and VQA, edits, the image tokenizer, retrieval, training curves, the decoding
sweep, ablations and stage timings. A stage folder that is missing (the run stopped early) gives
a plain "not run" note in its section. Every picture is embedded
(`cm3leon.eval.report.build_report`): the file opens offline on its own.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from cm3leon.errors import CM3LeonError
from cm3leon.eval.report import Grid, Image, Section, Table, Text, build_report
from cm3leon.run.pipeline import STAGES
from cm3leon.run.quality_bar import (
    QualityBar, or_unknown, percent, quality_bar_checks, quality_bar_for, quality_bar_limits,
)
from cm3leon.run.summaries import (
    DONE, AblationResults, BaselinesSummary, DatasetSummary, Evaluation, GenerateSummary, ImageTokenizerSummary,
    NeighborsSummary, PipelineSummary, RetrieverSummary, RunFolder, RunMetrics, SFTSummary, StageDone, StageRecord,
    SweepSummary, TextTokenizerSummary, TrainSummary, final_evaluation, number, pretrained_evaluation, relative,
)

# Decoding methods of the generate stage, in the order the paper introduces them (Sec. 3).
METHOD_NAMES = {"topp": "TopP", "cfg": "TopP + CFG", "cdk": "CD-K", "best_of_n": "best-of-N (re-ranked)"}
GRID_IMAGES = 16  # images per decoding method shown
RETRIEVAL_EXAMPLES = 4  # query records shown with their retrieved documents
SAMPLE_ROWS = 8  # caption / VQA sample rows shown as text


# ---------------------------------------------------------------------------------------------
# Sections


def _secs(v: Any) -> str:
    v = number(v)
    if v is None:
        return "—"
    return f"{v:.1f} s" if v < 120 else f"{v / 60:.1f} min"


def _scalars(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool)) or v is None}


def _given(**columns: Any) -> dict:
    """A table row of the columns that have a value."""
    return {k: v for k, v in columns.items() if v is not None}


def missing_note(run: RunFolder, stage: str, what: str = "") -> Text | None:
    """A plain note when the stage did not run or did not finish; None when it finished."""
    d = run.path(stage)
    what = f" ({what})" if what else ""
    if not d.is_dir():
        return Text(f"Not run: {d} does not exist: the run stopped before the {stage} stage{what}.")
    if stage in {s.name for s in STAGES} and StageDone.read(run, stage) is None:
        return Text(f"The {stage} stage did not finish ({d} has no .done marker): what it left is shown "
                    "where readable.")
    return None


def _summary(run: RunFolder, bar: QualityBar) -> list:
    from cm3leon.eval.evaluate import headline_rows

    blocks: list = []
    pipe = PipelineSummary.read(run)
    lines = [f"Run folder: {run.root.resolve()}."]
    if pipe is not None:
        total = sum(r["seconds"] or 0 for r in _stage_rows(run))
        last = number(pipe.seconds)
        lines.append(f"Preset {pipe.label}; stage times add up to {_secs(total)}"
                     + (f" (the last `cm3leon pipeline` pass took {_secs(last)})"
                        if last is not None and abs(last - total) > max(5.0, 0.05 * total) else "") + ".")
    else:
        lines.append("No pipeline.json: the pipeline has not finished a pass over this folder yet; "
                     "stage times below come from the stages' .done markers.")
    ds = DatasetSummary.read(run.path("data"))
    if ds is None and pipe is not None and pipe.data:
        ds = DatasetSummary.read(Path(pipe.data))
    data_path = pipe.data if pipe is not None else None
    if not data_path and run.path("data").is_dir():
        data_path = str(run.path("data"))
    if ds is not None:
        splits = ds.splits or {}
        lines.append(f"Data: {data_path}: {ds.name or 'dataset'}, {or_unknown(ds.num)} images of "
                     f"{or_unknown(ds.size)} px, up to {or_unknown(ds.max_objects)} object(s) per scene"
                     + (f" (train {splits.get('train')}, val {splits.get('val')}, test {splits.get('test')})"
                        if splits else "") + ".")
    elif data_path:
        lines.append(f"Data: {data_path}.")
    tt = TextTokenizerSummary.read(run)
    if tt is not None and tt.vocab_size:
        lines.append(f"Text tokenizer: BPE vocabulary {tt.vocab_size}, "
                     f"{or_unknown(tt.tokens_per_caption)} tokens per caption.")
    times = _stage_rows(run)
    ran = [r for r in times if r["status"] == "done"]
    lines.append("Stages finished: " + (", ".join(f"{r['stage']} {r['time']}" if r["seconds"] is not None
                                                  else r["stage"] for r in ran) or "none") + ".")
    # the report stage is the one writing this file: it is not "unfinished"
    stopped = next((r["stage"] for r in times if r["status"] != "done" and r["stage"] not in ("data", "report")),
                   None)
    if stopped:
        lines.append(f"First stage not finished: {stopped}.")
    blocks.append(Text("\n\n".join(lines)))

    checks = quality_bar_checks(run.root, bar)
    failed = [c for c in checks if c["met"] is False]
    unmeasured = [c for c in checks if c["met"] is None]
    if failed:
        verdict = "Quality bar NOT met: " + "; ".join(f"{c['criterion']}: {c['figure']} (bar {c['bar']})"
                                                       for c in failed) + "."
    elif len(unmeasured) == len(checks):
        verdict = "Quality bar not measured: no stage that produces its figures (generate, eval) has run."
    elif unmeasured:
        verdict = "Quality bar not fully measured: " + ", ".join(c["criterion"] for c in unmeasured) + \
                  " has no figure in this run; every measured criterion is met."
    else:
        verdict = "Quality bar met on every criterion."
    blocks.append(Text(verdict))
    blocks.append(Table(checks, ["criterion", "figure", "bar", "verdict", "n", "source"], caption="Quality bar"))
    limits = quality_bar_limits(run.root, bar) if failed else []
    if limits:
        blocks.append(Text("What bounds these figures, measured in this run:\n\n" + "\n\n".join(limits)))

    after, before_sft = final_evaluation(run), pretrained_evaluation(run)
    recorded = RunMetrics.read(run)
    if after is not None:
        try:
            rows = headline_rows(after.metrics)
            before = {r["metric"]: r["value"] for r in headline_rows(before_sft.metrics if before_sft else {})}
        except (KeyError, TypeError) as e:  # a metrics file of another version: keep the quality bar above
            blocks.append(Text(f"Headline metrics unreadable in {relative(run, after.path)}: "
                               f"{type(e).__name__}: {e}"))
            return blocks
        cols = ["metric", "value", "n", "note"]
        if before and after.dir != before_sft.dir:
            for r in rows:
                r["before SFT"] = before.get(r["metric"])
            cols = ["metric", "before SFT", "value", "n", "note"]
        blocks.append(Table(rows, cols, caption=f"Headline metrics ({relative(run, after.path)})"))
    elif recorded is not None and recorded.preset is not None:  # the eval folder is gone, RUN/metrics.json stays
        blocks.append(Table([{"metric": "preset", "value": recorded.preset}],
                            caption="Headline metrics (metrics.json)"))
    else:
        blocks.append(Text("No headline metrics: the eval stage has not run."))
    if recorded is not None and recorded.quality_bar:
        rows = [{"item": str(i), **_scalars(c)} for i, c in enumerate(recorded.quality_bar)]
        blocks.append(Table(rows, caption="Quality bar as recorded by the eval stage (metrics.json)"))
    return blocks


def _checker_ok(ch: Any) -> bool | None:
    """Whether the checker found the prompt's colour and shape (the figure accuracy_both counts)."""
    if not isinstance(ch, dict):
        return None
    if "both_ok" in ch:
        return bool(ch["both_ok"])
    if "colour_ok" in ch and "shape_ok" in ch:
        return bool(ch["colour_ok"]) and bool(ch["shape_ok"])
    if "all_ok" in ch:
        return bool(ch["all_ok"])
    return None


def _text_to_image(run: RunFolder, bar: QualityBar) -> list:
    note = missing_note(run, "generate", "samples with every decoding method")
    if note is not None and not run.path("generate").is_dir():
        return [note]
    blocks: list = [note] if note else []
    gen = run.path("generate")
    summary = GenerateSummary.read(run)
    methods = summary.methods if summary is not None else {}
    if methods:
        rows = [{"method": METHOD_NAMES.get(m, m), **_given(n=v.n, accuracy_both=v.accuracy_both)}
                for m, v in methods.items()]
        blocks.append(Table(rows, caption="Prompt accuracy per decoding method (generate/summary.json; "
                                          "accuracy_both: colour and shape right, by the shapes checker)"))
    dirs = [p for p in gen.iterdir() if p.is_dir() and (p / "samples.jsonl").is_file()]
    order = list(METHOD_NAMES)
    dirs.sort(key=lambda p: (order.index(p.name) if p.name in order else len(order), p.name))
    if not dirs:
        blocks.append(Text(f"No samples: {gen} has no <method>/samples.jsonl."))
    for d in dirs:
        rows = run.jsonl("generate", d.name, "samples.jsonl") or []
        images, caps, marks, missing = [], [], [], 0
        for r in rows:
            if len(images) >= GRID_IMAGES:
                break
            f = r.get("file")
            path = next((p for p in (d / str(f), gen / str(f), run.root / str(f)) if p.is_file()), None) if f else None
            if path is None:
                missing += 1
                continue
            images.append(path)
            caps.append(str(r.get("prompt", "")))
            marks.append(_checker_ok(r.get("checker")))
        name = METHOD_NAMES.get(d.name, d.name)
        stats = methods.get(d.name)
        acc, n = (number(stats.accuracy_both), stats.n) if stats is not None else (None, None)
        if acc is None:  # no summary: count the per-sample verdicts
            judged = [_checker_ok(r.get("checker")) for r in rows]
            judged = [j for j in judged if j is not None]
            acc, n = (sum(judged) / len(judged), len(judged)) if judged else (None, None)
        line = f"{name}: " + (f"{percent(acc)} of {n} prompts drawn with the right colour and shape"
                              if acc is not None else "no checker verdicts")
        line += f"; showing {len(images)} of {len(rows)} samples (green frame: the checker found the prompt's " \
                "colour and shape; red: it did not)."
        if missing:
            line += f" {missing} sample file(s) listed in samples.jsonl were not found."
        blocks.append(Text(line))
        if images:
            blocks.append(Grid(images, captions=caps, marks=marks if any(m is not None for m in marks) else None,
                               caption=f"{name} ({d.name}/)", ncol=8, cell_px=96))
    return blocks


def _before_after_rows(after: Evaluation, before: Evaluation | None,
                       picks: list[tuple[str, Callable[[Evaluation], Any]]]) -> list[dict]:
    """One row per (name, figure of an evaluation): after SFT and, where the pretrained model was
    evaluated too, before it."""
    compare = before is not None and bool(before.metrics) and after.dir != before.dir
    rows = []
    for name, get in picks:
        row = {"metric": name, "after SFT": number(get(after))}
        if compare:
            row = {"metric": name, "before SFT": number(get(before)), "after SFT": row["after SFT"]}
        if any(v is not None for k, v in row.items() if k != "metric"):
            rows.append(row)
    return rows


def _eval_images(run: RunFolder, after: Evaluation, before: Evaluation | None, name: str, caption: str) -> list:
    """The sample grid `name` of the final evaluation and, when it exists, of the pretrained model."""
    if before is not None and after.dir != before.dir:
        dirs = [(before.dir, "before SFT (pretrained model)"), (after.dir, "after SFT")]
    else:
        dirs = [(after.dir, "final model")]
    return [Image(d / name, caption=f"{caption}, {label} ({relative(run, d / name)})")
            for d, label in dirs if (d / name).is_file()]


def _no_eval(run: RunFolder) -> list:
    """The section's only block when the run has no evaluation to show."""
    note = missing_note(run, "eval", "metrics")
    return [note or Text(f"Not run: {run.path('eval')} holds no {Evaluation.NAME} (sft/ or pretrain/).")]


def _captions_vqa(run: RunFolder, bar: QualityBar) -> list:
    after, before = final_evaluation(run), pretrained_evaluation(run)
    if after is None:
        return _no_eval(run)
    blocks: list = []
    rows = _before_after_rows(after, before, [
        ("captions naming the right objects", lambda e: e.captions.correct),
        ("CIDEr-D", lambda e: e.captions.cider_d),
        ("BLEU-4", lambda e: e.captions.bleu_4),
        ("VQA accuracy (%)", lambda e: e.vqa.accuracy),
    ])
    if rows:
        blocks.append(Table(rows, caption="Image -> text, before and after instruction tuning"))
    for key, skipped in (("cider", after.captions.skipped), ("vqa", after.vqa.skipped)):
        if skipped is not None:
            blocks.append(Text(f"{key} skipped: {skipped}"))
    blocks += _eval_images(run, after, before, "grid_captioning.png", "Captions written by the model (green: right "
                                                                      "colours and shapes)")
    blocks += _eval_images(run, after, before, "grid_vqa.png", "VQA: question -> the model's answer (green: accepted)")
    samples = run.jsonl(relative(run, after.dir), "samples.jsonl") or []
    caps = [{"caption": s.get("caption"), "reference": (s.get("references") or [None])[0],
             "right": (s.get("verdict") or {}).get("all_ok")} for s in samples if s.get("task") == "captioning"]
    if caps:
        blocks.append(Table(caps[:SAMPLE_ROWS], caption="Captions against a reference"))
    vqa = [{"question": s.get("question"), "answer": s.get("answer"), "references": ", ".join(
        sorted(set(map(str, s.get("references") or [])))), "accuracy": s.get("accuracy")}
           for s in samples if s.get("task") == "vqa"]
    if vqa:
        blocks.append(Table(vqa[:SAMPLE_ROWS], caption="VQA answers"))
    if len(blocks) == 0:
        blocks.append(Text("The evaluation wrote no caption or VQA results."))
    return blocks


def _edits(run: RunFolder, bar: QualityBar) -> list:
    after, before = final_evaluation(run), pretrained_evaluation(run)
    if after is None:
        return _no_eval(run)
    blocks: list = []
    rows = _before_after_rows(after, before, [
        ("edit done rate", lambda e: e.edit.done_rate),
        ("do-nothing baseline", lambda e: e.edit.do_nothing_baseline),
    ])
    if rows:
        blocks.append(Table(rows, caption="Edits the checker finds done (target scene reached)"))
    if after.edit.skipped is not None:
        blocks.append(Text(f"Editing skipped: {after.edit.skipped}"))
    blocks += _eval_images(run, after, before, "grid_edit.png", "Each row: source image, instruction -> edited "
                                                                "image, target (green / red: the checker finds the "
                                                                "edit done / not done)")
    return blocks or [Text("The evaluation wrote no editing results.")]


def _image_tokenizer(run: RunFolder, bar: QualityBar) -> list:
    note = missing_note(run, "image_tokenizer", "VQ image tokenizer")
    if note is not None and not run.path("image_tokenizer").is_dir():
        return [note]
    blocks: list = [note] if note else []
    m = ImageTokenizerSummary.read(run)
    if m is not None:
        figures = [(m.psnr_db, "PSNR (dB)"), (m.val_l1, "L1 (pixels in [0, 1])"), (m.codebook_usage, "codebook usage"),
                   (m.codes_used, "codes used"), (m.codebook_size, "codebook size"), (m.perplexity, "code perplexity"),
                   (m.tokens_per_image, "tokens per image"),
                   (m.checker_recovered, "objects recovered exactly (shapes checker)"),
                   (m.checker_recovered_colour_shape, "objects recovered by colour and shape"),
                   (m.checker_recovered_colour_cell, "objects recovered by colour and cell"),
                   (m.num_eval_images, "evaluation images"), (m.eval_split, "evaluation split"), (m.steps, "steps"),
                   (m.train_time_s, "training time (s)"), (m.parameters, "parameters")]
        rows = [{"metric": label, "value": v} for v, label in figures if v is not None]
        blocks.append(Table(rows, caption="VQ tokenizer on held-out images (image_tokenizer/metrics.json)"))
    else:
        blocks.append(Text("No image_tokenizer/metrics.json."))
    rec = run.path("image_tokenizer", "reconstructions.png")
    if rec.is_file():
        blocks.append(Image(rec, caption="Held-out images (top row) over their VQ reconstructions (bottom row)"))
    return blocks


def _recall_rows(m: RetrieverSummary) -> list[dict]:
    rows = []
    for direction, recall in (("text -> image", m.text_to_image_recall), ("image -> text", m.image_to_text_recall)):
        if recall:
            rows.append({"direction": direction, **{f"recall@{k}": v for k, v in recall.items()}})
    return rows


def _retrieval_examples(run: RunFolder, num: int = RETRIEVAL_EXAMPLES) -> list:
    """Query records with their retrieved documents, images decoded from their VQ codes."""
    import numpy as np
    import torch

    from cm3leon.data.codes import SPLITS, CodeDataset
    from cm3leon.tokenizers.image import VQModel, tensor_to_images

    nb_path = next((p for p in (run.path("tokenize", "neighbors.npy"), run.path("retrieval", "neighbors.npy"))
                    if p.is_file()), None)
    if nb_path is None:
        return [Text("No retrieval examples: tokenize/neighbors.npy does not exist.")]
    codes_dir = nb_path.parent if (nb_path.parent / "meta.json").is_file() else run.path("tokenize")
    ds = CodeDataset(codes_dir)
    # the run's own tokenizer; else the one the codes record (a run folder assembled by hand)
    candidates = [run.path("image_tokenizer")] + ([Path(ds.meta["image_tokenizer"])]
                                                  if isinstance(ds.meta.get("image_tokenizer"), str) else [])
    vq_dir = next((d for d in candidates if (d / "config.json").is_file()), None)
    if vq_dir is None:
        return [Text("No retrieval examples: no image tokenizer in image_tokenizer/ to draw the codes with.")]
    neighbors = np.load(nb_path)
    if neighbors.ndim != 2 or neighbors.shape[0] != int(ds.meta["num_records"]):
        raise CM3LeonError(f"{nb_path}: shape {neighbors.shape}, expected [{ds.meta['num_records']}, k]")
    k = neighbors.shape[1]
    has_nb = (neighbors >= 0).any(axis=1)
    queries: list[int] = []
    for split in ("test", "val", *(s for s in SPLITS if s not in ("test", "val"))):
        idx = CodeDataset(codes_dir, split=split).indices
        idx = idx[has_nb[idx]]
        if len(idx):  # evenly spread over the split, deterministic
            queries = [int(idx[int(i * len(idx) / min(num, len(idx)))]) for i in range(min(num, len(idx)))]
            break
    if not queries:
        return [Text(f"No retrieval examples: no record in {nb_path} has a retrieved document.")]
    vq = VQModel.from_pretrained(vq_dir)
    cells: list[tuple[int, str]] = []
    for q in queries:
        cells.append((q, "query: " + ds.get(q).text))
        for j, d in enumerate(neighbors[q]):
            d = int(d)
            cells.append((d, f"retrieved {j + 1}: " + ds.get(d).text if d >= 0 else f"retrieved {j + 1}: (none)"))
    real = [gi for gi, _ in cells if gi >= 0]
    codes = torch.as_tensor(np.stack([ds.get(gi).image_codes for gi in real]))
    decoded = iter(tensor_to_images(vq.decode(codes)))
    from PIL import Image as PILImage

    side = vq.config.resolution
    blank = PILImage.new("RGB", (side, side), (240, 240, 240))
    images = [next(decoded) if gi >= 0 else blank for gi, _ in cells]
    return [Grid(images, captions=[c for _, c in cells], ncol=1 + k, cell_px=96,
                 caption=f"Each row: a {ds.get(queries[0]).split} record (query, left) and the {k} documents "
                         f"retrieved for it from the memory bank ({relative(run, nb_path)}); images decoded from "
                         "their VQ codes.")]


def _retrieval(run: RunFolder, bar: QualityBar) -> list:
    note = missing_note(run, "retrieval", "bi-encoder, memory bank, neighbours")
    if note is not None and not run.path("retrieval").is_dir():
        return [note]
    blocks: list = [note] if note else []
    m = RetrieverSummary.read(run)
    if m is not None:
        rows = _recall_rows(m)
        if rows:
            blocks.append(Table(rows, caption=f"Retriever recall on {or_unknown(m.num_pairs)} held-out "
                                              f"{m.eval_split or ''} pairs (retrieval/retriever/metrics.json)"))
        extra = _given(first_loss=m.first_loss, final_loss=m.final_loss, temperature=m.temperature, steps=m.steps,
                       train_seconds=m.train_seconds)
        if extra:
            blocks.append(Table([extra], caption="Retriever training"))
    else:
        blocks.append(Text("No retriever metrics (retrieval/retriever/metrics.json)."))
    nb = NeighborsSummary.read(run)
    if nb is not None:
        blocks.append(Text(f"Neighbours: {or_unknown(nb.rows_with_k)} of {or_unknown(nb.num_records)} records have "
                           f"all {or_unknown(nb.k)} retrieved documents; skipped candidates: "
                           + ", ".join(f"{k} {v}" for k, v in nb.skipped.items()) + "."))
    try:
        blocks += _retrieval_examples(run)
    except (CM3LeonError, OSError, ValueError, KeyError) as e:
        blocks.append(Text(f"No retrieval examples: {e}"))
    return blocks


def _plot_png(fn: Callable[[Path], Any]) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "plot.png"
        fn(p)
        return p.read_bytes()


def _training(run: RunFolder, bar: QualityBar) -> list:
    from cm3leon.eval.report import plot_curves
    from cm3leon.utils.logging import read_metrics

    blocks: list = []
    logs: dict[str, list[dict]] = {}
    for stage in ("pretrain", "sft"):
        note = missing_note(run, stage)
        if note is not None:
            blocks.append(note)
        p = run.find(stage, "metrics.jsonl")
        rows = read_metrics(p) if p is not None else []
        if not rows:
            if run.path(stage).is_dir():
                blocks.append(Text(f"{stage}: no training log (metrics.jsonl)."))
            continue
        logs[stage] = rows
        if any("loss" in r or "val_loss" in r for r in rows):
            png = _plot_png(lambda out, rows=rows, stage=stage: plot_curves(
                rows, ["loss", "val_loss"], out, title=f"{stage}: loss per token (train and validation)"))
            blocks.append(Image(png, caption=f"{stage}: training and validation loss vs step "
                                             f"({relative(run, p)})", width=520))
    tp = {s: r for s, r in logs.items() if any("tokens_per_s" in x for x in r)}
    if tp:
        blocks.append(Image(_plot_png(lambda out: plot_curves(tp, ["tokens_per_s"], out,
                                                              title="training throughput (tokens / s)")),
                            caption="Throughput vs step", width=520))
    rows = []
    for stage in ("pretrain", "sft"):
        s = TrainSummary.read(run, stage)
        if s is not None:
            rows.append({"stage": stage, "steps": s.steps, "tokens_seen": s.tokens_seen,
                         "tokens_per_second": s.tokens_per_second, "train_seconds": s.train_seconds,
                         "num_parameters": s.num_parameters, "final_train_loss": s.final_train_loss,
                         "final_val_loss": s.final_val_loss, "device": s.device})
    sft = SFTSummary.read(run)
    if sft is not None:
        losses = {"train_loss_before": sft.train_loss_before, "train_loss_after": sft.train_loss_after,
                  "val_loss_before": sft.val_loss_before, "val_loss_after": sft.val_loss_after}
        if any(v is not None for v in losses.values()):
            blocks.append(Table([losses], caption="SFT loss on fixed batches, before and after instruction tuning "
                                                  f"({relative(run, sft.path)})"))
    if rows:
        blocks.insert(0, Table(rows, caption="Training runs"))
    return blocks or [Text("Not run: neither pretrain/ nor sft/ exists.")]


def _sweep_table(s: SweepSummary | None, caption: str) -> Table | None:
    from cm3leon.eval.sweep import spread_rows

    if s is None or not s.rows:
        return None
    rows, metrics = s.rows, list(s.metrics)
    cols = ["setting", *metrics, *(c for c in ("colour", "shape", "seconds_per_image") if c in rows[0])]
    spread = f", mean ± sd over seeds {', '.join(map(str, s.seeds))}" if len(s.seeds) > 1 else ""
    return Table(spread_rows(rows, [*metrics, "colour", "shape"]), cols,
                 caption=f"{caption}: the same {or_unknown(s.num_prompts)} prompts and seeds for every setting"
                         f"{spread} (scorer: {s.scorer or 'shapes checker'})")


def _claims(after: SweepSummary, before: SweepSummary | None) -> Table | None:
    """The paper's claims on this run's model, from the sweeps: retrieval k, decoding methods,
    before vs after SFT (each row's figure with its spread over the sweep's seeds)."""
    from cm3leon.api import IMAGE_METHODS
    from cm3leon.eval.sweep import with_spread

    rows_a = [r for r in after.rows if "both" in r]
    if not rows_a:
        return None
    out = []

    def add(claim: str, stage: str, r: dict) -> None:
        out.append({"claim": claim, "model": stage, "setting": r.get("setting"), "both": with_spread(r, "both"),
                    "seconds_per_image": r.get("seconds_per_image")})

    rows_b = [r for r in (before.rows if before is not None else ()) if "both" in r]
    for stage, rows in (("after SFT", rows_a), ("before SFT", rows_b)):
        for r in rows:
            if r.get("num_retrieved") is not None:  # the k-retrieved row and its k = shared twin
                twin = next((t for t in rows if t.get("method") == "cfg" and t.get("num_retrieved") is None
                             and t.get("temperature") is None and t.get("cfg_scale") == r.get("cfg_scale")), None)
                for x in (twin, r):
                    if x is not None:
                        add("retrieval k", stage, x)
    by_method: dict[str, list[dict]] = {}
    for r in rows_a:
        if r.get("num_retrieved") is None:
            by_method.setdefault(str(r.get("method")), []).append(r)
    for m in IMAGE_METHODS:
        if by_method.get(m):
            add("decoding (best of each)", "after SFT", max(by_method[m], key=lambda r: r["both"]))
    after_by_setting = {r.get("setting"): r for r in rows_a}
    for r in rows_b:  # the settings run before SFT, beside the same settings after it
        if r.get("num_retrieved") is None and r.get("setting") in after_by_setting:
            add("SFT", "before SFT", r)
            add("SFT", "after SFT", after_by_setting[r["setting"]])
    return Table(out, ["claim", "model", "setting", "both", "seconds_per_image"],
                 caption="The paper's claims on this run (text→image colour+shape accuracy)") if out else None


def _sweep(run: RunFolder, bar: QualityBar) -> list:
    s = SweepSummary.read(run, "sweep")
    if s is None:
        return [Text(f"Not run: no decoding sweep ({relative(run, run.path('eval', 'sweep', SweepSummary.NAME))} "
                     "does not exist).")]
    before = SweepSummary.read(run, "sweep_pretrain")
    blocks: list = [b for b in (_claims(s, before), _sweep_table(s, "Decoding settings after SFT"),
                                _sweep_table(before, "Before SFT")) if b is not None]
    plots = [s.dir / p for p in s.plots] or sorted(s.dir.glob("sweep_*_vs_*.png"))
    blocks += [Image(p, caption=p.stem.replace("_", " "), width=520) for p in plots if p.is_file()]
    blocks += [Text(n) for n in s.notes]
    return blocks


def _ablations(run: RunFolder, bar: QualityBar) -> list:
    d = run.path("ablate")
    if not d.is_dir():
        return [Text(f"Not run: no ablations ({d} does not exist).")]
    blocks: list = []
    res = AblationResults.read(run)
    if res is not None and res.rows:
        blocks.append(Table([_scalars(r) for r in res.rows], caption="Ablations (ablate/results.json)"))
    elif (d / "results.md").is_file():
        blocks.append(Text((d / "results.md").read_text(encoding="utf-8"), code=True))
    blocks += [Image(p, caption=p.stem.replace("_", " "), width=520) for p in sorted(d.glob("*.png"))]
    blocks += _baselines(run)
    return blocks or [Text(f"{d} holds no results.json, results.md or plots.")]


def _baselines(run: RunFolder) -> list:
    """`cm3leon ablate --baselines`: the table at both budgets, the notes and the compute plot."""
    from cm3leon.run.baselines import COLUMNS

    res = BaselinesSummary.read(run)
    if res is None:
        return []
    flops, secs = number(res.train_flops), number(res.train_seconds)
    caption = ("Baselines at CM3Leon's budget (ablate/baselines/metrics.json): "
               + (f"{flops:.3g} training FLOPs, " if flops is not None else "") + f"{_secs(secs)} of training steps")
    blocks: list = [Table([_scalars(r) for r in res.rows], COLUMNS, caption=caption)]
    blocks += [Text(n) for n in res.notes]
    blocks += [Image(res.dir / p, caption=Path(p).stem.replace("_", " "), width=720) for p in res.plots
               if (res.dir / p).is_file()]
    return blocks


def _stage_rows(run: RunFolder) -> list[dict]:
    pipe = PipelineSummary.read(run)
    recorded = pipe.stages if pipe is not None else {}
    rows = []
    about = {"data": "dataset (built by `cm3leon demo`)", **{s.name: s.about for s in STAGES}}
    for name in ["data", *(s.name for s in STAGES)]:
        if name == "data" and not run.path("data", DONE).is_file():
            continue  # `cm3leon pipeline` on the user's own data: no data stage
        marker = StageDone.read(run, name)
        rec = recorded.get(name) or StageRecord()
        seconds = number(marker.seconds if marker is not None and marker.seconds is not None else rec.seconds)
        if marker is not None:
            status = "done"
        elif rec.status and not rec.status.startswith("skipped"):
            status = rec.status
        else:
            status = "unfinished" if run.path(name).is_dir() else "not run"
        rows.append({"stage": name, "status": status, "seconds": seconds, "time": _secs(seconds),
                     "about": about.get(name, "")})
    return rows


def _timings(run: RunFolder, bar: QualityBar) -> list:
    rows = _stage_rows(run)
    total = sum(r["seconds"] or 0 for r in rows)
    for r in rows:
        r["share"] = percent(r["seconds"] / total) if r["seconds"] and total else "—"
    pipe = PipelineSummary.read(run)
    blocks = [Table(rows, ["stage", "status", "time", "share", "about"],
                    caption=f"Stage times (the .done markers and pipeline.json); sum {_secs(total)}")]
    if pipe is not None and number(pipe.seconds) is not None:
        blocks.append(Text(f"The last `cm3leon pipeline` pass took {_secs(pipe.seconds)} (stages already done "
                           "are skipped on a re-run and take no time there)."))
    return blocks


# The report, in order: (title, builder of the section's blocks from the run folder).
SECTIONS: tuple[tuple[str, Callable[[RunFolder, QualityBar], list]], ...] = (
    ("Summary", _summary),
    ("Text → image", _text_to_image),
    ("Captions and VQA", _captions_vqa),
    ("Image editing", _edits),
    ("Image tokenizer", _image_tokenizer),
    ("Retrieval", _retrieval),
    ("Training", _training),
    ("Decoding sweep", _sweep),
    ("Ablations", _ablations),
    ("Stage timings", _timings),
)
SECTION_TITLES = tuple(title for title, _ in SECTIONS)


# ---------------------------------------------------------------------------------------------
# The report


def run_report_sections(run_dir: str | os.PathLike, bar: QualityBar | None = None) -> list[Section]:
    """The report's sections (`SECTIONS`, in order). A section whose files cannot be
    read carries a note saying why instead of failing the whole report."""
    run = RunFolder(run_dir)
    bar = bar or quality_bar_for(run_dir)
    sections = []
    for title, build in SECTIONS:
        try:
            blocks = build(run, bar)
        except (CM3LeonError, OSError, ValueError, KeyError, TypeError) as e:
            print(f"cm3leon report: section {title!r}: {type(e).__name__}: {e}", file=sys.stderr)
            blocks = [Text(f"This section could not be built: {type(e).__name__}: {e}")]
        sections.append(Section(title, blocks))
    return sections


def build_run_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None,
                     bar: QualityBar | None = None) -> Path:
    """Write one self-contained HTML report of a pipeline run folder to `out` (default
    RUN/report.html) and return its path. Stages that did not run get a "not run" note."""
    run = Path(run_dir)
    if not run.is_dir():
        raise CM3LeonError(f"--run: {run} is not a folder")
    known = ["pipeline.json", "data", *(s.name for s in STAGES)]
    if not any((run / k).exists() for k in known):
        raise CM3LeonError(f"--run: {run} is not a pipeline run folder (none of {', '.join(known)} in it); "
                           "make one with `cm3leon demo --out DIR` or `cm3leon pipeline`")
    out = Path(out) if out is not None else run / "report.html"
    pipe = PipelineSummary.read(RunFolder(run)) or PipelineSummary()
    meta = f"{run.resolve()} · preset {pipe.label} · " \
           f"report written {time.strftime('%Y-%m-%d %H:%M')}"
    return build_report(out, run_report_sections(run, bar), title=f"cm3leon run: {run.resolve().name}", meta=meta)


def register(sub) -> None:
    p = sub.add_parser("report", help="write report.html for a pipeline run folder (self-contained, opens offline)")
    p.add_argument("--run", required=True, help="run folder written by `cm3leon demo` / `cm3leon pipeline`")
    p.add_argument("--out", default=None, help="HTML file to write (default RUN/report.html)")
    p.set_defaults(func=_report_cmd)


def _report_cmd(args) -> int:
    path = build_run_report(args.run, args.out)
    print(path)
    return 0
