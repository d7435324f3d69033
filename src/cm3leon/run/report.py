"""`cm3leon report`: one self-contained `report.html` for a pipeline run folder.

    cm3leon report --run runs/demo            # writes runs/demo/report.html

It reads what the stages wrote (see `cm3leon.run.pipeline`): metrics files, sample grids, training
logs, code shards and neighbours, and lays them out as ten sections: summary with the quality
bar, text->image samples per decoding method, captions and VQA, edits, the image tokenizer,
retrieval, training curves, the decoding sweep, ablations and stage timings. A stage folder
that is missing (the run stopped early) gives a plain "not run" note in its section. Every
picture is embedded (`cm3leon.eval.report.build_report`): the file opens offline on its own.
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
from cm3leon.run.folder import RunFolder, eval_metrics, number, relative, stage_names
from cm3leon.run.quality_bar import QualityBar, percent, quality_bar_checks, quality_bar_limits

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


def _preset(pipe: dict) -> str:
    name = str(pipe.get("preset", "?"))
    return f"{name} (quick)" if pipe.get("quick") and name != "quick" else name


def _scalars(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool)) or v is None}


def missing_note(run: RunFolder, stage: str, what: str = "") -> Text | None:
    """A plain note when the stage did not run or did not finish; None when it finished."""
    d = run.path(stage)
    what = f" ({what})" if what else ""
    if not d.is_dir():
        return Text(f"Not run: {d} does not exist: the run stopped before the {stage} stage{what}.")
    if stage in stage_names() and run.done(stage) is None:
        return Text(f"The {stage} stage did not finish ({d} has no .done marker): what it left is shown "
                    "where readable.")
    return None


def _summary(run: RunFolder, bar: QualityBar) -> list:
    from cm3leon.eval.evaluate import headline_rows

    blocks: list = []
    pipe = run.json("pipeline.json")
    lines = [f"Run folder: {run.root.resolve()}."]
    if isinstance(pipe, dict):
        total = sum(r["seconds"] or 0 for r in _stage_rows(run))
        last = number(pipe.get("seconds"))
        lines.append(f"Preset {_preset(pipe)}; stage times add up to {_secs(total)}"
                     + (f" (the last `cm3leon pipeline` pass took {_secs(last)})"
                        if last is not None and abs(last - total) > max(5.0, 0.05 * total) else "") + ".")
    else:
        lines.append("No pipeline.json: the pipeline has not finished a pass over this folder yet; "
                     "stage times below come from the stages' .done markers.")
    ds = run.json("data", "dataset.json")
    if ds is None and isinstance(pipe, dict) and pipe.get("data"):
        p = Path(pipe["data"]) / "dataset.json"
        ds = RunFolder(p.parent).json("dataset.json") if p.is_file() else None
    data_path = (pipe or {}).get("data") or (str(run.path("data")) if run.path("data").is_dir() else None)
    if isinstance(ds, dict):
        splits = ds.get("splits") or {}
        lines.append(f"Data: {data_path}: {ds.get('name', 'dataset')}, {ds.get('num', '?')} images of "
                     f"{ds.get('size', '?')} px, up to {ds.get('max_objects', '?')} object(s) per scene"
                     + (f" (train {splits.get('train')}, val {splits.get('val')}, test {splits.get('test')})"
                        if splits else "") + ".")
    elif data_path:
        lines.append(f"Data: {data_path}.")
    tt = (run.done("text_tokenizer") or {}).get("result") or {}
    if tt.get("vocab_size"):
        lines.append(f"Text tokenizer: BPE vocabulary {tt['vocab_size']}, "
                     f"{tt.get('tokens_per_caption', '?')} tokens per caption.")
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

    after_dir = run.final_eval_dir()
    if after_dir is not None:
        try:
            rows = headline_rows(eval_metrics(after_dir))
            before = {r["metric"]: r["value"] for r in headline_rows(eval_metrics(run.eval_dir("pretrain")))}
        except (KeyError, TypeError) as e:  # a metrics file of another version: keep the quality bar above
            blocks.append(Text(f"Headline metrics unreadable in {relative(run, after_dir / 'metrics.json')}: "
                               f"{type(e).__name__}: {e}"))
            return blocks
        cols = ["metric", "value", "n", "note"]
        if before and after_dir != run.eval_dir("pretrain"):
            for r in rows:
                r["before SFT"] = before.get(r["metric"])
            cols = ["metric", "before SFT", "value", "n", "note"]
        blocks.append(Table(rows, cols, caption=f"Headline metrics ({relative(run, after_dir / 'metrics.json')})"))
    else:
        head = run.json("metrics.json")
        if isinstance(head, dict) and _scalars(head):
            blocks.append(Table([{"metric": k, "value": v} for k, v in _scalars(head).items()],
                                caption="Headline metrics (metrics.json)"))
        else:
            blocks.append(Text("No headline metrics: the eval stage has not run."))
    recorded = run.json("metrics.json")
    if isinstance(recorded, dict) and isinstance(recorded.get("quality_bar"), (dict, list)):
        qb = recorded["quality_bar"]
        items = qb.items() if isinstance(qb, dict) else enumerate(qb)
        rows = [{"item": str(k), **(_scalars(v) if isinstance(v, dict) else {"value": v})} for k, v in items]
        if rows:
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
    summary = run.json("generate", "summary.json") or {}
    methods = summary.get("methods") or {}
    if methods:
        rows = [{"method": METHOD_NAMES.get(m, m), **_scalars(v)} for m, v in methods.items() if isinstance(v, dict)]
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
        stats = methods.get(d.name) if isinstance(methods.get(d.name), dict) else {}
        acc, n = number(stats.get("accuracy_both")), stats.get("n")
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


def _before_after_rows(run: RunFolder, picks: list[tuple[str, Callable[[dict], Any]]]) -> list[dict]:
    before, after = eval_metrics(run.eval_dir("pretrain")), eval_metrics(run.final_eval_dir())
    rows = []
    for name, get in picks:
        row = {"metric": name, "after SFT": _safe_get(get, after)}
        if before and run.final_eval_dir() != run.eval_dir("pretrain"):
            row = {"metric": name, "before SFT": _safe_get(get, before), "after SFT": row["after SFT"]}
        if any(v is not None for k, v in row.items() if k != "metric"):
            rows.append(row)
    return rows


def _safe_get(get: Callable[[dict], Any], d: dict) -> Any:
    try:
        return number(get(d))
    except (KeyError, TypeError, AttributeError):
        return None


def _eval_images(run: RunFolder, name: str, caption: str) -> list:
    """The sample grid `name` of the final evaluation and, when it exists, of the pretrained model."""
    after, before = run.final_eval_dir(), run.eval_dir("pretrain")
    if before is not None and after != before:
        dirs = [(before, "before SFT (pretrained model)"), (after, "after SFT")]
    else:
        dirs = [(after, "final model")]
    return [Image(d / name, caption=f"{caption}, {label} ({relative(run, d / name)})")
            for d, label in dirs if d is not None and (d / name).is_file()]


def _no_eval(run: RunFolder) -> list | None:
    """The section's only block when the run has no evaluation to show; None when it has one."""
    if run.final_eval_dir() is not None:
        return None
    note = missing_note(run, "eval", "metrics")
    return [note or Text(f"Not run: {run.path('eval')} holds no metrics.json (sft/ or pretrain/).")]


