"""The typed readers of a run's stage summaries (`cm3leon.run.summaries`): each reads what its
stage wrote, gives None for a stage that has not run, and names the file and the field of a
malformed summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cm3leon.errors import CM3LeonError
from cm3leon.run import summaries as S
from cm3leon.run.report import build_run_report
from cm3leon.run.summaries import RunFolder


def _write(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def _evaluation(vqa_accuracy=86.0) -> dict:
    """An eval/<which>/metrics.json as `evaluate_model` writes it (trimmed)."""
    return {"model": "sft", "decoding": {"method": "cfg", "cfg_scale": 3.0}, "seed": 0, "metrics": {
        "shapes": {"colour": 0.97, "shape": 0.99, "both": 0.96, "n": 100,
                   "by_num_objects": {"1": {"colour": 0.98, "shape": 1.0, "both": 0.97, "n": 60},
                                      "2": {"both": 0.5, "n": 40}}},
        "cider": {"CIDEr-D": 5.2, "BLEU-4": 0.51, "n": 100,
                  "shapes": {"correct": 1.0, "colour": 1.0, "shape": 0.99, "n": 100}},
        "vqa": {"vqa_accuracy": vqa_accuracy, "n": 100,
                "by_type": {"color": {"vqa_accuracy": 100.0, "n": 20}, "existence": {"vqa_accuracy": 40.0, "n": 20}}},
        "edit": {"skipped": "no edit examples in the split"},
    }}


# Every reader, on a run folder where its stage has not run.
READERS = {
    "pipeline": lambda run: S.PipelineSummary.read(run),
    "stage done": lambda run: S.StageDone.read(run, "pretrain"),
    "dataset": lambda run: S.DatasetSummary.read(run.path("data")),
    "text tokenizer": lambda run: S.TextTokenizerSummary.read(run),
    "image tokenizer": lambda run: S.ImageTokenizerSummary.read(run),
    "retriever": lambda run: S.RetrieverSummary.read(run),
    "neighbours": lambda run: S.NeighborsSummary.read(run),
    "train": lambda run: S.TrainSummary.read(run, "pretrain"),
    "sft": lambda run: S.SFTSummary.read(run),
    "generate": lambda run: S.GenerateSummary.read(run),
    "final evaluation": lambda run: S.final_evaluation(run),
    "pretrained evaluation": lambda run: S.pretrained_evaluation(run),
    "sweep": lambda run: S.SweepSummary.read(run),
    "run metrics": lambda run: S.RunMetrics.read(run),
    "ablations": lambda run: S.AblationResults.read(run),
    "baselines": lambda run: S.BaselinesSummary.read(run),
}


@pytest.mark.parametrize("name", READERS)
def test_a_stage_that_has_not_run_reads_as_none(tmp_path, name):
    for stage in ("pretrain", "sft", "eval", "generate"):  # stage folders without their summaries
        (tmp_path / stage).mkdir()
    assert READERS[name](RunFolder(tmp_path)) is None


def test_evaluation_figures_are_typed_and_the_final_model_is_the_tuned_one(tmp_path):
    run = RunFolder(tmp_path)
    _write(tmp_path / "eval" / "pretrain" / "metrics.json", _evaluation(vqa_accuracy=5.0))
    assert S.final_evaluation(run).dir == tmp_path / "eval" / "pretrain"  # the only evaluation there is
    _write(tmp_path / "eval" / "sft" / "metrics.json", _evaluation())
    ev = S.final_evaluation(run)
    assert ev.dir == tmp_path / "eval" / "sft" and ev.path == ev.dir / "metrics.json"
    assert ev.decoding_method == "cfg"
    assert ev.text_to_image == S.ShapesFigures(both=0.96, colour=0.97, shape=0.99, n=100)
    assert ev.single_object == S.ShapesFigures(both=0.97, colour=0.98, shape=1.0, n=60)
    assert (ev.captions.cider_d, ev.captions.bleu_4, ev.captions.correct, ev.captions.checked) == (5.2, 0.51, 1.0, 100)
    assert ev.vqa.accuracy == 86.0 and ev.vqa.by_type["existence"] == S.VQAKind(accuracy=40.0, n=20)
    assert list(ev.vqa.by_type) == ["color", "existence"]  # the file's order
    assert ev.edit == S.EditFigures(skipped="no edit examples in the split")
    assert ev.metrics == _evaluation()["metrics"]  # as written, for `headline_rows`
    assert S.pretrained_evaluation(run).vqa.accuracy == 5.0


def test_absent_groups_read_as_empty_figures(tmp_path):
    _write(tmp_path / "eval" / "sft" / "metrics.json", {"metrics": {"shapes": {"both": 0.5, "n": 4}}})
    ev = S.final_evaluation(RunFolder(tmp_path))
    assert ev.single_object is None and ev.text_to_image.both == 0.5 and ev.decoding_method is None
    assert ev.captions == S.CaptionFigures() and ev.vqa == S.VQAFigures() and ev.edit == S.EditFigures()


def test_numbers_stay_as_written_and_absent_fields_are_none(tmp_path):
    _write(tmp_path / "image_tokenizer" / "metrics.json", {"psnr_db": 27.5, "codes_used": 58, "codebook_size": 64,
                                                          "eval_split": "test", "perplexity": None})
    vq = S.ImageTokenizerSummary.read(RunFolder(tmp_path))
    assert (vq.psnr_db, vq.codes_used, vq.eval_split) == (27.5, 58, "test")
    assert type(vq.codes_used) is int  # the tables print 58, not 58.0
    assert vq.perplexity is None and vq.checker_recovered is None


def test_pipeline_summary_and_done_markers(tmp_path):
    run = RunFolder(tmp_path)
    _write(tmp_path / "pipeline.json", {"data": "runs/demo/data", "preset": "long", "quick": True, "seconds": 9.5,
                                        "stages": {"tokenize": {"status": "done", "seconds": 2.0},
                                                   "pretrain": {"status": "skipped (already done)"}}})
    pipe = S.PipelineSummary.read(run)
    assert (pipe.data, pipe.label, pipe.seconds) == ("runs/demo/data", "long (quick)", 9.5)
    assert pipe.stages == {"tokenize": S.StageRecord("done", 2.0), "pretrain": S.StageRecord("skipped (already done)")}
    assert S.PipelineSummary(preset="quick", quick=True).label == "quick" and S.PipelineSummary().label == "?"
    _write(tmp_path / "text_tokenizer" / ".done", {"stage": "text_tokenizer", "seconds": 4.4,
                                                   "result": {"vocab_size": 456, "tokens_per_caption": 6.65}})
    done = S.StageDone.read(run, "text_tokenizer")
    assert done.seconds == 4.4 and done.result == {"vocab_size": 456, "tokens_per_caption": 6.65}
    assert S.TextTokenizerSummary.read(run) == S.TextTokenizerSummary(vocab_size=456, tokens_per_caption=6.65)


def test_training_summaries_are_found_one_level_down(tmp_path):
    run = RunFolder(tmp_path)
    _write(tmp_path / "pretrain" / "model" / "train_summary.json", {"steps": 600, "tokens_seen": 491520,
                                                                    "device": "cpu", "vocab": {"size": 1}})
    s = S.TrainSummary.read(run, "pretrain")
    assert s.path == tmp_path / "pretrain" / "model" / "train_summary.json"
    assert (s.steps, s.tokens_seen, s.device, s.final_val_loss) == (600, 491520, "cpu", None)
    _write(tmp_path / "sft" / "sft_summary.json", {"sft": {"train_loss_before": 3.1, "train_loss_after": 2.5}})
    nested = S.SFTSummary.read(run)
    _write(tmp_path / "sft" / "sft_summary.json", {"stage": "sft", "train_loss_before": 3.1, "train_loss_after": 2.5})
    flat = S.SFTSummary.read(run)
    assert nested == flat and (flat.train_loss_after, flat.val_loss_before) == (2.5, None)


def test_retrieval_sweep_and_baselines(tmp_path):
    run = RunFolder(tmp_path)
    _write(tmp_path / "retrieval" / "retriever" / "metrics.json", {
        "text_to_image_recall@1": 0.81, "text_to_image_recall@5": 0.97, "image_to_text_recall@1": 0.79,
        "num_pairs": 200, "eval_split": "test", "train_config": {"steps": 1}})
    r = S.RetrieverSummary.read(run)
    assert r.text_to_image_recall == {"1": 0.81, "5": 0.97} and r.image_to_text_recall == {"1": 0.79}
    assert (r.num_pairs, r.eval_split, r.steps) == (200, "test", None)
    _write(tmp_path / "eval" / "sweep" / "sweep.json", {"seed": 3, "rows": [{"setting": "TopP", "both": 0.5}],
                                                         "metrics": ["both"], "plots": ["a.png"]})
    sweep = S.SweepSummary.read(run)
    assert sweep.seeds == (3,) and sweep.rows == ({"setting": "TopP", "both": 0.5},) and sweep.notes == ()
    assert sweep.dir == tmp_path / "eval" / "sweep" and S.SweepSummary.read(run, "sweep_pretrain") is None
    _write(tmp_path / "ablate" / "baselines" / "metrics.json", {"budgets": {"train_flops": 1.5e12}, "rows": []})
    b = S.BaselinesSummary.read(run)
    assert (b.rows, b.train_flops, b.train_seconds, b.plots) == ((), 1.5e12, None, ())


@pytest.mark.parametrize("rel,content,read,field", [
    ("eval/sft/metrics.json", _evaluation(vqa_accuracy="86%"), lambda run: S.final_evaluation(run),
     "metrics.vqa.vqa_accuracy must be a number, got '86%'"),
    ("eval/sft/metrics.json", {"metrics": {"vqa": {"by_type": {"color": 80.0}}}}, lambda run: S.final_evaluation(run),
     "metrics.vqa.by_type.color must be an object, got 80.0"),
    ("pipeline.json", {"stages": {"pretrain": {"status": 1}}}, lambda run: S.PipelineSummary.read(run),
     "stages.pretrain.status must be a string, got 1"),
    ("text_tokenizer/.done", {"result": {"vocab_size": "456"}}, lambda run: S.TextTokenizerSummary.read(run),
     "result.vocab_size must be a number, got '456'"),
    ("eval/sweep/sweep.json", {"rows": [{"setting": "a"}, "b"]}, lambda run: S.SweepSummary.read(run),
     "rows[1] must be an object, got 'b'"),
    ("metrics.json", {"quality_bar": {"met": True}}, lambda run: S.RunMetrics.read(run),
     "quality_bar must be a list, got {'met': True}"),
    ("image_tokenizer/metrics.json", {"psnr_db": True}, lambda run: S.ImageTokenizerSummary.read(run),
     "psnr_db must be a number, got True"),  # a JSON true is not a number
    ("generate/summary.json", [1, 2], lambda run: S.GenerateSummary.read(run), "expected a JSON object, got list"),
])
def test_a_malformed_summary_is_an_error_naming_the_file_and_the_field(tmp_path, rel, content, read, field):
    path = _write(tmp_path / rel, content)
    with pytest.raises(CM3LeonError) as e:
        read(RunFolder(tmp_path))
    assert str(e.value) == f"{path}: {field}"


def test_a_file_that_is_not_json_is_named(tmp_path):
    (tmp_path / "tokenize").mkdir()
    (tmp_path / "tokenize" / "neighbors.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(CM3LeonError, match=r"neighbors\.json: not valid JSON"):
        S.NeighborsSummary.read(RunFolder(tmp_path))


def test_the_report_names_the_malformed_field_in_its_section(tmp_path):
    _write(tmp_path / "pipeline.json", {"stages": {}, "seconds": 1.0, "preset": "demo"})
    _write(tmp_path / "retrieval" / "retriever" / "metrics.json", {"text_to_image_recall@1": "high"})
    html = build_run_report(tmp_path).read_text(encoding="utf-8")
    retrieval = html.split("<h2>Retrieval</h2>", 1)[1].split("</section>", 1)[0]
    assert "could not be built" in retrieval and "text_to_image_recall@1 must be a number" in retrieval
    assert html.count("could not be built") == 1  # the other sections are built
