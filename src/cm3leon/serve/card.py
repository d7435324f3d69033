"""The model card tab: what a model directory is (sizes, vocabulary, image tokenizer,
retrieval), what it was trained on (`train_summary.json`, following `init` back to pretraining)
and how it scored (the run's `metrics.json`), as Markdown."""

from __future__ import annotations

import json
from pathlib import Path


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _find(model_dir: Path, ref: str | None) -> Path | None:
    """A stage folder named by a summary (`init`): as written, or beside the model directory
    (summaries hold paths relative to where the run was started)."""
    if not ref:
        return None
    for p in (Path(ref), model_dir.parent / Path(ref).name):
        if (p / "train_summary.json").is_file():
            return p
    return None


def training_stages(model_dir: Path) -> list[tuple[str, dict]]:
    """[(folder, train_summary)] from the model directory back through its `init`s."""
    out, seen, d = [], set(), model_dir
    while d is not None and d.resolve() not in seen and len(out) < 8:
        seen.add(d.resolve())
        s = _read(d / "train_summary.json")
        if s is None:
            break
        out.append((str(d), s))
        d = _find(model_dir, s.get("init"))
    return out


def _figure(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)


def model_card(m) -> str:
    c, v, ic = m.model.config, m.vocab, m.image_tokenizer.config
    d = Path(m.path) if m.path is not None else None
    params = sum(p.numel() for p in m.model.parameters())
    weights = d / "model.safetensors" if d is not None else None
    size = f", model.safetensors {weights.stat().st_size / 2**20:.1f} MiB" if weights and weights.is_file() else ""
    h, w = ic.grid
    if m.retrieval is not None:
        retrieval = f"memory bank of {len(m.retrieval.bank):,} documents"
    elif m.retriever is not None:
        retrieval = "retriever only (CLIP-style re-ranking; no index, so no retrieved documents)"
    else:
        retrieval = "none (no retriever/ and index/ in the model directory)"
    rows = [
        ("Transformer", f"{c.n_layer} layers × {c.d_model}, {c.n_head} heads, context {c.max_seq_len} tokens, "
                        f"{params / 1e6:.2f}M parameters{size}"),
        ("Vocabulary", f"{v.size:,} ids: {v.text_vocab_size:,} text, {v.image_vocab_size:,} image codes, "
                       f"{v.num_sentinels} sentinels"),
        ("Image tokenizer", f"{ic.architecture}, {ic.resolution} px → {h}×{w} = {h * w} codes "
                            f"from a codebook of {ic.codebook_size:,}"),
        ("Retrieval", retrieval),
    ]
    for folder, s in (training_stages(d) if d is not None else []):
        tokens = s.get("tokens_seen")
        rows.append((f"Training: {s.get('stage', 'pretrain')}",
                     f"{_figure(tokens) if tokens is not None else '?'} tokens, {_figure(s.get('steps', '?'))} steps"
                     f" (`{folder}`, final loss {_figure(s.get('final_train_loss', '?'))})"))
    lines = [f"### `{d}`" if d is not None else "### Model", "", "| Part | |", "|---|---|"]
    lines += [f"| {k} | {val} |" for k, val in rows]
    metrics_path = next((p for p in ((d / "metrics.json"), (d.parent / "metrics.json")) if p.is_file()), None) \
        if d is not None else None
    metrics = _read(metrics_path) if metrics_path is not None else None
    if not metrics:
        lines += ["", "No `metrics.json` beside the model directory (run `cm3leon eval` or `make demo`)."]
        return "\n".join(lines)
    lines += ["", f"### Figures (`{metrics_path}`)", ""]
    bar = metrics.get("quality_bar") or []
    if bar:
        lines += ["| Criterion | Figure | Bar | n | Verdict |", "|---|---|---|---|---|"]
        lines += [f"| {r.get('criterion')} | {r.get('figure')} | {r.get('bar')} | {r.get('n')} | {r.get('verdict')} |"
                  for r in bar]
        lines += [""] + [f"- {t}" for t in metrics.get("quality_bar_limits") or []]
    for name, section in metrics.items():
        if name.startswith("quality_bar") or not isinstance(section, dict):
            continue
        figures = [(k, x) for k, x in section.items() if isinstance(x, (int, float)) and not isinstance(x, bool)]
        figures += [(f"{k}.{k2}", x2) for k, x in section.items() if isinstance(x, dict)
                    for k2, x2 in x.items() if isinstance(x2, (int, float)) and not isinstance(x2, bool)]
        if figures:
            lines += ["", f"<details><summary>{name}</summary>", "",
                      ", ".join(f"{k} = {_figure(x)}" for k, x in figures[:40]), "", "</details>"]
    return "\n".join(lines)