def _captions_vqa(run: RunFolder, bar: QualityBar) -> list:
    if (absent := _no_eval(run)) is not None:
        return absent
    blocks: list = []
    rows = _before_after_rows(run, [
        ("captions naming the right objects", lambda m: m["cider"]["shapes"]["correct"]),
        ("CIDEr-D", lambda m: m["cider"]["CIDEr-D"]),
        ("BLEU-4", lambda m: m["cider"]["BLEU-4"]),
        ("VQA accuracy (%)", lambda m: m["vqa"]["vqa_accuracy"]),
    ])
    if rows:
        blocks.append(Table(rows, caption="Image -> text, before and after instruction tuning"))
    m = eval_metrics(run.final_eval_dir())
    for key in ("cider", "vqa"):
        if isinstance(m.get(key), dict) and "skipped" in m[key]:
            blocks.append(Text(f"{key} skipped: {m[key]['skipped']}"))
    blocks += _eval_images(run, "grid_captioning.png", "Captions written by the model (green: right colours "
                                                       "and shapes)")
    blocks += _eval_images(run, "grid_vqa.png", "VQA: question -> the model's answer (green: accepted)")
    samples = run.jsonl(relative(run, run.final_eval_dir()), "samples.jsonl") or []
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
    if (absent := _no_eval(run)) is not None:
        return absent
    blocks: list = []
    rows = _before_after_rows(run, [
        ("edit done rate", lambda m: m["edit"]["done_rate"]),
        ("do-nothing baseline", lambda m: m["edit"]["do_nothing_baseline"]),
    ])
    if rows:
        blocks.append(Table(rows, caption="Edits the checker finds done (target scene reached)"))
    edit = eval_metrics(run.final_eval_dir()).get("edit") or {}
    if "skipped" in edit:
        blocks.append(Text(f"Editing skipped: {edit['skipped']}"))
    blocks += _eval_images(run, "grid_edit.png", "Each row: source image, instruction -> edited image, target "
                                                 "(green / red: the checker finds the edit done / not done)")
    return blocks or [Text("The evaluation wrote no editing results.")]


