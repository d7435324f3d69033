"""The quick demo end to end: every stage runs on freshly synthesized shapes, the run folder
holds each stage's output, the report and the metrics; a re-run resumes without redoing work."""

import json

import pytest

from cm3leon.cli import main
from cm3leon.run.pipeline import STAGES


@pytest.mark.slow
def test_quick_demo_runs_every_stage_and_writes_report_and_metrics(tmp_path, capsys, monkeypatch):
    from dataclasses import replace

    from cm3leon.run.config import PIPELINE_PRESETS

    # the paper's claims as the full demo shows them, at a tiny size: the sweep over sampling
    # seeds after SFT with retrieval k compared, and the same settings before SFT
    monkeypatch.setitem(PIPELINE_PRESETS, "quick", replace(
        PIPELINE_PRESETS["quick"], eval_before_sft=True, sweep=True, sweep_num=2, sweep_seeds=2,
        sweep_cfg_scales=(2.0,), sweep_best_of=(2,),
        decoding=PIPELINE_PRESETS["quick"].decoding.replace(method="best_of_n", num_candidates=2)))
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick"]) == 0
    pipe = json.loads((out / "pipeline.json").read_text())
    assert pipe["finished"] is True
    assert [s.name for s in STAGES] == list(pipe["stages"])
    assert all(v["status"] == "done" for v in pipe["stages"].values())
    for stage in STAGES:
        assert (out / stage.name / ".done").is_file(), stage.name
    # each stage produced what the next ones read
    assert (out / "text_tokenizer" / "tokenizer.json").is_file()
    assert (out / "image_tokenizer" / "model.safetensors").is_file()
    assert (out / "tokenize" / "neighbors.npy").is_file()
    for model in ("pretrain", "sft"):
        for part in ("config.json", "model.safetensors", "vocab.json", "text_tokenizer", "image_tokenizer",
                     "retriever", "index"):
            assert (out / model / part).exists(), f"{model}/{part}"
    # the CPU recipe: image-code embeddings from the codebook, shared segment positions, and
    # the dtype measured at start
    config = json.loads((out / "pretrain" / "config.json").read_text())
    assert config["image_embedding_init"] > 0 and config["segment_positions"] and config["segment_numbers"]
    assert config["shared_segment_positions"]  # the CPU presets: one cell table for every segment
    summary = json.loads((out / "pretrain" / "train_summary.json").read_text())
    assert summary["dtype"] in ("bf16", "fp32")
    assert summary["retrieval_dropout"] == PIPELINE_PRESETS["quick"].pretrain["retrieval_dropout"] > 0
    gen = json.loads((out / "generate" / "summary.json").read_text())
    assert set(gen["methods"]) == {"topp", "cfg", "cdk", "best_of_n"}
    rows = [json.loads(line) for line in (out / "generate" / "cfg" / "samples.jsonl").read_text().splitlines()]
    assert rows and not any(r["retrieved"] for r in rows)  # the preset's decoding: num_retrieved 0
    # ... which the tuned model directory recommends to every later user of it (API, CLI, serve)
    preset = PIPELINE_PRESETS["quick"]
    assert json.loads((out / "sft" / "decoding.json").read_text()) == {
        "method": preset.decoding.method, "cfg_scale": preset.decoding.cfg_scale,
        "temperature": preset.decoding.temperature, "num_retrieved": preset.decoding.num_retrieved,
        "cdk_k": preset.decoding.cdk_k, "num_candidates": preset.decoding.num_candidates,
        "image_guidance": preset.decoding.image_guidance, "text_guidance": preset.decoding.text_guidance,
        "caption_candidates": preset.decoding.caption_candidates, "edit_candidates": preset.decoding.edit_candidates,
        "answer_candidates": preset.decoding.answer_candidates, "scorer": preset.decoding.scorer}
    # ... and the final evaluation drew with that method
    assert json.loads((out / "eval" / "sft" / "metrics.json").read_text())["decoding"]["method"] == \
        preset.decoding.method
    assert all(0.0 <= m["accuracy_both"] <= 1.0 for m in gen["methods"].values())
    metrics = json.loads((out / "metrics.json").read_text())
    assert {c["criterion"] for c in metrics["quality_bar"]} and metrics["eval_sft"]["metrics"]["shapes"]["n"] > 0
    html = (out / "report.html").read_text()
    assert "Text → image" in html and "data:image/png;base64," in html and "http://" not in html
    after = json.loads((out / "eval" / "sweep" / "sweep.json").read_text())
    before = json.loads((out / "eval" / "sweep_pretrain" / "sweep.json").read_text())
    assert after["seeds"] == before["seeds"] == [0, 1]
    k = PIPELINE_PRESETS["quick"].num_retrieved  # pretraining's k against the decoding's k = 0
    assert [r["setting"] for r in after["rows"]] == ["TopP", "TopP+CFG a=1.5", "TopP+CFG a=2",
                                                     f"TopP+CFG a=1.5 k={k}", "CD-K", "best-of-2"]
    assert [r["setting"] for r in before["rows"]] == ["TopP", "TopP+CFG a=1.5", f"TopP+CFG a=1.5 k={k}"]
    assert all(len(r["both_seeds"]) == 2 for r in after["rows"] + before["rows"])
    assert "The paper&#x27;s claims" in html or "The paper's claims" in html
    # the BPE also learned the instruction-tuning texts (VQA, edits, layouts) the model reads
    tok = json.loads((out / "text_tokenizer" / ".done").read_text())["result"]
    assert tok["num_texts"] > 0 and tok["num_extra_texts"] > tok["num_texts"]

    # a second run resumes: every stage is skipped
    capsys.readouterr()
    assert main(["demo", "--out", str(out), "--quick"]) == 0
    again = json.loads((out / "pipeline.json").read_text())
    assert all(v["status"].startswith("skipped") for v in again["stages"].values())


