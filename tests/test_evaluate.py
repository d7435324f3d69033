"""Model-level evaluation (`evaluate_model`, `cm3leon eval model`) and the decoding sweep
(`sweep_decoding`, `cm3leon eval sweep`) on a tiny random model and a tiny shapes dataset,
plus an oracle stand-in model that returns the ground truth, to check the scoring path."""

import json
import random
import shutil

import numpy as np
import pytest
import torch

from cm3leon.api import CM3Leon
from cm3leon.cli import main
from cm3leon.data.readers import load_image
from cm3leon.data.shapes import synthesize
from cm3leon.errors import CM3LeonError
from cm3leon.eval.data import load_eval_data
from cm3leon.eval.evaluate import METRICS, evaluate_model
from cm3leon.eval.sweep import sweep_decoding
from cm3leon.retrieval.encoder import BiEncoder, BiEncoderConfig, save_bi_encoder
from cm3leon.utils.io import read_jsonl

SENTENCES = [
    "a small red circle in the top left and a large blue square",
    "two shapes: a green triangle and a yellow diamond",
    "Question: What color is the circle? Answer: red.",
    "Edit first image following the instruction make the red circle blue",
    "there is a purple cross at the bottom",
] * 4


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("shapes") / "data"
    synthesize(d, num=40, size=32, seed=0)  # train 36, val 2, test 2
    return d


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_model_dir_factory):
    return tiny_model_dir_factory(tmp_path_factory.mktemp("model"), SENTENCES, weight_std=0.2)


