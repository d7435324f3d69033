"""The run report: report.html built from a pipeline run folder (fake, tiny, made here)."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from cm3leon.errors import CM3LeonError
from cm3leon.eval.report import Grid
from cm3leon.run.quality_bar import QualityBar, quality_bar_checks, quality_bar_limits
from cm3leon.run.report import SECTION_TITLES, build_run_report, run_report_sections

NUM_RECORDS = 12


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")


def _jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _png(path: Path, color=(200, 30, 30), size=32) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.new("RGB", (size, size), color).save(path)


def _done(run: Path, stage: str, seconds: float, result=None) -> None:
    _write(run / stage / ".done", {"stage": stage, "seconds": seconds, "result": result or {}})


def _eval_metrics(t2i_single: float, caption_correct: float, vqa_percent: float, done_rate: float = 0.4) -> dict:
    return {
        "model": "sft/model", "data": "data", "split": "test", "num_prompts": 20, "num_images": 20,
        "decoding": {"method": "cfg", "cfg_scale": 3.0}, "seed": 0,
        "metrics": {
            "shapes": {"colour": 0.9, "shape": 0.8, "both": 0.75, "size": 0.5, "position": 0.4, "all": 0.3, "n": 20,
                       "unparsed": 0, "by_num_objects": {"1": {"both": t2i_single, "n": 12},
                                                         "2": {"both": 0.5, "n": 8}}},
            "cider": {"CIDEr-D": 1.2, "BLEU-4": 0.4, "n": 20,
                      "shapes": {"correct": caption_correct, "colour": 0.9, "shape": 0.9, "n": 20}},
            "vqa": {"vqa_accuracy": vqa_percent, "n": 30, "by_type": {"color": {"vqa_accuracy": 80.0, "n": 10}}},
            "edit": {"done_rate": done_rate, "n": 10, "do_nothing_baseline": 0.1},
        },
    }


def _vq_dir(path: Path):
    from cm3leon.tokenizers.image import VQModel, get_preset

    torch.manual_seed(0)
    vq = VQModel(get_preset("tiny")).eval()
    vq.save_pretrained(path)
    return vq


def _codes_dir(path: Path):
    from cm3leon.data.codes import CodeShardWriter

    rng = np.random.default_rng(0)
    w = CodeShardWriter(path, grid=(4, 4), codebook_size=64, text_vocab_size=100, shard_size=5)
    texts = [f"a {c} {s}" for c, s in zip(["red", "blue", "green", "yellow"] * 3, ["circle", "square", "triangle"] * 4)]
    for i, t in enumerate(texts):
        w.add(f"{i:06d}", "test" if i >= 8 else "train", t, [1, 2, 3], rng.integers(0, 64, 16))
    w.close()
    # test records 8..11 retrieve train records; record 9 has one slot empty (-1)
    nb = np.full((NUM_RECORDS, 2), -1, dtype=np.int64)
    for q in range(8, NUM_RECORDS):
        nb[q] = [q - 8, (q - 4) if q != 9 else -1]
    np.save(path / "neighbors.npy", nb)
    _write(path / "neighbors.json", {"k": 2, "num_records": NUM_RECORDS, "rows_with_k": 3,
                                     "skipped": {"self": 4, "threshold": 0, "duplicate": 1, "ineligible": 0}})
    return texts, nb


def _minimal_run(run: Path, t2i: float, captions: float, vqa_percent: float) -> None:
    _write(run / "pipeline.json", {"stages": {}, "seconds": 1.0, "preset": "quick", "quick": True})
    _write(run / "generate" / "summary.json", {"methods": {"cfg": {"accuracy_both": 0.1, "n": 16}}, "prompts": []})
    _write(run / "eval" / "sft" / "metrics.json", _eval_metrics(t2i, captions, vqa_percent))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """A finished run folder with every stage's files (no ablations)."""
    run = tmp_path_factory.mktemp("run")
    stages = ["text_tokenizer", "image_tokenizer", "tokenize", "retrieval", "pretrain", "sft", "generate", "eval"]
    _write(run / "pipeline.json", {"data": str(run / "data"), "out": str(run), "preset": "demo", "quick": False,
                                   "seconds": 321.0,
                                   "stages": {s: {"status": "done", "seconds": 10.0 + i}
                                              for i, s in enumerate(stages)}})
    _write(run / "data" / "dataset.json", {"name": "shapes", "num": 600, "size": 32, "max_objects": 1,
                                           "splits": {"train": 480, "val": 60, "test": 60}})
    _write(run / "data" / ".done", {"stage": "synth"})
    _done(run, "text_tokenizer", 3.0, {"vocab_size": 512, "tokens_per_caption": 7.5})

    vq = _vq_dir(run / "image_tokenizer")
    _write(run / "image_tokenizer" / "metrics.json", {"psnr_db": 27.5, "val_l1": 0.02, "codebook_usage": 0.9,
                                                      "codes_used": 58, "perplexity": 40.1, "checker_recovered": 0.93})
    _png(run / "image_tokenizer" / "reconstructions.png", (10, 120, 10), size=64)
    _done(run, "image_tokenizer", 60.0)

    texts, nb = _codes_dir(run / "tokenize")
    _done(run, "tokenize", 2.0)
    _write(run / "retrieval" / "retriever" / "metrics.json", {
        "text_to_image_recall@1": 0.81, "text_to_image_recall@5": 0.97, "image_to_text_recall@1": 0.79,
        "image_to_text_recall@5": 0.96, "num_pairs": 60, "eval_split": "test"})
    _done(run, "retrieval", 30.0)

    _jsonl(run / "pretrain" / "metrics.jsonl", [
        *({"step": s, "loss": 5.0 - s / 10, "lr": 1e-3, "tokens_per_s": 1000.0 + s} for s in range(1, 11)),
        {"step": 10, "val_loss": 4.2}])
    _write(run / "pretrain" / "train_summary.json", {"steps": 10, "tokens_seen": 10240, "tokens_per_second": 1010.0,
                                                     "train_seconds": 10.1, "num_parameters": 12345,
                                                     "final_train_loss": 4.0, "final_val_loss": 4.2, "device": "cpu"})
    _done(run, "pretrain", 100.0)
    _jsonl(run / "sft" / "metrics.jsonl",
           [{"step": s, "loss": 3.0 - s / 10, "tokens_per_s": 900.0} for s in range(1, 6)])
    _write(run / "sft" / "sft_summary.json", {"stage": "sft", "train_loss_before": 3.1, "train_loss_after": 2.5,
                                              "val_loss_before": 3.2, "val_loss_after": 2.7})
    _done(run, "sft", 50.0)

    for method, colors in (("topp", [(220, 30, 30), (30, 30, 220)]), ("cfg", [(220, 30, 30), (220, 30, 30)])):
        rows = []
        for i, c in enumerate(colors):
            _png(run / "generate" / method / f"{i:03d}.png", c)
            ok = c == (220, 30, 30)
            # the mark is colour and shape right (what accuracy_both counts), not all_ok (also size, position)
            rows.append({"prompt": "a red circle", "file": f"{i:03d}.png", "method": method, "score": 0.5,
                         "checker": {"colour_ok": ok, "shape_ok": True, "all_ok": ok and i == 0}})
        _jsonl(run / "generate" / method / "samples.jsonl", rows)
    _write(run / "generate" / "summary.json", {"methods": {"topp": {"accuracy_both": 0.5, "n": 2},
                                                           "cfg": {"accuracy_both": 0.9, "n": 2}},
                                               "prompts": ["a red circle"]})
    _done(run, "generate", 20.0)

    for which, (t2i, cap, vqa) in (("sft", (0.92, 0.95, 91.0)), ("pretrain", (0.6, 0.1, 5.0))):
        d = run / "eval" / which
        _write(d / "metrics.json", _eval_metrics(t2i, cap, vqa))
        for name in ("grid_text_to_image", "grid_captioning", "grid_vqa", "grid_edit"):
            _png(d / f"{name}.png", (40, 40, 40), size=96)
        _jsonl(d / "samples.jsonl", [
            {"task": "captioning", "source": "000001", "caption": "a red circle", "references": ["a red circle"],
             "verdict": {"colour_ok": True, "shape_ok": True, "all_ok": True}},
            {"task": "vqa", "source": "images/000001.png", "question": "What colour is the circle?",
             "answer": "red", "references": ["red"], "type": "color", "accuracy": 1.0}])
    def row(setting, method, cfg, k, both):  # a sweep row over seeds 0, 1, 2
        return {"setting": setting, "method": method, "cfg_scale": cfg, "num_retrieved": k, "both": both,
                "both_std": 0.05, "both_seeds": [both - 0.05, both, both + 0.05], "seconds": 1.0,
                "seconds_per_image": 0.25}

    _write(run / "eval" / "sweep" / "sweep.json", {
        "num_prompts": 4, "scorer": None, "metrics": ["both"], "plots": ["sweep_both_vs_cfg.png"], "notes": [],
        "seeds": [0, 1, 2],
        "rows": [row("TopP", "topp", None, None, 0.5), row("TopP+CFG a=3", "cfg", 3.0, None, 0.9),
                 row("TopP+CFG a=3 k=2", "cfg", 3.0, 2, 0.7), row("best-of-4", "best_of_n", 3.0, None, 0.95)]})
    _write(run / "eval" / "sweep_pretrain" / "sweep.json", {
        "num_prompts": 4, "scorer": None, "metrics": ["both"], "plots": [], "notes": [], "seeds": [0, 1, 2],
        "rows": [row("TopP+CFG a=3", "cfg", 3.0, None, 0.4), row("TopP+CFG a=3 k=2", "cfg", 3.0, 2, 0.6)]})
    _png(run / "eval" / "sweep" / "sweep_both_vs_cfg.png", (0, 0, 0), size=40)
    _done(run, "eval", 40.0)
    return {"run": run, "vq": vq, "texts": texts, "neighbors": nb}


