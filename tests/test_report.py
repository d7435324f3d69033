"""Report building blocks: grids, plots, tables and the self-contained HTML report."""

from __future__ import annotations

import base64
import io
import json
import re

import pytest
from PIL import Image as PILImage

from cm3leon.errors import CM3LeonError
from cm3leon.eval.report import (
    Grid,
    Image,
    Section,
    Table,
    Text,
    build_report,
    image_grid,
    markdown_table,
    plot_curves,
    plot_xy,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _solid(color, size=16):
    return PILImage.new("RGB", (size, size), color)


def test_image_grid_layout_and_marks():
    imgs = [_solid((0, 0, 255)) for _ in range(5)]
    g = image_grid(imgs, nrow=3, marks=[True, False, None, True, True], cell_size=32, pad=2)
    # 3 columns x 2 rows of 32 px cells with 2 px padding
    assert g.size == (3 * 32 + 4 * 2, 2 * 32 + 3 * 2)
    assert g.getpixel((2, 2)) == (46, 160, 67)  # first cell: green frame (pass)
    assert g.getpixel((2 + 34, 2)) == (218, 54, 51)  # second: red frame (fail)
    assert g.getpixel((2 + 68, 2)) == (0, 0, 255)  # third: no mark, image pixel
    assert g.getpixel((2 + 16, 2 + 16)) == (0, 0, 255)  # small image scaled up to fill the cell


def test_image_grid_captions_add_height_and_validate_lengths():
    imgs = [_solid((255, 0, 0)) for _ in range(2)]
    plain = image_grid(imgs, nrow=2, cell_size=40)
    captioned = image_grid(imgs, nrow=2, cell_size=40, captions=["a red square", "a very long caption " * 5])
    assert captioned.size[0] == plain.size[0] and captioned.size[1] > plain.size[1]
    with pytest.raises(CM3LeonError, match="2 images but 1 captions"):
        image_grid(imgs, captions=["x"])


def test_plot_curves_and_xy_write_pngs(tmp_path):
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.parent.mkdir()
    metrics.write_text("".join(json.dumps({"step": s, "loss": 5.0 / (s + 1)}) + "\n" for s in range(20)))
    runs = {"pretrain": metrics, "sft": [{"step": 0, "loss": 1.0}, {"step": 5, "loss": 0.5}]}
    out = plot_curves(runs, ["loss"], tmp_path / "loss.png", smooth=0.5)
    assert out.read_bytes().startswith(PNG_MAGIC)
    rows = [{"cfg": a, "acc": 0.5 + 0.1 * a, "decoder": d} for a in (1, 2, 3) for d in ("topp", "cdk")]
    out = plot_xy(rows, "cfg", "acc", tmp_path / "cfg.png", series="decoder")
    assert out.read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(CM3LeonError, match="no rows"):
        plot_xy(rows, "cfg", "fid", tmp_path / "none.png")


def test_markdown_table_formats_values():
    rows = [{"model": "tiny", "FID": 12.3456789, "ok": True}, {"model": "a|b", "FID": None}]
    md = markdown_table(rows, floatfmt=".3f")
    lines = md.strip().splitlines()
    assert lines[0] == "| model | FID | ok |"
    assert lines[1] == "|---|---|---|"
    assert lines[2] == "| tiny | 12.346 | yes |"
    assert lines[3] == "| a\\|b | — | — |"


def test_build_report_is_self_contained(tmp_path):
    plot = plot_xy([{"n": 1, "acc": 0.2}, {"n": 4, "acc": 0.6}], "n", "acc", tmp_path / "n.png")
    sections = [
        Section("Summary", [Text("First paragraph.\n\nSecond <paragraph> & more."), Table(
            [{"metric": "CIDEr-D", "value": 0.4321}, {"metric": "VQA", "value": 47.6}], caption="Scores")]),
        Section("Samples", [Grid([_solid((255, 0, 0)), _solid((0, 255, 0))], captions=["a red square", "a green square"],
                                 marks=[True, False], caption="Generated")]),
        Section("Best-of-N", [Image(plot, caption="accuracy vs N"), Text("cm3leon pipeline --out runs/x", code=True)]),
    ]  # fmt: skip
    out = build_report(tmp_path / "report.html", sections, title="Demo report", meta="seed 0")
    html = out.read_text(encoding="utf-8")
    for title in ("Summary", "Samples", "Best-of-N", "Demo report"):
        assert f">{title}<" in html
    # values, captions and escaped text are present
    for s in ("CIDEr-D", "0.4321", "47.6", "a red square", "✓ a red square", "✗ a green square", "accuracy vs N",
              "Second &lt;paragraph&gt; &amp; more.", "cm3leon pipeline --out runs/x"):  # fmt: skip
        assert s in html, s
    # nothing external: no URLs, no linked stylesheets or scripts
    assert "http://" not in html and "https://" not in html
    assert "<link" not in html and "<script" not in html
    # every image is an embedded PNG that decodes
    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(uris) == 3
    for b64 in uris:
        data = base64.b64decode(b64)
        assert data.startswith(PNG_MAGIC)
        PILImage.open(io.BytesIO(data)).verify()
    assert 'class="pass"' in html and 'class="fail"' in html


def test_build_report_rejects_missing_image_and_unknown_block(tmp_path):
    with pytest.raises(CM3LeonError, match="image not found"):
        build_report(tmp_path / "r.html", [Section("x", [Image(tmp_path / "missing.png")])])
    with pytest.raises(CM3LeonError, match="unknown report block"):
        build_report(tmp_path / "r.html", [Section("x", [42])])
    assert not (tmp_path / "r.html").exists()  # nothing half-written
