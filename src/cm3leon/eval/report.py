"""Report building blocks: image grids, metric plots, tables, and one self-contained HTML file.

`build_report` writes a `report.html` that opens offline and prints: every image is embedded
as a base64 PNG, the CSS is inline, nothing is fetched from the network. A report is a list of
`Section(title, blocks)` with blocks `Text`, `Table`, `Image` and `Grid`."""

from __future__ import annotations

import base64
import html
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence, Union

from cm3leon.errors import CM3LeonError
from cm3leon.utils.io import write_text

if TYPE_CHECKING:
    from PIL import Image as PILImage

_PASS, _FAIL = (46, 160, 67), (218, 54, 51)  # green / red marks for checker pass / fail


# ---------------------------------------------------------------------------------------------
# Images


def _load_image(img: Any) -> "PILImage.Image":
    from PIL import Image

    if isinstance(img, Image.Image):
        return img
    if isinstance(img, (str, os.PathLike)):
        p = Path(img)
        if not p.is_file():
            raise CM3LeonError(f"image not found: {p}")
        with Image.open(p) as im:
            return im.copy()
    if isinstance(img, (bytes, bytearray)):
        return Image.open(io.BytesIO(img)).copy()
    raise CM3LeonError(f"not an image: {type(img).__name__} (expected PIL image, path or PNG bytes)")


def _wrap(text: str, draw: Any, font: Any, width: int, max_lines: int = 3) -> list[str]:
    """Greedy word wrap to `width` pixels; the last line is cut with '…' if too long."""
    lines: list[str] = []
    cur = ""
    for word in text.split():
        trial = f"{cur} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not cur:
            cur = trial
        else:
            lines.append(cur)
            cur = word
    if cur:
        lines.append(cur)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1].rstrip() + "…"
    for i, line in enumerate(lines):  # a single over-long word: cut by characters
        while draw.textlength(line, font=font) > width and len(line) > 1:
            line = line[:-2] + "…"
        lines[i] = line
    return lines