@pytest.mark.slow
def test_pipeline_runs_to_the_end_on_a_captions_only_folder(tmp_path, monkeypatch):
    """A user's folder with nothing but captions.jsonl and images: instruction tuning adapts to
    the tasks the data has (captions and text-to-image), and every stage finishes. The preset's
    shared decoding options reach generation."""
    from dataclasses import replace

    from cm3leon.run import config
    from cm3leon.data.shapes import synthesize

    monkeypatch.setitem(config.PIPELINE_PRESETS, "quick",
                        replace(config.PIPELINE_PRESETS["quick"],
                                decoding=config.PIPELINE_PRESETS["quick"].decoding.replace(num_retrieved=1)))

    data = tmp_path / "mine"
    synthesize(data, num=200, size=48, max_objects=1, seed=5)
    for name in ("vqa.jsonl", "edits.jsonl", "layouts.jsonl", "annotations.jsonl", "dataset.json"):
        (data / name).unlink()
    out = tmp_path / "run"
    assert main(["pipeline", "--data", str(data), "--out", str(out), "--quick"]) == 0
    pipe = json.loads((out / "pipeline.json").read_text())
    assert pipe["finished"] is True and all(v["status"] == "done" for v in pipe["stages"].values())
    sft = json.loads((out / "sft" / "sft_summary.json").read_text())
    assert set(sft["tasks"]) == {"caption", "t2i"}
    assert json.loads((out / "text_tokenizer" / ".done").read_text())["result"]["num_extra_texts"] == 0
    rows = [json.loads(line) for line in (out / "generate" / "cfg" / "samples.jsonl").read_text().splitlines()]
    assert rows and any(r["retrieved"] for r in rows) and all(len(r["retrieved"]) <= 1 for r in rows)


def test_cpu_presets_drop_retrieved_documents_and_paper_presets_keep_them():
    from cm3leon.run.config import PIPELINE_PRESETS

    # The CPU presets show half the pretraining records without their retrieved documents; the
    # paper-size presets keep them in every record (the paper's k = 2 setting).
    assert all(PIPELINE_PRESETS[p].pretrain["retrieval_dropout"] == 0.5 for p in ("quick", "demo", "long"))
    assert all(PIPELINE_PRESETS[p].pretrain.get("retrieval_dropout", 0.0) == 0.0 for p in ("350m", "760m", "7b"))


def test_demo_presets_choose_their_built_in_data_and_refuse_a_mismatch(tmp_path, capsys):
    from cm3leon.run.config import PIPELINE_PRESETS
    from cm3leon.run.pipeline import DEMO_PRESETS

    assert all(PIPELINE_PRESETS[p].demo_data["size"] == 48 for p in DEMO_PRESETS)
    assert PIPELINE_PRESETS["long"].demo_data["max_objects"] > 1 == PIPELINE_PRESETS["demo"].demo_data["max_objects"]
    assert main(["demo", "--out", str(tmp_path / "x"), "--quick", "--preset", "long"]) == 2
    assert "--quick is the quick preset" in capsys.readouterr().err
    # a run folder whose data came from another preset is not silently reused
    data = tmp_path / "run" / "data"
    data.mkdir(parents=True)
    (data / ".done").write_text(json.dumps({"stage": "synth", "settings": PIPELINE_PRESETS["long"].demo_data}))
    assert main(["demo", "--out", str(tmp_path / "run"), "--quick"]) == 2
    err = capsys.readouterr().err
    assert "was synthesized with" in err and "--force" in err