def _sections(html: str) -> dict[str, str]:
    parts = re.findall(r"<section id=\"s\d+\"><h2>(.*?)</h2>(.*?)</section>", html, flags=re.S)
    return dict(parts)


def test_full_report_has_every_section_and_only_embedded_decodable_images(full_run, tmp_path):
    out = build_run_report(full_run["run"], tmp_path / "r.html")
    html = out.read_text(encoding="utf-8")
    sections = _sections(html)
    assert list(sections) == list(SECTION_TITLES)
    assert "could not be built" not in html
    assert not re.search(r"https?://", html), "the report must not reference anything outside the file"
    srcs = re.findall(r'src="([^"]*)"', html)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    for s in srcs:
        PILImage.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1]))).verify()
    # generated samples: one grid per method with checker marks (topp: one pass, one fail)
    t2i = sections["Text → image"]
    assert "TopP + CFG" in t2i and "90.0% of 2 prompts" in t2i
    assert t2i.count('class="pass"') == 3 and t2i.count('class="fail"') == 1
    assert "Not run" in sections["Ablations"]
    assert "recall@5" in sections["Retrieval"] and "query: " in sections["Retrieval"]
    assert "before SFT" in sections["Captions and VQA"] and "What colour is the circle?" in sections["Captions and VQA"]
    assert sections["Training"].count("<img") == 3  # pretrain loss, SFT loss, throughput
    assert "val_loss_after" in sections["Training"]
    assert "sweep both vs cfg" in sections["Decoding sweep"]
    sweep = sections["Decoding sweep"]
    # the paper's claims, each figure with its spread over the seeds: retrieval k after and
    # before SFT, the best of each decoding family, and the same setting before vs after SFT
    assert "The paper&#x27;s claims" in sweep or "The paper's claims" in sweep
    for figure in ("0.9 ± 0.05", "0.7 ± 0.05", "0.4 ± 0.05", "0.6 ± 0.05", "0.95 ± 0.05"):
        assert figure in sweep, figure
    assert sweep.count("retrieval k") == 4 and sweep.count(">SFT<") == 2
    assert "PSNR (dB)" in sections["Image tokenizer"] and "27.5" in sections["Image tokenizer"]
    assert "Quality bar met on every criterion" in sections["Summary"]