def image_grid(
    images: Sequence[Any],
    nrow: int = 8,
    captions: Sequence[str] | None = None,
    marks: Sequence[bool | None] | None = None,
    cell_size: int | None = None,
    pad: int = 4,
    caption_lines: int = 2,
    background: tuple[int, int, int] = (255, 255, 255),
) -> "PILImage.Image":
    """Tile images into one picture, `nrow` images per row (as torchvision's make_grid).

    Every image is scaled (nearest-neighbour, so tiny shapes stay crisp) to `cell_size`
    (default: the largest image side, at least 96 px so captions fit). `captions` are drawn
    under each image; `marks` put a green (True) or red (False) frame around an image, e.g.
    for checker pass / fail (None: no frame)."""
    from PIL import Image, ImageDraw, ImageFont

    imgs = [_load_image(im).convert("RGB") for im in images]
    if not imgs:
        raise CM3LeonError("image_grid: no images")
    if nrow < 1:
        raise CM3LeonError(f"image_grid: nrow must be >= 1, got {nrow}")
    for name, seq in (("captions", captions), ("marks", marks)):
        if seq is not None and len(seq) != len(imgs):
            raise CM3LeonError(f"image_grid: {len(imgs)} images but {len(seq)} {name}")
    cell = cell_size or max(96, max(max(im.size) for im in imgs))
    font = ImageFont.load_default()
    line_h = 12
    cap_h = (caption_lines * line_h + 4) if captions is not None else 0
    ncol = min(nrow, len(imgs))
    nrows = math.ceil(len(imgs) / ncol)
    W = ncol * cell + (ncol + 1) * pad
    H = nrows * (cell + cap_h) + (nrows + 1) * pad
    canvas = Image.new("RGB", (W, H), background)
    draw = ImageDraw.Draw(canvas)
    for i, im in enumerate(imgs):
        r, c = divmod(i, ncol)
        x0 = pad + c * (cell + pad)
        y0 = pad + r * (cell + cap_h + pad)
        scale = cell / max(im.size)
        w, h = max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale))
        resample = Image.NEAREST if scale >= 1 else Image.LANCZOS
        canvas.paste(im.resize((w, h), resample), (x0 + (cell - w) // 2, y0 + (cell - h) // 2))
        if marks is not None and marks[i] is not None:
            color = _PASS if marks[i] else _FAIL
            for t in range(3):
                draw.rectangle([x0 + t, y0 + t, x0 + cell - 1 - t, y0 + cell - 1 - t], outline=color)
        if captions is not None:
            for j, line in enumerate(_wrap(str(captions[i]), draw, font, cell, caption_lines)):
                draw.text((x0, y0 + cell + 2 + j * line_h), line, fill=(20, 20, 20), font=font)
    return canvas


def png_bytes(img: Any) -> bytes:
    """An image (PIL, path or bytes) encoded as PNG."""
    buf = io.BytesIO()
    _load_image(img).save(buf, format="PNG")
    return buf.getvalue()


def png_data_uri(img: Any) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode("ascii")


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib's Agg canvas directly: no global backend switch, no display needed)


def new_figure(figsize: tuple[float, float] = (6.4, 4.0)):
    """An empty figure on its own Agg canvas (no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Any, out_png: str | os.PathLike) -> Path:
    """Lay out `fig` and write it as a PNG, atomically."""
    from cm3leon.utils.io import atomic_path

    out_png = Path(out_png)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    return out_png


def _rows_of(source: Any) -> list[dict]:
    if isinstance(source, (str, os.PathLike)):
        from cm3leon.utils.logging import read_metrics

        p = Path(source)
        if not p.is_file():
            raise CM3LeonError(f"metrics file not found: {p}")
        return read_metrics(p)
    return list(source)


def plot_curves(
    sources: Union[str, os.PathLike, Sequence[Any], Mapping[str, Any]],
    keys: Sequence[str],
    out_png: str | os.PathLike,
    x_key: str = "step",
    title: str | None = None,
    smooth: float = 0.0,
    logy: bool = False,
) -> Path:
    """Training curves (e.g. loss vs step) from metrics JSONL files or lists of rows.

    `sources`: one path / list of rows, a list of paths, or {label: path or rows} for several
    runs on one plot. Rows lacking a key are skipped for that key. `smooth` in [0, 1) is an
    exponential moving average weight (0 = raw)."""
    if isinstance(sources, Mapping):
        runs = {str(k): _rows_of(v) for k, v in sources.items()}
    elif isinstance(sources, (str, os.PathLike)):
        runs = {Path(sources).parent.name or str(sources): _rows_of(sources)}
    elif sources and isinstance(sources[0], dict):
        runs = {"": list(sources)}
    else:
        runs = {Path(s).parent.name or str(s): _rows_of(s) for s in sources}
    if not 0 <= smooth < 1:
        raise CM3LeonError(f"smooth must be in [0, 1), got {smooth}")
    fig = new_figure()
    ax = fig.add_subplot(1, 1, 1)
    plotted = 0
    for label, rows in runs.items():
        for key in keys:
            pts = [(r[x_key], r[key]) for r in rows if x_key in r and isinstance(r.get(key), (int, float))]
            if not pts:
                continue
            xs, ys = zip(*pts)
            if smooth:
                acc, sm = ys[0], []
                for y in ys:
                    acc = smooth * acc + (1 - smooth) * y
                    sm.append(acc)
                ys = sm
            name = f"{label} {key}".strip() if len(runs) > 1 or not label else f"{key}"
            ax.plot(xs, ys, label=name, linewidth=1.5)
            plotted += 1
    if not plotted:
        raise CM3LeonError(f"no rows with {x_key!r} and any of {list(keys)} to plot")
    ax.set_xlabel(x_key)
    ax.set_ylabel(", ".join(keys))
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, out_png)


def plot_xy(
    rows: Sequence[Mapping[str, Any]],
    x: str,
    y: str | Sequence[str],
    out_png: str | os.PathLike,
    series: str | None = None,
    title: str | None = None,
    xlabel: str | None = None,
    ylabel: str | None = None,
    logx: bool = False,
    yerr_suffix: str | None = None,
) -> Path:
    """A metric against a setting (e.g. accuracy vs CFG scale α, vs number of samples N):
    one line per `y` key, or per distinct value of the `series` field (e.g. the decoder).
    yerr_suffix: rows holding `<key><suffix>` (e.g. "_std", a spread over seeds) draw it as
    error bars."""
    ys = [y] if isinstance(y, str) else list(y)
    groups: dict[str, list[Mapping]] = {}
    for r in rows:
        label = str(r.get(series, "")) if series else ""
        groups.setdefault(label, []).append(r)
    fig = new_figure()
    ax = fig.add_subplot(1, 1, 1)
    plotted = 0
    for label, rs in groups.items():
        for key in ys:
            err = f"{key}{yerr_suffix}" if yerr_suffix else None
            pts = sorted((r[x], r[key], r.get(err, 0.0) if err else 0.0)
                         for r in rs if x in r and isinstance(r.get(key), (int, float)))
            if not pts:
                continue
            xs_, ys_, es_ = zip(*pts)
            name = " ".join(s for s in (f"{series}={label}" if series else "", key if len(ys) > 1 else "") if s)
            if any(isinstance(e, (int, float)) and e > 0 for e in es_):
                ax.errorbar(xs_, ys_, yerr=[e if isinstance(e, (int, float)) else 0.0 for e in es_], marker="o",
                            capsize=3, label=name or key)
            else:
                ax.plot(xs_, ys_, marker="o", label=name or key)
            plotted += 1
    if not plotted:
        raise CM3LeonError(f"no rows with {x!r} and any of {ys} to plot")
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or ", ".join(ys))
    if logx:
        ax.set_xscale("log")
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if plotted > 1 or series:
        ax.legend(fontsize=8)
    return save_figure(fig, out_png)


# ---------------------------------------------------------------------------------------------
# Tables


def format_value(v: Any, floatfmt: str = ".4g") -> str:
    """A table cell: floats with `floatfmt`, None as an em dash, everything else str()."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else format(v, floatfmt)
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        return format_value(v.item(), floatfmt)
    return str(v)


def _columns(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None) -> list[str]:
    if columns is not None:
        return list(columns)
    cols: list[str] = []
    for r in rows:
        cols.extend(k for k in r if k not in cols)
    return cols


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, floatfmt: str = ".4g") -> str:
    """A GitHub-flavoured markdown table; columns default to the keys in first-seen order."""
    cols = _columns(rows, columns)
    if not cols:
        raise CM3LeonError("markdown_table: no columns")

    def cell(v: Any) -> str:
        return format_value(v, floatfmt).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The HTML report


@dataclass
class Text:
    """Paragraphs of plain text (blank lines separate paragraphs); `code=True` keeps it verbatim."""

    text: str
    code: bool = False


@dataclass
class Table:
    rows: Sequence[Mapping[str, Any]]
    columns: Sequence[str] | None = None
    caption: str = ""
    floatfmt: str = ".4g"


@dataclass
class Image:
    """One picture: a PIL image, a PNG/JPEG path (e.g. a plot) or PNG bytes."""

    image: Any
    caption: str = ""
    width: int | None = None  # display width in CSS px (default: natural, up to the page width)


@dataclass
class Grid:
    """Images side by side with a caption each and an optional pass / fail mark each."""

    images: Sequence[Any]
    captions: Sequence[str] | None = None
    marks: Sequence[bool | None] | None = None
    caption: str = ""
    ncol: int = 8
    cell_px: int = 96  # display size of each image (small images are scaled up, pixelated)


@dataclass
class Section:
    title: str
    blocks: list = field(default_factory=list)


_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0 auto;
max-width:1100px;padding:24px;color:#1f2328;line-height:1.5}
h1{font-size:1.7em;border-bottom:1px solid #d0d7de;padding-bottom:.3em}
h2{font-size:1.3em;margin-top:1.6em;border-bottom:1px solid #d0d7de;padding-bottom:.2em}
nav ol{columns:2;font-size:.95em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #d0d7de;padding:4px 10px;text-align:left;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums}
th{background:#f6f8fa}
caption,figcaption{color:#59636e;font-size:.9em;text-align:left;padding:4px 0}
figure{margin:.8em 0}
img{max-width:100%}
pre{background:#f6f8fa;padding:10px;overflow-x:auto;font-size:.88em}
.grid{display:grid;gap:8px;margin:.6em 0}
.grid figure{margin:0}
.grid img{width:100%;image-rendering:pixelated;border:3px solid transparent;box-sizing:border-box}
.grid img.pass{border-color:#2ea043}
.grid img.fail{border-color:#da3633}
.grid figcaption{font-size:.78em;line-height:1.25;word-break:break-word}
.meta{color:#59636e;font-size:.9em}
@media print{body{max-width:none;padding:0}h2{break-after:avoid}
figure,table,.grid{break-inside:avoid}nav{display:none}}
"""


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _render_block(b: Any) -> str:
    e = html.escape
    if isinstance(b, str):
        b = Text(b)
    if isinstance(b, Text):
        if b.code:
            return f"<pre>{e(b.text)}</pre>"
        paras = [p.strip() for p in b.text.split("\n\n") if p.strip()]
        return "".join(f"<p>{e(p)}</p>" for p in paras)
    if isinstance(b, Table):
        cols = _columns(b.rows, b.columns)
        head = "".join(f"<th>{e(str(c))}</th>" for c in cols)
        body = "".join(
            "<tr>"
            + "".join(
                f'<td{" class=num" if _is_number(r.get(c)) else ""}>{e(format_value(r.get(c), b.floatfmt))}</td>'
                for c in cols
            )
            + "</tr>"
            for r in b.rows
        )
        cap = f"<caption>{e(b.caption)}</caption>" if b.caption else ""
        return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    if isinstance(b, Image):
        style = f' style="width:{int(b.width)}px"' if b.width else ""
        cap = f"<figcaption>{e(b.caption)}</figcaption>" if b.caption else ""
        return f'<figure><img src="{png_data_uri(b.image)}" alt="{e(b.caption)}"{style}>{cap}</figure>'
    if isinstance(b, Grid):
        n = len(b.images)
        for name, seq in (("captions", b.captions), ("marks", b.marks)):
            if seq is not None and len(seq) != n:
                raise CM3LeonError(f"Grid: {n} images but {len(seq)} {name}")
        cells = []
        for i, im in enumerate(b.images):
            mark = b.marks[i] if b.marks is not None else None
            cls = "" if mark is None else (' class="pass"' if mark else ' class="fail"')
            cap = b.captions[i] if b.captions is not None else ""
            label = ("✓ " if mark else "✗ ") if mark is not None else ""
            fc = f"<figcaption>{e(label + cap)}</figcaption>" if (cap or label) else ""
            cells.append(f'<figure><img src="{png_data_uri(im)}" alt="{e(cap)}"{cls}>{fc}</figure>')
        style = f"grid-template-columns:repeat({max(1, min(b.ncol, n))},minmax(0,{b.cell_px}px))"
        cap = f"<figcaption>{e(b.caption)}</figcaption>" if b.caption else ""
        return f'<figure><div class="grid" style="{style}">{"".join(cells)}</div>{cap}</figure>'
    raise CM3LeonError(f"unknown report block type: {type(b).__name__} (expected Text, Table, Image or Grid)")


def render_html(sections: Iterable[Section], title: str = "cm3leon report", meta: str = "") -> str:
    """The report as one HTML string (see build_report)."""
    sections = list(sections)
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
    ]
    if meta:
        parts.append(f'<p class="meta">{e(meta)}</p>')
    if len(sections) > 1:
        items = "".join(f'<li><a href="#s{i}">{e(s.title)}</a></li>' for i, s in enumerate(sections))
        parts.append(f"<nav><ol>{items}</ol></nav>")
    for i, s in enumerate(sections):
        if not isinstance(s, Section):
            raise CM3LeonError(f"report section {i}: expected Section, got {type(s).__name__}")
        parts.append(f'<section id="s{i}"><h2>{e(s.title)}</h2>')
        parts.extend(_render_block(b) for b in s.blocks)
        parts.append("</section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def build_report(
    out_html: str | os.PathLike, sections: Iterable[Section], title: str = "cm3leon report", meta: str = ""
) -> Path:
    """Write a self-contained HTML report (images embedded as base64 PNG, inline CSS, no
    external references) atomically to `out_html`; returns its path."""
    out_html = Path(out_html)
    write_text(out_html, render_html(sections, title=title, meta=meta))
    return out_html