def _image_tokenizer(run: RunFolder, bar: QualityBar) -> list:
    note = missing_note(run, "image_tokenizer", "VQ image tokenizer")
    if note is not None and not run.path("image_tokenizer").is_dir():
        return [note]
    blocks: list = [note] if note else []
    m = run.json("image_tokenizer", "metrics.json")
    if isinstance(m, dict):
        keys = [("psnr_db", "PSNR (dB)"), ("val_l1", "L1 (pixels in [0, 1])"), ("codebook_usage", "codebook usage"),
                ("codes_used", "codes used"), ("codebook_size", "codebook size"), ("perplexity", "code perplexity"),
                ("tokens_per_image", "tokens per image"),
                ("checker_recovered", "objects recovered exactly (shapes checker)"),
                ("checker_recovered_colour_shape", "objects recovered by colour and shape"),
                ("checker_recovered_colour_cell", "objects recovered by colour and cell"),
                ("num_eval_images", "evaluation images"), ("eval_split", "evaluation split"), ("steps", "steps"),
                ("train_time_s", "training time (s)"), ("parameters", "parameters")]
        rows = [{"metric": label, "value": m[k]} for k, label in keys if k in m]
        blocks.append(Table(rows, caption="VQ tokenizer on held-out images (image_tokenizer/metrics.json)"))
    else:
        blocks.append(Text("No image_tokenizer/metrics.json."))
    rec = run.path("image_tokenizer", "reconstructions.png")
    if rec.is_file():
        blocks.append(Image(rec, caption="Held-out images (top row) over their VQ reconstructions (bottom row)"))
    return blocks