def test_retrieval_examples_show_neighbours_decoded_with_the_run_vq(full_run):
    from cm3leon.data.codes import CodeDataset
    from cm3leon.tokenizers.image import tensor_to_images

    sections = run_report_sections(full_run["run"])
    grid = next(b for b in sections[SECTION_TITLES.index("Retrieval")].blocks if isinstance(b, Grid))
    texts, nb = full_run["texts"], full_run["neighbors"]
    queries = [8, 9, 10, 11]  # the test records, each with a neighbour
    assert grid.ncol == 3 and len(grid.images) == 3 * len(queries)
    expected_caps = []
    for q in queries:
        expected_caps += [f"query: {texts[q]}"] + [f"retrieved {j + 1}: {texts[d]}" if d >= 0 else
                                                   f"retrieved {j + 1}: (none)" for j, d in enumerate(nb[q])]
    assert list(grid.captions) == expected_caps
    ds = CodeDataset(full_run["run"] / "tokenize")
    want = tensor_to_images(full_run["vq"].decode(torch.as_tensor(ds.get(int(nb[8][1])).image_codes[None])))[0]
    assert np.array_equal(np.asarray(grid.images[2]), np.asarray(want))  # query 8's second neighbour
    assert np.asarray(grid.images[5]).std() == 0  # query 9's empty slot: a blank cell


