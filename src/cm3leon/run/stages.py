"""The pipeline's stage functions: each takes (ctx, out_dir) and returns a JSON-able dict.

They only wire the stage modules together with the run's preset (`cm3leon.run.config`); the work
is done in the stage modules themselves. Stage folders are siblings under the run folder
(see `cm3leon.run.pipeline`), so a stage finds its inputs at `ctx.stage_dir(name)`."""

from __future__ import annotations

from pathlib import Path

from cm3leon.run.config import get_pipeline_preset
from cm3leon.run.pipeline import PipelineContext
from cm3leon.utils.io import write_json, write_jsonl


def _preset(ctx: PipelineContext):
    return get_pipeline_preset(ctx.preset)


def text_tokenizer(ctx: PipelineContext, out: Path) -> dict:
    from cm3leon.sft.data import instruction_texts
    from cm3leon.tokenizers.text import train_text_tokenizer

    return train_text_tokenizer(ctx.data, out, vocab_size=_preset(ctx).text_vocab,
                                extra_texts=instruction_texts(ctx.data))


def image_tokenizer(ctx: PipelineContext, out: Path) -> dict:
    from cm3leon.tokenizers.image_train import train_image_tokenizer

    p = _preset(ctx)
    return train_image_tokenizer(ctx.data, out, preset=p.image_tokenizer, steps=p.image_tokenizer_steps, seed=ctx.seed)


def tokenize(ctx: PipelineContext, out: Path) -> dict:
    from cm3leon.tokenizers.tokenize import tokenize_dataset

    meta = tokenize_dataset(ctx.data, ctx.stage_dir("image_tokenizer"), ctx.stage_dir("text_tokenizer"), out)
    return {k: meta[k] for k in ("num_records", "splits", "grid", "tokens_per_image") if k in meta}


def retrieval(ctx: PipelineContext, out: Path) -> dict:
    """Train the bi-encoder, index the train split, and store every record's neighbours beside
    the code shards (retrieval is computed once per dataset, not per step)."""
    from cm3leon.retrieval.index import build_index, compute_neighbors
    from cm3leon.retrieval.train import train_retriever

    p = _preset(ctx)
    codes = ctx.stage_dir("tokenize")
    retriever = train_retriever(ctx.data, out / "retriever", steps=p.retriever_steps,
                                batch_size=p.retriever_batch_size, seed=ctx.seed)
    index = build_index(ctx.data, out / "retriever", out / "index", codes=codes)
    neighbours = compute_neighbors(out / "index", codes, k=max(1, p.num_retrieved), seed=ctx.seed)
    return {"retriever": _pick(retriever, "recall", "metrics"), "index": _pick(index, "count", "dim", "index_type"),
            "neighbors": _pick(neighbours, "k", "rows_with_k", "num_records")}


def pretrain(ctx: PipelineContext, out: Path) -> dict:
    from cm3leon.train.cli import pretrain as run_pretrain

    p = _preset(ctx)
    nb = ctx.stage_dir("tokenize") / "neighbors.npy"
    summary = run_pretrain(ctx.stage_dir("tokenize"), out, preset=p.model,
                           num_retrieved=p.num_retrieved if nb.is_file() else 0, seed=ctx.seed,
                           **{"order": "random", **p.pretrain})
    return _pick(summary, "steps", "tokens_seen", "final_train_loss", "final_val_loss", "tokens_per_second",
                 "train_seconds", "num_parameters")


def sft(ctx: PipelineContext, out: Path) -> dict:
    from cm3leon.sft.cli import run_sft
    from cm3leon.sft.data import folder_tasks

    p = _preset(ctx)
    options = dict(p.sft)
    present = folder_tasks(ctx.data)
    if present is not None and options.get("weights"):
        # the preset's mixture adapts to the data: a captions-only folder tunes captioning and
        # text-to-image, and names no task it has no examples of
        options["weights"] = {t: w for t, w in options["weights"].items() if t in present}
    summary = run_sft(ctx.stage_dir("pretrain"), ctx.data, out, preset=p.sft_preset or p.model, seed=ctx.seed,
                      **options)
    write_decoding(p, out)
    return {"sft": summary.get("sft", {}), **_pick(summary, "steps", "train_seconds", "tokens_per_second")}


def write_decoding(p, model_dir: Path) -> None:
    """The preset's text->image decoding (CFG scale, retrieved documents, CD-K's k) as the tuned
    model directory's defaults (decoding.json), so `CM3Leon.from_pretrained(...)`, the CLI and
    `cm3leon serve` draw the way the report measured."""
    from cm3leon.decode.config import write_model_decoding

    write_model_decoding(model_dir, p.decoding)


def _prompts(ctx: PipelineContext, n: int) -> list[str]:
    """A fixed prompt set: captions of the test split, single-object scenes first (the demo's
    quality bar is about those), then the rest."""
    from cm3leon.data.readers import iter_texts

    texts = list(dict.fromkeys(iter_texts(ctx.data, split="test")))
    if _is_shapes(ctx):
        from cm3leon.data.shapes import parse_caption

        texts.sort(key=lambda t: len(parse_caption(t)) != 1)  # stable: single objects first
    return texts[:n]


def _is_shapes(ctx: PipelineContext) -> bool:
    return (ctx.data / "dataset.json").is_file() and (ctx.data / "annotations.jsonl").is_file()