@pytest.fixture(scope="module")
def model_with_retriever(model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("model_r") / "model"
    shutil.copytree(model_dir, d)
    torch.manual_seed(1)
    cfg = BiEncoderConfig(image_size=16, embed_dim=8, text_max_bytes=64, text_width=16, text_layers=1, text_heads=2,
                          image_channels=(8, 8), image_pool=2)
    save_bi_encoder(BiEncoder(cfg), d / "retriever")
    return d


class Oracle:
    """A stand-in model that answers every task with the dataset's ground truth (optionally
    with the text->image prompts shuffled), so the scoring path can be checked end to end."""

    def __init__(self, data, shuffle_prompts: bool = False):
        rows = list(read_jsonl(data / "captions.jsonl"))
        self.image_of = {r["text"]: load_image(data / r["image"], None) for r in rows}
        if shuffle_prompts:
            texts = list(self.image_of)
            perm = texts[1:] + texts[:1]  # every prompt gets another scene
            self.image_of = {t: self.image_of[p] for t, p in zip(texts, perm)}
        self.caption_of = {self._key(load_image(data / r["image"], None)): r["text"] for r in rows}
        self.answer_of = {(self._key(load_image(data / r["image"], None)), r["question"]): r["answer"]
                          for r in read_jsonl(data / "vqa.jsonl")}
        self.target_of = {(self._key(load_image(data / r["image"], None)), r["instruction"]):
                          load_image(data / r["target_image"], None) for r in read_jsonl(data / "edits.jsonl")}

    @staticmethod
    def _key(im) -> bytes:
        return np.asarray(im).tobytes()

    def text_to_image(self, prompts, seed=None, decoding=None):
        return [self.image_of[p] for p in prompts]

    def image_to_text(self, images, seed=None):
        return [self.caption_of[self._key(im)] for im in images]

    def answer(self, images, questions, seed=None):
        return [self.answer_of[(self._key(im), q)] for im, q in zip(images, questions)]

    def edit(self, images, instructions, seed=None):
        return [self.target_of[(self._key(im), ins)] for im, ins in zip(images, instructions)]


def test_evaluate_model_writes_every_requested_metric_in_range(model_with_retriever, shapes_dir, tmp_path):
    out = tmp_path / "eval"
    res = evaluate_model(model_with_retriever, shapes_dir, out, split="train", num_prompts=4, batch_size=4,
                         decoding={"method": "cfg", "cfg_scale": 2.0})
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["metrics"].keys() == set(METRICS) == res["metrics"].keys()
    m = on_disk["metrics"]
    assert not any("skipped" in v for v in m.values())
    assert m["shapes"]["n"] + m["shapes"]["unparsed"] == 4
    assert all(0 <= m["shapes"][k] <= 1 for k in ("colour", "shape", "both", "position", "all"))
    assert -1 <= m["clip"]["value"] <= 1 and m["clip"]["n"] == 4 and m["clip"]["name"] == "CLIP score (retriever)"
    assert m["fid"]["name"] == "FD-retriever" and m["fid"]["value"] >= 0
    assert m["fid"]["n_fake"] == m["fid"]["n_real"] == 4
    assert m["cider"]["n"] == 4 and m["cider"]["CIDEr-D"] >= 0 and 0 <= m["cider"]["BLEU-4"] <= 1
    assert 0 <= m["cider"]["shapes"]["correct"] <= 1
    assert m["vqa"]["n"] == 4 and 0 <= m["vqa"]["vqa_accuracy"] <= 100
    assert sum(v["n"] for v in m["vqa"]["by_type"].values()) == 4
    assert m["edit"]["n"] + m["edit"]["unjudged"] == 4 and 0 <= m["edit"]["done_rate"] <= 1
    samples = list(read_jsonl(out / "samples.jsonl"))
    assert [sum(s["task"] == t for s in samples) for t in ("text_to_image", "captioning", "vqa", "edit")] == [4] * 4
    assert all((out / s["image"]).is_file() for s in samples if "image" in s and s["task"] != "vqa")
    for f in ("metrics.md", "grid_text_to_image.png", "grid_captioning.png", "grid_vqa.png", "grid_edit.png"):
        assert (out / f).is_file(), f
    assert "CIDEr-D" in (out / "metrics.md").read_text()


def test_captions_are_written_with_the_runs_caption_candidates_and_scorer(model_dir, shapes_dir, tmp_path,
                                                                         monkeypatch):
    from cm3leon.api import CM3Leon

    calls = []
    real = CM3Leon.image_to_text

    def spy(self, images, *args, **kwargs):
        calls.append({k: kwargs.get(k) for k in ("num_candidates", "scorer")})
        return real(self, images, *args, **kwargs)

    monkeypatch.setattr(CM3Leon, "image_to_text", spy)
    evaluate_model(model_dir, shapes_dir, tmp_path / "eval", metrics="cider", split="train", num_prompts=2,
                   decoding={"caption_candidates": 3, "scorer": "likelihood"})
    assert calls and all(c == {"num_candidates": 3, "scorer": "likelihood"} for c in calls)
    # a model whose image_to_text takes neither still captions (the ground-truth stand-in)
    res = evaluate_model(Oracle(shapes_dir), shapes_dir, tmp_path / "oracle", split="train", num_prompts=2,
                         metrics="cider", decoding={"caption_candidates": 3})
    assert res["metrics"]["cider"]["shapes"]["correct"] == 1.0


def test_answers_are_written_with_the_runs_answer_candidates(model_dir, shapes_dir, tmp_path, monkeypatch):
    from cm3leon.api import CM3Leon

    calls = []
    real = CM3Leon.answer

    def spy(self, images, questions, *args, **kwargs):
        calls.append(kwargs.get("num_candidates"))
        return real(self, images, questions, *args, **kwargs)

    monkeypatch.setattr(CM3Leon, "answer", spy)
    res = evaluate_model(model_dir, shapes_dir, tmp_path / "eval", metrics="vqa", split="train", num_prompts=2,
                         decoding={"answer_candidates": 3})
    assert calls and all(c == 3 for c in calls) and res["metrics"]["vqa"]["n"] > 0


def test_metric_with_absent_input_is_skipped_with_a_note(model_dir, shapes_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(shapes_dir, data)
    (data / "vqa.jsonl").unlink()
    res = evaluate_model(model_dir, data, tmp_path / "eval", metrics="clip,fid,vqa,cider", split="train",
                         num_prompts=2)
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]
    assert "retriever" in m["clip"]["skipped"] and "retriever" in m["fid"]["skipped"]
    assert "vqa.jsonl" in m["vqa"]["skipped"]
    assert m["cider"]["n"] == 2 and res["metrics"] == m
    assert "skipped" in (tmp_path / "eval" / "metrics.md").read_text()


def test_ground_truth_outputs_score_near_perfect_and_shuffled_prompts_score_low(shapes_dir, tmp_path):
    res = evaluate_model(Oracle(shapes_dir), shapes_dir, tmp_path / "oracle", split="train", num_prompts=20,
                         metrics="shapes,cider,vqa,edit,fid", fid_features="pixelstats")
    m = res["metrics"]
    assert m["shapes"]["n"] == 20 and m["shapes"]["both"] >= 0.95 and m["shapes"]["all"] >= 0.9
    assert m["shapes"]["count"] >= 0.95 and m["shapes"]["both_and_count"] >= 0.9  # no extra objects drawn
    assert m["shapes"]["scene"]["exact_scene"] >= 0.9 and m["shapes"]["scene"]["recall"] >= 0.95
    assert m["cider"]["shapes"]["correct"] == 1.0 and m["cider"]["BLEU-4"] > 0.99
    assert m["vqa"]["vqa_accuracy"] == 100.0
    assert m["edit"]["done_rate"] >= 0.9 and m["edit"]["do_nothing_baseline"] <= 0.1
    assert m["fid"]["name"] == "FD-pixelstats" and m["fid"]["value"] < 1e-6  # the same images

    bad = evaluate_model(Oracle(shapes_dir, shuffle_prompts=True), shapes_dir, tmp_path / "shuffled",
                         split="train", num_prompts=20, metrics="shapes")["metrics"]["shapes"]
    assert bad["both"] <= 0.5 and bad["scene"]["exact_scene"] <= 0.2


def test_coco_layout_scores_captions_against_every_reference_and_skips_shapes(shapes_dir, tmp_path):
    images = sorted((shapes_dir / "images").glob("*.png"))[:3]
    for p in images:
        (tmp_path / "val2017").mkdir(exist_ok=True)
        shutil.copy(p, tmp_path / "val2017" / p.name)
    rows = {r["image"]: r["text"] for r in read_jsonl(shapes_dir / "captions.jsonl")}
    coco = {"images": [{"id": i, "file_name": p.name, "split": "test"} for i, p in enumerate(images)],
            "annotations": [{"id": 10 * i + j, "image_id": i, "caption": c}
                            for i, p in enumerate(images) for j, c in enumerate([rows[f"images/{p.name}"], "a photo"])]}
    ann = tmp_path / "annotations" / "captions_val2017.json"
    ann.parent.mkdir()
    ann.write_text(json.dumps(coco))
    data = load_eval_data(ann, "test")
    assert len(data.images) == 3 and all(len(c.references) == 2 for c in data.images) and not data.is_shapes
    res = evaluate_model(Oracle(shapes_dir), ann, tmp_path / "eval", metrics="shapes,cider,vqa")["metrics"]
    assert "not a shapes dataset" in res["shapes"]["skipped"] and "vqa.jsonl" in res["vqa"]["skipped"]
    assert res["cider"]["n"] == 3 and "shapes" not in res["cider"]


def test_sweep_writes_one_row_per_setting_and_plots_against_cfg_and_n(model_with_retriever, shapes_dir, tmp_path):
    out = tmp_path / "sweep"
    res = sweep_decoding(model_with_retriever, shapes_dir, out, cfg_scales=(1, 3), best_of=(1, 2), num_prompts=3,
                         split="train")
    settings = [r["setting"] for r in res["rows"]]
    assert settings == ["TopP", "TopP+CFG a=1", "TopP+CFG a=3", "CD-K", "best-of-1", "best-of-2"]
    assert res["metrics"] == ["both", "clip_score", "FD-retriever"]
    on_disk = json.loads((out / "sweep.json").read_text())
    assert on_disk["rows"] == res["rows"]
    for r in res["rows"]:
        assert 0 <= r["both"] <= 1 and -1 <= r["clip_score"] <= 1 and r["FD-retriever"] >= 0
    assert [r["cfg_scale"] for r in res["rows"] if r["method"] == "cfg"] == [1.0, 3.0]
    assert [r["num_candidates"] for r in res["rows"] if r["method"] == "best_of_n"] == [1, 2]
    assert len(res["plots"]) == 6 and all((out / p).is_file() for p in res["plots"])
    assert "best-of-2" in (out / "sweep.md").read_text()
    assert "optimistic by construction" in (out / "sweep.md").read_text()  # ranked by the CLIP scorer itself
    liked = sweep_decoding(model_with_retriever, shapes_dir, tmp_path / "liked", cfg_scales=(1,), best_of=(2,),
                           num_prompts=2, split="train", methods="best_of_n", decoding={"scorer": "likelihood"})
    md = (tmp_path / "liked" / "sweep.md").read_text()
    assert liked["rows"] and "model's own likelihood" in md and "optimistic" not in md


def test_sweep_shares_its_decoding_options_with_every_setting(model_dir, shapes_dir, tmp_path, monkeypatch):
    import cm3leon.eval.tasks.text_to_image as ev

    seen = []
    real = ev.generate_images
    monkeypatch.setattr(ev, "generate_images", lambda m, p, d, *a, **k: seen.append(d) or real(m, p, d, *a, **k))
    sweep_decoding(model_dir, shapes_dir, tmp_path / "s", cfg_scales=(2,), best_of=(2,), num_prompts=2, split="train",
                   decoding={"num_retrieved": 0, "scorer": "likelihood"})
    assert [d.method for d in seen] == ["topp", "cfg", "cdk", "best_of_n"]
    assert all(d.num_retrieved == 0 and d.scorer == "likelihood" for d in seen)


def test_sweep_over_seeds_reports_mean_and_spread_and_compares_retrieval_k(model_dir, shapes_dir, tmp_path,
                                                                          monkeypatch):
    import cm3leon.eval.tasks.text_to_image as ev

    calls = []
    real = ev.generate_images
    monkeypatch.setattr(ev, "generate_images",
                        lambda m, p, d, seed, *a, **k: calls.append((d, seed)) or real(m, p, d, seed, *a, **k))
    res = sweep_decoding(model_dir, shapes_dir, tmp_path / "s", cfg_scales=(2,), best_of=(), num_prompts=3,
                         split="train", seeds=(5, 6, 7), retrieved=(1,), methods="topp,cfg",
                         decoding={"num_retrieved": 0, "cfg_scale": 1.5}, temperatures="0.5,1")
    # the shared temperature (1) is not repeated as a row of its own
    assert [r["setting"] for r in res["rows"]] == ["TopP", "TopP+CFG a=2", "TopP+CFG a=1.5 k=1",
                                                   "TopP+CFG a=1.5 T=0.5"]
    assert [seed for _, seed in calls] == [5, 6, 7] * 4  # every setting on every seed
    assert [d.num_retrieved for d, _ in calls] == [0] * 6 + [1] * 3 + [0] * 3  # the k row overrides the shared k
    assert [d.temperature for d, _ in calls] == [1.0] * 9 + [0.5] * 3
    assert [(d.method, d.cfg_scale) for d, _ in calls[-3:]] == [("cfg", 1.5)] * 3
    assert [r["temperature"] for r in res["rows"]] == [None, None, None, 0.5]
    assert any(p.endswith("_vs_temperature.png") for p in res["plots"])
    for r in res["rows"]:
        vals = r["both_seeds"]
        assert len(vals) == 3 and r["both"] == pytest.approx(sum(vals) / 3)
        assert r["both_std"] == pytest.approx(float(np.std(vals, ddof=1)))
        assert r["seconds_per_image"] == pytest.approx(r["seconds"] / 3, abs=1e-3)
    assert res["rows"][2]["num_retrieved"] == 1 and res["rows"][1]["num_retrieved"] is None
    assert res["seeds"] == [5, 6, 7] and "seeds 5, 6, 7" in (tmp_path / "s" / "sweep.md").read_text()
    assert " ± " in (tmp_path / "s" / "sweep.md").read_text()
    with pytest.raises(CM3LeonError, match="distinct"):
        sweep_decoding(model_dir, shapes_dir, tmp_path / "x", seeds=(1, 1))
    with pytest.raises(CM3LeonError, match="methods"):
        sweep_decoding(model_dir, shapes_dir, tmp_path / "x", methods="topp,beam")
    with pytest.raises(CM3LeonError, match="temperatures"):
        sweep_decoding(model_dir, shapes_dir, tmp_path / "x", temperatures="0,1")


def test_sweep_identical_settings_give_identical_rows(shapes_dir, tmp_path):
    # TopP and TopP+CFG at scale 1 decode the same distribution with the same seeds, and an
    # oracle ignores decoding: every metric must then agree across settings.
    res = sweep_decoding(Oracle(shapes_dir), shapes_dir, tmp_path / "s", cfg_scales=(1,), best_of=(2,),
                         num_prompts=6, split="train", fid_features="pixelstats")
    vals = {(r["both"], r["FD-pixelstats"]) for r in res["rows"]}
    assert len(vals) == 1 and res["rows"][0]["both"] >= 0.9


def test_cli_eval_model_and_sweep(model_dir, shapes_dir, tmp_path, capsys):
    assert main(["eval", "model", "--model", str(model_dir), "--data", str(shapes_dir), "--out", str(tmp_path / "e"),
                 "--metrics", "shapes,cider", "--split", "train", "--num", "2", "--cfg-scale", "2"]) == 0
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert m["decoding"]["cfg_scale"] == 2.0 and m["metrics"]["cider"]["n"] == 2
    assert main(["eval", "sweep", "--model", str(model_dir), "--data", str(shapes_dir), "--out", str(tmp_path / "s"),
                 "--split", "train", "--num", "2", "--cfg-scales", "2", "--best-of", "2"]) == 0
    assert len(json.loads((tmp_path / "s" / "sweep.json").read_text())["rows"]) == 4
    assert main(["eval", "model", "--model", str(model_dir), "--data", str(shapes_dir), "--out", str(tmp_path / "x"),
                 "--metrics", "shapes,bleu"]) == 2
    assert "bleu" in capsys.readouterr().err


def test_bad_arguments_raise_clear_errors(model_dir, shapes_dir, tmp_path):
    with pytest.raises(CM3LeonError, match="split"):
        load_eval_data(shapes_dir, "dev")
    with pytest.raises(CM3LeonError, match="num_prompts"):
        evaluate_model(model_dir, shapes_dir, tmp_path, num_prompts=0)
    with pytest.raises(CM3LeonError, match="cfg_sclae"):
        evaluate_model(model_dir, shapes_dir, tmp_path, decoding={"cfg_sclae": 2.0})
    with pytest.raises(CM3LeonError, match="cfg_scales"):
        sweep_decoding(model_dir, shapes_dir, tmp_path, cfg_scales="1,x")
    with pytest.raises(CM3LeonError, match="method"):  # each setting names its own method
        sweep_decoding(model_dir, shapes_dir, tmp_path, decoding={"method": "cfg"})
    with pytest.raises(CM3LeonError, match="num_retreived"):
        sweep_decoding(model_dir, shapes_dir, tmp_path, decoding={"num_retreived": 0})


def test_a_list_is_one_batch_with_the_same_answers_as_one_at_a_time(model_dir, shapes_dir):
    m = CM3Leon.from_pretrained(model_dir)
    images = [load_image(p, None) for p in sorted((shapes_dir / "images").glob("*.png"))[:3]]
    questions = ["What color is the circle?", "How many shapes are there?", "Is there a red square?"]
    assert m.answer(images, questions, max_new_tokens=4) == [
        m.answer(im, q, max_new_tokens=4) for im, q in zip(images, questions)]
    assert m.image_to_text(images, max_new_tokens=4) == [m.image_to_text(im, max_new_tokens=4) for im in images]
    assert m.encode_images(images) == [m.encode_image(im) for im in images]
    prompts = ["a red circle", "two shapes: a green triangle and a yellow diamond"]
    for method in ("cfg", "best_of_n"):
        samples = m.sample_images(prompts, method=method, num_candidates=3, seed=random.Random(0).randrange(99))
        assert [s.prompt for s in samples] == prompts and all(s.image.size == (16, 16) for s in samples)
    two = m.sample_images(prompts, n=2, method="cfg", seed=4)
    assert [s.prompt for s in two] == [prompts[0]] * 2 + [prompts[1]] * 2  # n per prompt, prompt by prompt
    assert [s.codes for s in m.sample_images([prompts[0]], n=2, seed=4)] == \
        [s.codes for s in m.sample_images(prompts[0], n=2, seed=4)]  # a list of one is the single call
    edited = m.edit(images[:2], ["make it blue", "remove the red circle"], seed=0)
    assert isinstance(edited, list) and len(edited) == 2
    with pytest.raises(CM3LeonError, match="equal length"):
        m.answer(images, questions[:2])
    with pytest.raises(CM3LeonError, match="one image and one question"):
        m.answer(images[0], questions)


def test_a_model_of_another_kind_takes_its_own_decoding_options(tmp_path):
    class Other:  # e.g. the latent-diffusion baseline: its own options, not a DecodingConfig
        decoding_keys = ("cfg_scale", "num_inference_steps")
        decoding = {"cfg_scale": 3.0, "num_inference_steps": 50}

    from cm3leon.decode.config import DecodingConfig

    with pytest.raises(CM3LeonError, match="Other takes a dict of cfg_scale, num_inference_steps"):
        evaluate_model(Other(), tmp_path, tmp_path / "out", decoding=DecodingConfig())
    with pytest.raises(CM3LeonError, match=r"unknown option\(s\) \['method'\]"):
        evaluate_model(Other(), tmp_path, tmp_path / "out", decoding={"method": "cfg"})