def _recall_rows(m: dict) -> list[dict]:
    rows = []
    for direction, prefix in (("text -> image", "text_to_image_recall@"), ("image -> text", "image_to_text_recall@")):
        row = {"direction": direction}
        for k, v in m.items():
            if k.startswith(prefix):
                row[f"recall@{k[len(prefix):]}"] = v
        if len(row) > 1:
            rows.append(row)
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
    m = run.json("retrieval", "retriever", "metrics.json")
    if m is None:
        p = run.find("retrieval", "metrics.json")
        m = run.json(relative(run, p)) if p is not None else None
    if isinstance(m, dict):
        rows = _recall_rows(m)
        if rows:
            blocks.append(Table(rows, caption=f"Retriever recall on {m.get('num_pairs', '?')} held-out "
                                              f"{m.get('eval_split', '')} pairs (retrieval/retriever/metrics.json)"))
        extra = {k: m[k] for k in ("first_loss", "final_loss", "temperature", "steps", "train_seconds") if k in m}
        if extra:
            blocks.append(Table([extra], caption="Retriever training"))
    else:
        blocks.append(Text("No retriever metrics (retrieval/retriever/metrics.json)."))
    nbj = run.json("tokenize", "neighbors.json")
    if isinstance(nbj, dict):
        blocks.append(Text(f"Neighbours: {nbj.get('rows_with_k', '?')} of {nbj.get('num_records', '?')} records have "
                           f"all {nbj.get('k', '?')} retrieved documents; skipped candidates: "
                           + ", ".join(f"{k} {v}" for k, v in (nbj.get("skipped") or {}).items()) + "."))
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
    for stage, name in (("pretrain", "train_summary.json"), ("sft", "train_summary.json"), ("sft", "sft_summary.json")):
        p = run.find(stage, name)
        s = run.json(relative(run, p)) if p is not None else None
        if not isinstance(s, dict):
            continue
        if name == "train_summary.json":
            rows.append({"stage": stage, **{k: s.get(k) for k in (
                "steps", "tokens_seen", "tokens_per_second", "train_seconds", "num_parameters", "final_train_loss",
                "final_val_loss", "device")}})
        else:
            sft = s.get("sft", s)  # nested under "sft" or flat
            keys = ("train_loss_before", "train_loss_after", "val_loss_before", "val_loss_after")
            if any(k in sft for k in keys):
                blocks.append(Table([{k: sft.get(k) for k in keys}],
                                    caption="SFT loss on fixed batches, before and after instruction tuning "
                                            f"({relative(run, p)})"))
    if rows:
        blocks.insert(0, Table(rows, caption="Training runs"))
    return blocks or [Text("Not run: neither pretrain/ nor sft/ exists.")]


def _sweep_table(s: dict, caption: str) -> Table | None:
    from cm3leon.eval.sweep import spread_rows

    rows = [r for r in s.get("rows") or [] if isinstance(r, dict)]
    if not rows:
        return None
    metrics = [m for m in s.get("metrics") or [] if isinstance(m, str)]
    cols = ["setting", *metrics, *(c for c in ("colour", "shape", "seconds_per_image") if c in rows[0])]
    seeds = s.get("seeds") or [s.get("seed")]
    spread = f", mean ± sd over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else ""
    return Table(spread_rows(rows, [*metrics, "colour", "shape"]), cols,
                 caption=f"{caption}: the same {s.get('num_prompts', '?')} prompts and seeds for every setting"
                         f"{spread} (scorer: {s.get('scorer') or 'shapes checker'})")


def _claims(after: dict, before: dict | None) -> Table | None:
    """The paper's claims on this run's model, from the sweeps: retrieval k, decoding methods,
    before vs after SFT (each row's figure with its spread over the sweep's seeds)."""
    from cm3leon.api import IMAGE_METHODS
    from cm3leon.eval.sweep import with_spread

    rows_a = [r for r in after.get("rows") or [] if isinstance(r, dict) and "both" in r]
    if not rows_a:
        return None
    out = []

    def add(claim: str, stage: str, r: dict) -> None:
        out.append({"claim": claim, "model": stage, "setting": r.get("setting"), "both": with_spread(r, "both"),
                    "seconds_per_image": r.get("seconds_per_image")})

    rows_b = [r for r in (before or {}).get("rows") or [] if isinstance(r, dict) and "both" in r]
    for stage, rows in (("after SFT", rows_a), ("before SFT", rows_b)):
        for r in rows:
            if r.get("num_retrieved") is not None:  # the k-retrieved row and its k = shared twin
                twin = next((t for t in rows if t.get("method") == "cfg" and t.get("num_retrieved") is None
                             and t.get("cfg_scale") == r.get("cfg_scale")), None)
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
    d = run.path("eval", "sweep")
    s = run.json("eval", "sweep", "sweep.json")
    if not isinstance(s, dict):
        return [Text(f"Not run: no decoding sweep ({relative(run, d / 'sweep.json')} does not exist).")]
    before = run.json("eval", "sweep_pretrain", "sweep.json")
    before = before if isinstance(before, dict) else None
    blocks: list = [b for b in (_claims(s, before), _sweep_table(s, "Decoding settings after SFT"),
                                _sweep_table(before or {}, "Before SFT")) if b is not None]
    plots = [d / p for p in s.get("plots") or []] or sorted(d.glob("sweep_*_vs_*.png"))
    blocks += [Image(p, caption=p.stem.replace("_", " "), width=520) for p in plots if p.is_file()]
    for n in s.get("notes") or []:
        blocks.append(Text(str(n)))
    return blocks