@pytest.mark.parametrize("t2i,captions,vqa,met", [
    (0.95, 0.90, 90.0, True),  # on or above every bar
    (0.89, 0.50, 89.5, False),  # below every bar
])
def test_quality_bar_verdicts(tmp_path, t2i, captions, vqa, met):
    _minimal_run(tmp_path, t2i, captions, vqa)
    checks = quality_bar_checks(tmp_path)[:3]  # the fourth, the weakest VQA kind, has its own test
    assert [c["met"] for c in checks] == [met] * 3
    assert checks[2]["value"] == pytest.approx(vqa / 100)  # VQA accuracy is stored in percent
    assert checks[0]["source"].startswith("eval/sft/metrics.json")  # the evaluation, not the report's grid
    html = build_run_report(tmp_path).read_text(encoding="utf-8")
    summary = _sections(html)["Summary"]
    if met:
        assert "Quality bar met on every criterion" in summary and "NOT met" not in summary
    else:
        assert "Quality bar NOT met" in summary and f"{100 * t2i:.1f}%" in summary


def test_quality_bar_text_to_image_figure_has_one_producer_the_evaluation(tmp_path):
    _minimal_run(tmp_path, 0.05, 0.8, 70.0)  # the report grid (generate/summary.json) says 10% right
    first = quality_bar_checks(tmp_path)[0]
    assert (first["value"], first["n"]) == (0.05, 12) and first["source"].startswith("eval/sft/metrics.json")
    (tmp_path / "eval" / "sft" / "metrics.json").unlink()  # no evaluation: not measured, whatever the grid says
    first = quality_bar_checks(tmp_path)[0]
    assert first["met"] is None and first["value"] is None


def test_quality_bar_judges_text_to_image_with_the_runs_own_decoding_method(tmp_path):
    _minimal_run(tmp_path, 0.98, 0.95, 70.0)
    ev = _eval_metrics(0.98, 0.95, 70.0)
    ev["decoding"] = {"method": "best_of_n", "num_candidates": 8}  # the long preset draws best-of-8
    _write(tmp_path / "eval" / "sft" / "metrics.json", ev)
    first = quality_bar_checks(tmp_path)[0]
    assert first["met"] is True and first["value"] == 0.98 and first["source"].endswith("best_of_n")


@pytest.mark.parametrize("existence,met", [(80.0, True), (40.0, False)])
def test_quality_bar_judges_the_weakest_vqa_question_kind_where_the_data_names_kinds(tmp_path, existence, met):
    _minimal_run(tmp_path, 0.98, 0.95, 91.0)
    ev = _eval_metrics(0.98, 0.95, 91.0)
    del ev["metrics"]["vqa"]["by_type"]
    _write(tmp_path / "eval" / "sft" / "metrics.json", ev)
    assert len(quality_bar_checks(tmp_path)) == 3  # questions without kinds: no such row
    ev["metrics"]["vqa"]["by_type"] = {"color": {"vqa_accuracy": 100.0, "n": 20},
                                       "existence": {"vqa_accuracy": existence, "n": 20}}
    _write(tmp_path / "eval" / "sft" / "metrics.json", ev)
    last = quality_bar_checks(tmp_path)[-1]
    assert last["criterion"] == "VQA accuracy of every question kind" and last["met"] is met
    assert last["value"] == pytest.approx(existence / 100) and last["n"] == 20 and last["source"].endswith("existence")


