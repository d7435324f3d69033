"""The decoding comparison (CM3Leon Sec. 3, Figure 4): the same prompts decoded with TopP
alone, TopP + CFG over a range of guidance scales α, CD-K, and best-of-N (N candidates, half
TopP+CFG and half CD-K, re-ranked by CLIP score or, without a retriever, by the model's own
caption likelihood), each scored by the shapes checker (prompt accuracy "both": colour and
shape right) and, with a retriever, by FD in its feature space and CLIP score.

    cm3leon eval sweep --model runs/demo/sft/model --data data/shapes --out runs/demo/sweep

Writes sweep.json (one row per setting), sweep.md and plots of each metric against α and
against N. Best-of-N re-ranks with the same retriever that computes the CLIP score, so its
CLIP score is optimistic by construction: judge it by the checker and FD.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Sequence

from cm3leon.errors import CM3LeonError


def _check_list(values, name: str, kind, minimum) -> list:
    if isinstance(values, str):
        try:
            values = [kind(v) for v in values.split(",") if v.strip()]
        except ValueError:
            raise CM3LeonError(f"{name}: expected a comma-separated list of numbers, got {values!r}") from None
    values = list(values)
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or v < minimum for v in values):
        raise CM3LeonError(f"{name}: every value must be a number >= {minimum}, got {values}")
    return values


DEFAULT_CFG_SCALES = (1.0, 2.0, 3.0, 5.0, 7.0)  # CFG scales alpha compared by default
# Options a sweep may share across its settings (each setting names its own method and N).
SHARED_DECODING_KEYS = ("cfg_scale", "temperature", "top_p", "top_k", "cdk_alpha", "cdk_k", "num_retrieved", "scorer")


def decoding_settings(cfg_scales: Sequence[float], best_of: Sequence[int], temperature: float = 1.0,
                      top_p: float = 0.9, cdk_alpha: float = 0.1, cdk_k: int = 10,
                      best_of_cfg_scale: float = 3.0) -> list[dict]:
    """The settings compared, each {"setting": label, "decoding": options for
    `sample_images_batch`, "cfg_scale", "num_candidates"} (the last two None where unused)."""
    base = {"temperature": temperature, "top_p": top_p}
    out = [{"setting": "TopP", "decoding": {"method": "topp", **base}, "cfg_scale": None, "num_candidates": None}]
    out += [{"setting": f"TopP+CFG a={a:g}", "decoding": {"method": "cfg", "cfg_scale": float(a), **base},
             "cfg_scale": float(a), "num_candidates": None} for a in cfg_scales]
    out.append({"setting": "CD-K", "decoding": {"method": "cdk", "temperature": temperature, "cdk_alpha": cdk_alpha,
                                                "cdk_k": cdk_k}, "cfg_scale": None, "num_candidates": None})
    out += [{"setting": f"best-of-{n}", "decoding": {"method": "best_of_n", "num_candidates": int(n),
                                                      "cfg_scale": best_of_cfg_scale, "cdk_alpha": cdk_alpha,
                                                      "cdk_k": cdk_k, **base},
             "cfg_scale": best_of_cfg_scale, "num_candidates": int(n)} for n in best_of]
    return out


def sweep_decoding(
    model_dir,
    data: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg_scales: Sequence[float] | str = DEFAULT_CFG_SCALES,
    best_of: Sequence[int] | str = (1, 2, 4, 8),
    num_prompts: int | None = 100,
    seed: int = 0,
    split: str | None = "test",
    batch_size: int = 16,
    temperature: float = 1.0,
    top_p: float = 0.9,
    cdk_alpha: float = 0.1,
    cdk_k: int = 10,
    best_of_cfg_scale: float = 3.0,
    fid_features: str = "retriever",
    clip_retriever: str | os.PathLike | None = None,
    images: str | os.PathLike | None = None,
    device: str = "auto",
    decoding: dict | None = None,
) -> dict:
    """Compare decoding settings on the same prompts (the first `num_prompts` captions of
    `split`, same seeds for every setting); write sweep.json, sweep.md and
    sweep_<metric>_vs_cfg.png / sweep_<metric>_vs_n.png into `out_dir`. `decoding`: options
    every setting shares (SHARED_DECODING_KEYS, e.g. num_retrieved, scorer). Returns
    sweep.json's content: {"rows": [one per setting], "metrics": [...], ...}."""
    from cm3leon.eval.evaluate import (
        FDScorer, clip_scores, fd_extractor, generate_images, load_eval_data, load_model, retriever_name,
        score_shapes_images, scoring_retriever, _check_num,
    )
    from cm3leon.eval.report import image_grid, markdown_table, plot_xy
    from cm3leon.utils.io import atomic_path, write_json, write_text
    from cm3leon.utils.logging import MetricsLogger

    bad = sorted(set(decoding or {}) - set(SHARED_DECODING_KEYS))
    if bad:
        raise CM3LeonError(f"sweep decoding: option(s) {bad} cannot be shared by every setting; "
                           f"expected some of {', '.join(SHARED_DECODING_KEYS)}")
    cfg_scales = _check_list(cfg_scales, "cfg_scales", float, 0.0)
    best_of = [int(n) for n in _check_list(best_of, "best_of", int, 1)]
    _check_num(num_prompts)
    if batch_size < 1:
        raise CM3LeonError(f"batch_size must be >= 1, got {batch_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(model_dir, device)
    data_ = load_eval_data(data, split, num_prompts, size=getattr(model, "resolution", None), images=images)
    prompts = [c.prompt for c in data_.images]
    retriever = scoring_retriever(model, clip_retriever)
    notes = list(data_.notes)
    if not data_.is_shapes:
        notes.append("shapes accuracy skipped: not a shapes dataset (no annotations.jsonl)")
    fd = None
    if len(prompts) >= 2:
        extractor, why = fd_extractor(fid_features, retriever)
        if extractor is None:
            notes.append(f"FD skipped: {why}")
        else:
            fd = FDScorer(extractor, [c.image for c in data_.images])
    else:
        notes.append("FD skipped: needs at least 2 prompts")
    if retriever is None:
        notes.append("CLIP score skipped: no retriever (best-of-N re-ranks by the model's caption likelihood)")
    if not data_.is_shapes and fd is None and retriever is None:
        raise CM3LeonError("nothing to score the sweep with: not a shapes dataset and no retriever / FD features")

    rows = []
    with MetricsLogger(out / "sweep_log.jsonl") as log:
        for s in decoding_settings(cfg_scales, best_of, temperature, top_p, cdk_alpha, cdk_k, best_of_cfg_scale):
            t0 = time.perf_counter()
            generated = generate_images(model, prompts, {**(decoding or {}), **s["decoding"]}, seed, batch_size,
                                        desc=s["setting"])
            row = {"setting": s["setting"], "method": s["decoding"]["method"], "cfg_scale": s["cfg_scale"],
                   "num_candidates": s["num_candidates"]}
            if data_.is_shapes:
                summary, _ = score_shapes_images(generated, prompts, [c.objects for c in data_.images])
                row.update({"both": summary["both"], "colour": summary["colour"], "shape": summary["shape"]})
            if retriever is not None:
                cs = clip_scores(retriever, generated, prompts)
                row["clip_score"] = sum(cs) / len(cs)
            if fd is not None:
                row[fd.name] = fd(generated)["value"]
            row["seconds"] = round(time.perf_counter() - t0, 2)
            rows.append(row)
            log.log(**row)
            k = min(16, len(generated))
            grid = image_grid(generated[:k], captions=prompts[:k])
            with atomic_path(out / "grids" / f"{s['setting'].replace(' ', '_').replace('=', '')}.png") as tmp:
                grid.save(tmp, format="PNG")
    metrics = [m for m in ("both", "clip_score", fd.name if fd else None) if m and m in rows[0]]

    plots = []
    labels = {"both": "shapes accuracy (colour and shape right)", "clip_score": "CLIP score"}
    cfg_rows = [r for r in rows if r["method"] == "cfg"]
    n_rows = [r for r in rows if r["method"] == "best_of_n"]
    for m in metrics:
        slug = m.lower().replace("-", "_").replace(" ", "_")
        if cfg_rows:
            p = plot_xy(cfg_rows, "cfg_scale", m, out / f"sweep_{slug}_vs_cfg.png",
                        title=f"{m} vs CFG scale (TopP+CFG)",
                        xlabel="CFG scale α", ylabel=labels.get(m, m))
            plots.append(p.name)
        if n_rows:
            p = plot_xy(n_rows, "num_candidates", m, out / f"sweep_{slug}_vs_n.png",
                        title=f"{m} vs N (best-of-N: ½ TopP+CFG, ½ CD-K)", xlabel="N (candidates)",
                        ylabel=labels.get(m, m))
            plots.append(p.name)
    result = {
        "model": str(model_dir) if isinstance(model_dir, (str, os.PathLike)) else type(model_dir).__name__,
        "data": str(data), "split": split, "num_prompts": len(prompts), "seed": seed,
        "scorer": retriever_name(retriever) if retriever is not None else None,
        "metrics": metrics, "rows": rows, "plots": plots, "notes": notes,
    }
    write_json(out / "sweep.json", result)
    cols = ["setting", *metrics, *(c for c in ("colour", "shape") if c in rows[0]), "seconds"]
    md = [f"# Decoding comparison: {result['model']}", "",
          f"{len(prompts)} prompts from {data} (split {split}), seed {seed}; same prompts and seeds for every setting.",
          "", markdown_table(rows, cols), ""]
    if retriever is not None:
        md.append("Best-of-N is re-ranked by the same retriever that computes the CLIP score: its CLIP score is "
                  "optimistic by construction.")
    md += [f"- {n}" for n in notes]
    md += [f"![{p}]({p})" for p in plots]
    write_text(out / "sweep.md", "\n".join(md) + "\n")
    return result