def _ablations(run: RunFolder, bar: QualityBar) -> list:
    d = run.path("ablate")
    if not d.is_dir():
        return [Text(f"Not run: no ablations ({d} does not exist).")]
    blocks: list = []
    res = run.json("ablate", "results.json")
    rows = res.get("rows") if isinstance(res, dict) else res
    if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
        blocks.append(Table([_scalars(r) for r in rows], caption="Ablations (ablate/results.json)"))
    elif (d / "results.md").is_file():
        blocks.append(Text((d / "results.md").read_text(encoding="utf-8"), code=True))
    blocks += [Image(p, caption=p.stem.replace("_", " "), width=520) for p in sorted(d.glob("*.png"))]
    blocks += _baselines(run)
    return blocks or [Text(f"{d} holds no results.json, results.md or plots.")]


def _baselines(run: RunFolder) -> list:
    """`cm3leon ablate --baselines`: the table at both budgets, the notes and the compute plot."""
    from cm3leon.run.baselines import COLUMNS

    res = run.json("ablate", "baselines", "metrics.json")
    if not isinstance(res, dict) or not isinstance(res.get("rows"), list):
        return []
    b = res.get("budgets") or {}
    flops, secs = number(b.get("train_flops")), number(b.get("train_seconds"))
    caption = ("Baselines at CM3Leon's budget (ablate/baselines/metrics.json): "
               + (f"{flops:.3g} training FLOPs, " if flops is not None else "") + f"{_secs(secs)} of training steps")
    blocks: list = [Table([_scalars(r) for r in res["rows"] if isinstance(r, dict)], COLUMNS, caption=caption)]
    blocks += [Text(str(n)) for n in res.get("notes") or []]
    d = run.path("ablate", "baselines")
    blocks += [Image(d / p, caption=Path(p).stem.replace("_", " "), width=720) for p in res.get("plots") or []
               if (d / p).is_file()]
    return blocks


def _stage_rows(run: RunFolder) -> list[dict]:
    from cm3leon.run.pipeline import DONE, STAGES

    pipe = run.json("pipeline.json")
    recorded = (pipe or {}).get("stages") or {}
    rows = []
    about = {"data": "dataset (built by `cm3leon demo`)", **{s.name: s.about for s in STAGES}}
    for name in ["data", *(s.name for s in STAGES)]:
        if name == "data" and not run.path("data", DONE).is_file():
            continue  # `cm3leon pipeline` on the user's own data: no data stage
        marker = run.done(name)
        rec = recorded.get(name) or {}
        seconds = number((marker or {}).get("seconds", rec.get("seconds")))
        if marker is not None:
            status = "done"
        elif rec.get("status") and not str(rec["status"]).startswith("skipped"):
            status = str(rec["status"])
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
    pipe = run.json("pipeline.json") or {}
    blocks = [Table(rows, ["stage", "status", "time", "share", "about"],
                    caption=f"Stage times (the .done markers and pipeline.json); sum {_secs(total)}")]
    if number(pipe.get("seconds")) is not None:
        blocks.append(Text(f"The last `cm3leon pipeline` pass took {_secs(pipe['seconds'])} (stages already done "
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
    bar = bar or QualityBar()
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
    from cm3leon.run.pipeline import STAGES

    run = Path(run_dir)
    if not run.is_dir():
        raise CM3LeonError(f"--run: {run} is not a folder")
    known = ["pipeline.json", "data", *(s.name for s in STAGES)]
    if not any((run / k).exists() for k in known):
        raise CM3LeonError(f"--run: {run} is not a pipeline run folder (none of {', '.join(known)} in it); "
                           "make one with `cm3leon demo --out DIR` or `cm3leon pipeline`")
    out = Path(out) if out is not None else run / "report.html"
    pipe = RunFolder(run).json("pipeline.json") or {}
    meta = f"{run.resolve()} · preset {_preset(pipe)} · " \
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