def test_quality_bar_thresholds_are_config(tmp_path):
    _minimal_run(tmp_path, 0.85, 0.85, 75.0)
    checks = quality_bar_checks(tmp_path, QualityBar(text_to_image=0.9, captions=0.8, vqa=0.8))
    assert [c["met"] for c in checks] == [False, True, False, True]  # the only kind: colour, 80%


@pytest.mark.parametrize("scenes,edits,met", [((0.9, 0.4), 0.6, True), ((0.6, 0.4), 0.45, False),
                                               ((0.6, 0.4), 0.6, False), ((0.9, 0.4), 0.45, False)])
def test_a_long_preset_run_is_judged_by_the_long_bar(tmp_path, scenes, edits, met):
    """A run made with `--preset long` is judged by that preset's bar: single-object prompts
    97%, captions 95%, scenes of 2-3 objects (exact scenes, pooled) 60%, edits 50%, and no VQA
    row (VQA 40% here would miss the demo's bar)."""
    _minimal_run(tmp_path, 0.98, 0.96, 40.0)
    _write(tmp_path / "pipeline.json", {"stages": {}, "seconds": 1.0, "preset": "long", "quick": False})
    ev = _eval_metrics(0.98, 0.96, 40.0, done_rate=edits)
    ev["metrics"]["shapes"]["scene"] = {"by_num_objects": {"1": {"exact_scene": 0.2, "n": 50},
                                                           "2": {"exact_scene": scenes[0], "n": 30},
                                                           "3": {"exact_scene": scenes[1], "n": 10}}}
    _write(tmp_path / "eval" / "sft" / "metrics.json", ev)
    checks = {c["criterion"].split(" (")[0]: c for c in quality_bar_checks(tmp_path)}
    assert list(checks) == ["single-object prompts right", "captions naming the right colour and shape",
                            "prompts of 2-3 objects right", "edits done"]
    assert [c["bar"] for c in checks.values()] == ["≥ 97%", "≥ 95%", "≥ 60%", "≥ 50%"]
    pooled = (30 * scenes[0] + 10 * scenes[1]) / 40  # one-object scenes left out
    assert checks["prompts of 2-3 objects right"]["value"] == pytest.approx(pooled)
    assert checks["prompts of 2-3 objects right"]["n"] == 40 and checks["edits done"]["n"] == 10
    assert (checks["prompts of 2-3 objects right"]["met"] and checks["edits done"]["met"]) is met
    assert checks["prompts of 2-3 objects right"]["met"] is (pooled >= 0.60)  # each row on its own figure
    assert checks["edits done"]["met"] is (edits >= 0.50)
    summary = _sections(build_run_report(tmp_path).read_text(encoding="utf-8"))["Summary"]
    assert ("Quality bar met on every criterion" in summary) is met and "VQA accuracy" not in summary
    _write(tmp_path / "pipeline.json", {"stages": {}, "seconds": 1.0, "preset": "demo", "quick": False})
    assert [c["criterion"] for c in quality_bar_checks(tmp_path)][2:] == ["VQA accuracy",
                                                                         "VQA accuracy of every question kind"]


@pytest.mark.parametrize("ceiling,reachable", [(0.70, False), (0.92, True)])
def test_a_missed_bar_comes_with_what_bounds_it_measured_in_the_run(tmp_path, ceiling, reachable):
    _minimal_run(tmp_path, 0.05, 0.40, 76.0)
    ev = _eval_metrics(0.05, 0.40, 76.0)
    ev["metrics"]["shapes"]["by_num_objects"]["1"] = {"colour": 0.31, "shape": 0.10, "both": 0.05, "n": 100}
    ev["metrics"]["cider"]["shapes"].update(colour=0.96, shape=0.43)
    ev["metrics"]["vqa"]["by_type"] = {"color": {"vqa_accuracy": 100.0, "n": 20}, "shape": {"vqa_accuracy": 30.0, "n": 20}}
    _write(tmp_path / "eval" / "sft" / "metrics.json", ev)
    _write(tmp_path / "image_tokenizer" / "metrics.json", {"checker_recovered": 0.6, "tokens_per_image": 64,
                                                           "checker_recovered_colour_shape": ceiling})
    _write(tmp_path / "pretrain" / "train_summary.json", {"tokens_seen": 2_662_400, "steps": 650, "num_parameters": 3_637_248})
    _write(tmp_path / "sft" / "train_summary.json", {"tokens_seen": 1_843_200, "steps": 450})
    limits = quality_bar_limits(tmp_path)
    assert len(limits) == 4
    vq, attrs, kinds, lm = limits
    assert kinds == "VQA question kinds below the VQA bar: shape 30.0% (n=20)."  # colour (100%) is not
    assert f"{100 * ceiling:.1f}% of held-out objects" in vq  # colour+shape, not the stricter exact match
    assert ("no language model can then reach" in vq) == (not reachable)
    assert attrs.startswith("Shape is the weaker attribute in every task")
    assert "captions colour 96.0%, shape 43.0%" in attrs and "VQA colour 100.0%, shape 30.0%" in attrs
    assert "2.7M pretraining tokens (650 steps)" in lm and "1.8M SFT tokens (450 steps)" in lm
    assert "What bounds these figures" in _sections(build_run_report(tmp_path).read_text(encoding="utf-8"))["Summary"]


