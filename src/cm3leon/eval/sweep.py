"""The decoding comparison (CM3Leon Sec. 3, Figure 4): the same prompts decoded with TopP
alone, TopP + CFG over a range of guidance scales α, CD-K, and best-of-N (N candidates, half
TopP+CFG and half CD-K, re-ranked by CLIP score or, without a retriever, by the model's own
caption likelihood), and optionally TopP + CFG with k retrieved documents in the prompt
(Sec. 2's retrieval, compared with the shared setting's k), each scored by the shapes checker
(prompt accuracy "both": colour and shape right) and, with a retriever, by FD in its feature
space and CLIP score. With several sampling seeds each figure is the mean over the seeds,
with its standard deviation and per-seed values beside it (`<metric>_std`, `<metric>_seeds`).

    cm3leon eval sweep --model runs/demo/sft/model --data data/shapes --out runs/demo/sweep

Writes sweep.json (one row per setting), sweep.md and plots of each metric against α and
against N (with the seeds' spread as error bars). Best-of-N re-ranks with the model's scorer:
with the retriever that computes the CLIP score ("clip", or "auto" with a retriever) its CLIP
score is optimistic by construction, so judge it by the checker and FD.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Sequence

from cm3leon.decode.config import IMAGE_METHODS, DecodingConfig
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


def decoding_settings(base: DecodingConfig, cfg_scales: Sequence[float], best_of: Sequence[int],
                      retrieved: Sequence[int] = (), methods: Sequence[str] = IMAGE_METHODS,
                      temperatures: Sequence[float] = ()) -> list[dict]:
    """The settings compared, each {"setting": label, "decoding": a DecodingConfig,
    "cfg_scale", "num_candidates", "num_retrieved"} (None where unused), every one `base` with
    its method (and scale, N or k) changed: TopP; TopP+CFG at each of `cfg_scales`; TopP+CFG at
    base's scale with each k of `retrieved` documents in the prompt and with each sampling
    temperature of `temperatures` (other than base's); CD-K; best-of-N for each N of `best_of`
    (at base's scale). `methods`: which of IMAGE_METHODS to include (the retrieval and
    temperature settings count as "cfg")."""
    none = {"cfg_scale": None, "num_candidates": None, "num_retrieved": None, "temperature": None}
    a0 = base.cfg_scale
    out = []
    if "topp" in methods:
        out.append({"setting": "TopP", "decoding": base.replace(method="topp"), **none})
    if "cfg" in methods:
        out += [{"setting": f"TopP+CFG a={a:g}", "decoding": base.replace(method="cfg", cfg_scale=float(a)),
                 **none, "cfg_scale": float(a)} for a in cfg_scales]
        out += [{"setting": f"TopP+CFG a={a0:g} k={k}", "decoding": base.replace(method="cfg", num_retrieved=int(k)),
                 **none, "cfg_scale": a0, "num_retrieved": int(k)} for k in retrieved]
        out += [{"setting": f"TopP+CFG a={a0:g} T={t:g}", "decoding": base.replace(method="cfg", temperature=float(t)),
                 **none, "cfg_scale": a0, "temperature": float(t)}
                for t in temperatures if float(t) != base.temperature]
    if "cdk" in methods:
        out.append({"setting": "CD-K", "decoding": base.replace(method="cdk"), **none})
    if "best_of_n" in methods:
        out += [{"setting": f"best-of-{n}", "decoding": base.replace(method="best_of_n", num_candidates=int(n)),
                 **none, "cfg_scale": a0, "num_candidates": int(n)} for n in best_of]
    return out


def with_spread(row: dict, metric: str, fmt: str = ".3g") -> str:
    """A row's figure as text: "mean ± std" when the row holds several seeds' values."""
    v, std = row.get(metric), row.get(f"{metric}_std")  # `_std` is there only for several seeds
    if not isinstance(v, (int, float)):
        return "—"
    return f"{v:{fmt}} ± {std:.2g}" if isinstance(std, (int, float)) else f"{v:{fmt}}"


def spread_rows(rows: Sequence[dict], metrics: Sequence[str]) -> list[dict]:
    """`rows` with each of `metrics` written as `with_spread` text (for tables)."""
    return [{**r, **{m: with_spread(r, m) for m in metrics if m in r}} for r in rows]


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
    fid_features: str = "retriever",
    clip_retriever: str | os.PathLike | None = None,
    images: str | os.PathLike | None = None,
    device: str = "auto",
    decoding: DecodingConfig | dict | None = None,
    seeds: Sequence[int] | str | None = None,
    retrieved: Sequence[int] | str = (),
    methods: Sequence[str] | str | None = None,
    temperatures: Sequence[float] | str = (),
) -> dict:
    """Compare decoding settings on the same prompts (the first `num_prompts` captions of
    `split`, same seeds for every setting); write sweep.json, sweep.md and
    sweep_<metric>_vs_cfg.png / sweep_<metric>_vs_n.png into `out_dir`. `decoding`: what
    every setting starts from (a DecodingConfig, or a dict of its fields applied over the
    model's own, `CM3Leon.decoding`; best-of-N and the retrieval settings take its CFG scale,
    every setting its temperature, top-p, CD-K alpha and k, retrieved documents). `seeds`: the
    sampling seeds each setting is run with (default: `seed` alone); a row's figures are the
    means over them. `retrieved`: k values compared as extra TopP+CFG settings with k
    retrieved documents in the prompt; `temperatures`, sampling temperatures compared the same
    way (at the shared CFG scale). `methods`: the decoding families to run (default: all of
    the API's IMAGE_METHODS).
    Returns sweep.json's content: {"rows": [one per setting], "metrics": [...], ...}."""
    from cm3leon.eval.data import check_num, load_eval_data
    from cm3leon.eval.evaluate import load_model, scoring_retriever
    from cm3leon.eval.fid import FDScorer, fd_extractor, retriever_name
    from cm3leon.eval.tasks.text_to_image import clip_scores, generate_images, score_shapes_images
    from cm3leon.eval.report import image_grid, markdown_table, plot_xy
    from cm3leon.utils.io import atomic_path, write_json, write_text
    from cm3leon.utils.logging import MetricsLogger

    if decoding is not None and not isinstance(decoding, (DecodingConfig, dict)):
        raise CM3LeonError(f"decoding must be a DecodingConfig or a dict of its fields, got {type(decoding).__name__}")
    own = sorted({"method", "num_candidates"} & set(decoding if isinstance(decoding, dict) else {}))
    if own:
        raise CM3LeonError(f"sweep decoding: {own} cannot be shared: each setting names its own method and N")
    DecodingConfig().replace(**({} if isinstance(decoding, DecodingConfig) else decoding or {}))  # names checked
    cfg_scales = _check_list(cfg_scales, "cfg_scales", float, 0.0)
    best_of = [int(n) for n in _check_list(best_of, "best_of", int, 1)]
    seeds = [seed] if seeds is None else [int(v) for v in _check_list(seeds, "seeds", int, 0)]
    retrieved = [int(k) for k in _check_list(retrieved, "retrieved", int, 0)]
    temperatures = _check_list(temperatures, "temperatures", float, 0.0)
    if any(t <= 0 for t in temperatures):
        raise CM3LeonError(f"temperatures must be > 0, got {temperatures}")
    methods = (list(IMAGE_METHODS) if methods is None else
               [m.strip() for m in methods.split(",")] if isinstance(methods, str) else list(methods))
    if not seeds or len(set(seeds)) != len(seeds):
        raise CM3LeonError(f"seeds: give one or more distinct seeds, got {seeds}")
    if not methods or set(methods) - set(IMAGE_METHODS):
        raise CM3LeonError(f"methods: expected some of {', '.join(IMAGE_METHODS)}, got {methods}")
    check_num(num_prompts)
    if batch_size < 1:
        raise CM3LeonError(f"batch_size must be >= 1, got {batch_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(model_dir, device)
    base = decoding if isinstance(decoding, DecodingConfig) else \
        getattr(model, "decoding", DecodingConfig()).replace(**(decoding or {}))
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

    def score(generated) -> dict:
        fig: dict = {}
        if data_.is_shapes:
            summary, _ = score_shapes_images(generated, prompts, [c.objects for c in data_.images])
            fig.update({"both": summary["both"], "colour": summary["colour"], "shape": summary["shape"]})
        if retriever is not None:
            cs = clip_scores(retriever, generated, prompts)
            fig["clip_score"] = sum(cs) / len(cs)
        if fd is not None:
            fig[fd.name] = fd(generated)["value"]
        return fig

    rows = []
    settings = decoding_settings(base, cfg_scales, best_of, retrieved, methods, temperatures)
    if not settings:
        raise CM3LeonError(f"nothing to sweep: methods {methods} with cfg_scales {cfg_scales} and best_of {best_of}")
    with MetricsLogger(out / "sweep_log.jsonl") as log:
        for s in settings:
            row = {"setting": s["setting"], "method": s["decoding"].method, "cfg_scale": s["cfg_scale"],
                   "num_candidates": s["num_candidates"], "num_retrieved": s["num_retrieved"],
                   "temperature": s["temperature"]}
            per_seed, seconds = [], []
            for sd in seeds:
                t0 = time.perf_counter()
                generated = generate_images(model, prompts, s["decoding"], sd, batch_size,
                                            desc=s["setting"] + (f" seed {sd}" if len(seeds) > 1 else ""))
                seconds.append(time.perf_counter() - t0)
                per_seed.append(score(generated))
                log.log(setting=s["setting"], seed=sd, seconds=round(seconds[-1], 2), **per_seed[-1])
            for m in per_seed[0]:
                values = [f[m] for f in per_seed]
                row[m] = statistics.fmean(values)
                if len(seeds) > 1:
                    row[f"{m}_std"] = statistics.stdev(values)
                    row[f"{m}_seeds"] = values
            row["seconds"] = round(sum(seconds) / len(seconds), 2)  # per seed: all prompts once
            row["seconds_per_image"] = round(row["seconds"] / len(prompts), 4)
            rows.append(row)
            k = min(16, len(generated))
            grid = image_grid(generated[:k], captions=prompts[:k])
            with atomic_path(out / "grids" / f"{s['setting'].replace(' ', '_').replace('=', '')}.png") as tmp:
                grid.save(tmp, format="PNG")
    metrics = [m for m in ("both", "clip_score", fd.name if fd else None) if m and m in rows[0]]

    plots = []
    labels = {"both": "shapes accuracy (colour and shape right)", "clip_score": "CLIP score"}
    cfg_rows = [r for r in rows if r["method"] == "cfg" and r["num_retrieved"] is None and r["temperature"] is None]
    # the temperature rows and the shared-temperature row at the same scale
    t_rows = sorted([r for r in rows if r["temperature"] is not None] +
                    [{**r, "temperature": base.temperature} for r in cfg_rows if r["cfg_scale"] == base.cfg_scale],
                    key=lambda r: r["temperature"]) if any(r["temperature"] is not None for r in rows) else []
    n_rows = [r for r in rows if r["method"] == "best_of_n"]
    for m in metrics:
        slug = m.lower().replace("-", "_").replace(" ", "_")
        if cfg_rows:
            p = plot_xy(cfg_rows, "cfg_scale", m, out / f"sweep_{slug}_vs_cfg.png",
                        title=f"{m} vs CFG scale (TopP+CFG)",
                        xlabel="CFG scale α", ylabel=labels.get(m, m), yerr_suffix="_std")
            plots.append(p.name)
        if t_rows:
            p = plot_xy(t_rows, "temperature", m, out / f"sweep_{slug}_vs_temperature.png",
                        title=f"{m} vs sampling temperature (TopP+CFG a={base.cfg_scale:g})",
                        xlabel="temperature", ylabel=labels.get(m, m), yerr_suffix="_std")
            plots.append(p.name)
        if n_rows:
            p = plot_xy(n_rows, "num_candidates", m, out / f"sweep_{slug}_vs_n.png",
                        title=f"{m} vs N (best-of-N: ½ TopP+CFG, ½ CD-K)", xlabel="N (candidates)",
                        ylabel=labels.get(m, m), yerr_suffix="_std")
            plots.append(p.name)
    result = {
        "model": str(model_dir) if isinstance(model_dir, (str, os.PathLike)) else type(model_dir).__name__,
        "data": str(data), "split": split, "num_prompts": len(prompts), "seed": seeds[0], "seeds": seeds,
        "base_decoding": base.to_dict(),
        "scorer": retriever_name(retriever) if retriever is not None else None,
        "metrics": metrics, "rows": rows, "plots": plots, "notes": notes,
    }
    write_json(out / "sweep.json", result)
    cols = ["setting", *metrics, *(c for c in ("colour", "shape") if c in rows[0]), "seconds_per_image"]
    spread = (f"seeds {', '.join(map(str, seeds))} (mean ± standard deviation over the seeds)" if len(seeds) > 1
              else f"seed {seeds[0]}")
    md = [f"# Decoding comparison: {result['model']}", "",
          f"{len(prompts)} prompts from {data} (split {split}), {spread}; same prompts and seeds for every setting.",
          "", markdown_table(spread_rows(rows, [*metrics, "colour", "shape"]), cols), ""]
    if any(r["method"] == "best_of_n" for r in rows):
        if base.scorer == "likelihood" or getattr(model, "retriever", None) is None:
            md.append("Best-of-N is re-ranked by the model's own likelihood of the prompt as each candidate's "
                      "caption (scorer likelihood), not by the retriever that computes the CLIP score.")
        elif retriever is not None:
            md.append("Best-of-N is re-ranked by the same retriever that computes the CLIP score: its CLIP score is "
                      "optimistic by construction.")
    md += [f"- {n}" for n in notes]
    md += [f"![{p}]({p})" for p in plots]
    write_text(out / "sweep.md", "\n".join(md) + "\n")
    return result