def generate(ctx: PipelineContext, out: Path) -> dict:
    """The fixed prompt set with every decoding method, each image judged by the shapes checker
    (when the data is shapes): the report's text->image grids."""
    from cm3leon.api import CM3Leon
    from cm3leon.utils.logging import progress

    p = _preset(ctx)
    model = CM3Leon.from_pretrained(ctx.stage_dir("sft"))
    prompts = _prompts(ctx, p.generate_prompts)
    shapes = _is_shapes(ctx)
    if shapes:
        from cm3leon.data.checker import check_prompt
        from cm3leon.data.shapes import parse_caption
    summary = {"prompts": prompts, "methods": {}}
    bar = progress(total=len(p.generate_methods), desc="generate", unit="method")
    for method in p.generate_methods:
        d = out / method
        d.mkdir(parents=True, exist_ok=True)
        samples = model.sample_images(prompts, decoding=p.decoding.replace(method=method), seed=ctx.seed)
        rows, ok_by_count = [], {}
        for i, s in enumerate(samples):
            f = d / f"{i:03d}.png"
            s.image.save(f)
            row = {"file": f.name, **s.to_json()}
            if shapes:
                verdict = check_prompt(s.image, s.prompt)
                row["checker"] = {k: v for k, v in verdict.items() if isinstance(v, (bool, int, float))}
                both = bool(verdict["colour_ok"] and verdict["shape_ok"])
                row["checker"]["both_ok"] = both
                ok_by_count.setdefault(str(len(parse_caption(s.prompt))), []).append(both)
            rows.append(row)
        write_jsonl(d / "samples.jsonl", rows)
        entry = {"n": len(rows)}
        if shapes:
            allv = [v for vs in ok_by_count.values() for v in vs]
            entry["accuracy_both"] = sum(allv) / max(1, len(allv))
            entry["by_num_objects"] = {k: sum(v) / len(v) for k, v in sorted(ok_by_count.items())}
        summary["methods"][method] = entry
        bar.update(1)
    bar.close()
    write_json(out / "summary.json", summary)
    return {m: e.get("accuracy_both") for m, e in summary["methods"].items()}


def evaluate(ctx: PipelineContext, out: Path) -> dict:
    """Final evaluation of the instruction-tuned model (and of the pretrained one for captions
    and VQA, to show what SFT changed), the decoding sweep, and RUN/metrics.json."""
    from cm3leon.eval.evaluate import evaluate_model

    p = _preset(ctx)
    decoding = p.decoding  # the preset's own text->image method (what decoding.json recommends)
    results = {"sft": evaluate_model(ctx.stage_dir("sft"), ctx.data, out / "sft", num_prompts=p.eval_num,
                                     decoding=decoding, seed=ctx.seed)}
    if p.eval_before_sft:
        results["pretrain"] = evaluate_model(ctx.stage_dir("pretrain"), ctx.data, out / "pretrain",
                                             metrics=("shapes", "cider", "vqa"), num_prompts=p.eval_num,
                                             decoding=decoding, seed=ctx.seed)
    if p.sweep:
        from cm3leon.eval.sweep import DEFAULT_CFG_SCALES, sweep_decoding

        # the usual range (or the preset's) and the run's own scale; retrieval compared at
        # the pretraining k against the run's own k (paper Sec. 2); the paper's claims
        # (retrieval, decoding, SFT) each over `sweep_seeds` sampling seeds
        scales = sorted({*(p.sweep_cfg_scales or DEFAULT_CFG_SCALES), float(p.decoding.cfg_scale)})
        retrieved = [k for k in sorted({0, p.num_retrieved}) if k != p.decoding.num_retrieved]
        seeds = [ctx.seed + i for i in range(p.sweep_seeds)]
        common = dict(num_prompts=p.sweep_num, seeds=seeds, decoding=p.decoding, retrieved=retrieved)
        sweep_decoding(ctx.stage_dir("sft"), ctx.data, out / "sweep", cfg_scales=scales, best_of=p.sweep_best_of,
                       temperatures=p.sweep_temperatures, **common)
        if p.eval_before_sft:  # the same prompts and seeds before SFT: what instruction tuning changed
            sweep_decoding(ctx.stage_dir("pretrain"), ctx.data, out / "sweep_pretrain", cfg_scales=[p.decoding.cfg_scale],
                           best_of=(), methods=("topp", "cfg"), **common)
    headline = run_metrics(ctx)
    write_json(ctx.out / "metrics.json", headline)
    return headline.get("quality_bar_summary", {})


def run_metrics(ctx: PipelineContext) -> dict:
    """The run's headline numbers, gathered from the stage folders (their summaries copied
    whole), with the quality bar."""
    from cm3leon.run.quality_bar import quality_bar_checks, quality_bar_limits
    from cm3leon.run.summaries import Evaluation, GenerateSummary, ImageTokenizerSummary, RetrieverSummary, RunFolder

    run = RunFolder(ctx.out)
    checks = quality_bar_checks(ctx.out)
    return {
        "preset": ctx.preset,
        "image_tokenizer": run.json(*ImageTokenizerSummary.FILE),
        "retriever": run.json(*RetrieverSummary.FILE),
        "generate": (run.json(*GenerateSummary.FILE) or {}).get("methods"),
        "eval_sft": run.json("eval", "sft", Evaluation.NAME),
        "eval_pretrain": run.json("eval", "pretrain", Evaluation.NAME),
        "quality_bar": checks,
        "quality_bar_summary": {c["criterion"]: {"figure": c["figure"], "met": c["met"]} for c in checks},
        "quality_bar_limits": quality_bar_limits(ctx.out) if any(c["met"] is False for c in checks) else [],
    }


def report(ctx: PipelineContext, out: Path) -> dict:
    from cm3leon.run.report import build_run_report

    path = build_run_report(ctx.out)
    return {"report": str(path)}


def _pick(d: dict, *keys: str) -> dict:
    return {k: d[k] for k in keys if isinstance(d, dict) and k in d}