def test_no_limits_section_when_every_bar_is_met(tmp_path):
    _minimal_run(tmp_path, 0.95, 0.95, 92.0)
    _write(tmp_path / "image_tokenizer" / "metrics.json", {"checker_recovered_colour_shape": 0.97})
    assert "What bounds" not in _sections(build_run_report(tmp_path).read_text(encoding="utf-8"))["Summary"]
    assert quality_bar_limits(tmp_path)  # the findings exist; the report shows them only for a missed bar


def test_missing_stages_give_not_run_notes(tmp_path):
    _write(tmp_path / "pipeline.json", {"stages": {"text_tokenizer": {"status": "done", "seconds": 2.0},
                                                   "image_tokenizer": {"status": "not built yet"}}, "seconds": 2.0})
    _done(tmp_path, "text_tokenizer", 2.0, {"vocab_size": 300})
    html = build_run_report(tmp_path).read_text(encoding="utf-8")
    sections = _sections(html)
    assert list(sections) == list(SECTION_TITLES)
    assert "could not be built" not in html
    for title in SECTION_TITLES[1:9]:
        assert "Not run" in sections[title], title
    assert sections["Summary"].count("<td>not measured</td>") == 3
    assert "Quality bar not measured" in sections["Summary"]
    assert "First stage not finished: image_tokenizer" in sections["Summary"]
    assert "not built yet" in sections["Stage timings"]


def test_unreadable_file_is_reported_in_its_section_only(full_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(full_run["run"], run)
    (run / "image_tokenizer" / "metrics.json").write_text("{not json", encoding="utf-8")
    sections = _sections(build_run_report(run).read_text(encoding="utf-8"))
    assert "could not be built" in sections["Image tokenizer"] and "metrics.json" in sections["Image tokenizer"]
    assert "could not be built" not in sections["Training"]


def test_not_a_run_folder_is_an_error(tmp_path):
    with pytest.raises(CM3LeonError, match="not a pipeline run folder"):
        build_run_report(tmp_path)
    with pytest.raises(CM3LeonError, match="not a folder"):
        build_run_report(tmp_path / "missing")


def test_cli_report_writes_the_file(tmp_path, capsys):
    from cm3leon.cli import main

    _minimal_run(tmp_path, 0.9, 0.9, 80.0)
    out = tmp_path / "out" / "rep.html"
    assert main(["report", "--run", str(tmp_path), "--out", str(out)]) == 0
    assert out.is_file() and str(out) in capsys.readouterr().out
    assert main(["report", "--run", str(tmp_path / "nothing")]) == 2


def test_summary_time_adds_up_the_stages_of_a_resumed_run(tmp_path):
    _minimal_run(tmp_path, 0.95, 0.95, 92.0)  # pipeline.json: the last pass took 1 s
    for stage, seconds in (("pretrain", 300.0), ("sft", 200.0)):
        _write(tmp_path / stage / ".done", {"stage": stage, "seconds": seconds, "result": {}})
    summary = _sections(build_run_report(tmp_path).read_text(encoding="utf-8"))["Summary"]
    assert "stage times add up to 8.3 min" in summary and "the last `cm3leon pipeline` pass took" in summary
