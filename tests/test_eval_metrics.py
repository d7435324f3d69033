"""Evaluation metrics: Fréchet distance, CIDEr-D / BLEU-4, VQA accuracy, shapes accuracy.

Reference values of the caption metrics are derived by hand in the comments."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from cm3leon.errors import CM3LeonError
from cm3leon.eval.captioning import bleu, caption_metrics, cider_d, tokenize
from cm3leon.eval.fid import (
    InceptionV3Extractor,
    PixelStatsExtractor,
    RetrieverExtractor,
    compute_fd,
    frechet_distance,
    metric_name,
)
from cm3leon.eval.shapes_metrics import caption_accuracy, match_objects, prompt_accuracy, scene_metrics
from cm3leon.eval.vqa import normalize_answer, vqa_accuracy, vqa_score

# ---------------------------------------------------------------- Fréchet distance


def _images(n: int, brightness_shift: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a = rng.integers(0, 200, size=(32, 32, 3)) + brightness_shift
        out.append(Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)))
    return out


def test_frechet_distance_of_translated_features_is_squared_shift():
    # Same covariance, means differ by c: d² = |c|² exactly (the trace terms cancel).
    x = torch.randn(200, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    c = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=torch.float64)
    assert frechet_distance(x, x + c) == pytest.approx(float((c**2).sum()), rel=1e-6)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_matches_closed_form_for_scaled_gaussians():
    # Y = 2X: S_y = 4 S_x, so Tr(S + 4S - 2·(4S²)^½) = Tr(S) and d² = Tr(S_x) + |mu_x - 2 mu_x|².
    x = torch.randn(300, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 1.0
    mu = x.mean(0)
    s = torch.cov(x.T)
    expected = float(torch.trace(s) + (mu**2).sum())
    assert frechet_distance(x, 2 * x) == pytest.approx(expected, rel=1e-6)


def test_fd_of_a_set_with_itself_is_zero_and_grows_with_shift():
    ext = PixelStatsExtractor()
    real = _images(48, 0, seed=0)
    same = compute_fd(real, real, ext)
    assert same["value"] == pytest.approx(0.0, abs=1e-6)
    assert same["name"] == "FD-pixelstats" and same["n_real"] == 48 and same["n_fake"] == 48
    fresh = compute_fd(real, _images(48, 0, seed=1), ext)["value"]  # same distribution
    small = compute_fd(real, _images(48, 20, seed=1), ext)["value"]
    large = compute_fd(real, _images(48, 55, seed=1), ext)["value"]
    assert fresh < small < large


def test_fd_names_the_feature_space_honestly():
    class FakeRetriever:
        kind = "clip"

        def embed_image(self, images):
            return torch.stack([torch.tensor(np.asarray(im, dtype=np.float32).mean((0, 1))) for im in images])

    ext = RetrieverExtractor(FakeRetriever())
    assert metric_name(ext) == "FD-CLIP"
    res = compute_fd(_images(8, 0, 0), _images(8, 40, 1), ext, batch_size=3)
    assert res["name"] == "FD-CLIP" and res["feature_dim"] == 3 and res["value"] > 0
    FakeRetriever.kind = "bi-encoder"
    assert metric_name(RetrieverExtractor(FakeRetriever())) == "FD-retriever"


def test_fd_rejects_bad_input():
    with pytest.raises(CM3LeonError, match="at least 2"):
        compute_fd(_images(1, 0, 0), _images(4, 0, 1), PixelStatsExtractor())
    with pytest.raises(CM3LeonError, match="dimensions differ"):
        frechet_distance(torch.randn(5, 3), torch.randn(5, 4))
    with pytest.raises(CM3LeonError, match="weights not found"):
        InceptionV3Extractor("/nonexistent/pt_inception-2015-12-05-6726825d.pth")


def test_inception_fid_without_torch_fidelity_says_what_to_install(tmp_path):
    import importlib.util

    from cm3leon.errors import MissingDependencyError

    if importlib.util.find_spec("torch_fidelity") is not None:
        pytest.skip("torch-fidelity is installed")
    weights = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    weights.write_bytes(b"")
    with pytest.raises(MissingDependencyError, match="pip install torch-fidelity"):
        InceptionV3Extractor(weights)


# ---------------------------------------------------------------- captioning


def test_tokenize_approximates_ptb_lowercase_and_drops_punctuation():
    assert tokenize("A man's dog doesn't run -- fast, in the black-and-white photo...") == [
        "a", "man", "'s", "dog", "does", "n't", "run", "fast", "in", "the", "black-and-white", "photo",
    ]  # fmt: skip


def test_bleu_hand_checked_single_sentence():
    # cand "the cat sat on the mat" (6 words); refs "the cat is on the mat" (6), "there is a cat on the mat" (7)
    # 1-grams: the×2 (max ref count 2), cat, on, mat match, sat not -> 5/6
    # 2-grams: the cat, on the, the mat of 5 -> 3/5;  3-grams: on the mat of 4 -> 1/4;  4-grams 0/3
    # closest ref length 6 = candidate length: no brevity penalty
    b = bleu(["the cat sat on the mat"], [["the cat is on the mat", "there is a cat on the mat"]])
    assert b["bleu_1"] == pytest.approx(5 / 6, rel=1e-6)
    assert b["bleu_2"] == pytest.approx(math.sqrt(5 / 6 * 3 / 5), rel=1e-6)  # 0.7071
    assert b["bleu_3"] == pytest.approx((5 / 6 * 3 / 5 * 1 / 4) ** (1 / 3), rel=1e-6)  # 0.5
    assert b["bleu_4"] < 1e-3  # no 4-gram matches: only the 1e-15 smoothing is left


def test_bleu_brevity_penalty_uses_closest_reference_length():
    # cand "the cat is on the" (5) vs ref of 6 words: every precision is 1, BP = exp(1 - 6/5)
    b = bleu(["the cat is on the"], [["the cat is on the mat"]])
    assert b["bleu_4"] == pytest.approx(math.exp(-0.2), rel=1e-6)  # 0.8187
    # adding a 5-word reference makes the closest length 5: no penalty
    b = bleu(["the cat is on the"], [["the cat is on the mat", "a cat is on it"]])
    assert b["bleu_4"] == pytest.approx(1.0, rel=1e-6)


def test_bleu_is_corpus_level_not_mean_of_sentences():
    # image B: cand "a dog runs", refs "a dog runs fast" / "the dog runs": 3/3, 2/2, 1/1, 0/0
    # corpus (with image A above): correct [8, 5, 2], guess [9, 7, 5]; lengths 9 vs 6+3 = 9
    # BLEU-3 = (8/9 · 5/7 · 2/5)^(1/3) = 0.6333, not the sentence mean (0.5 + 1.0) / 2 = 0.75
    b = bleu(
        ["the cat sat on the mat", "a dog runs"],
        [["the cat is on the mat", "there is a cat on the mat"], ["a dog runs fast", "the dog runs"]],
    )
    assert b["bleu_3"] == pytest.approx((8 / 9 * 5 / 7 * 2 / 5) ** (1 / 3), rel=1e-6)
    assert (b["testlen"], b["reflen"]) == (9, 9)


def test_bleu_properties_identity_and_empty():
    refs = ["A red circle on the left.", "a red circle on the left"]
    assert bleu(["a red circle on the left"], [refs])["bleu_4"] == pytest.approx(1.0, rel=1e-6)
    assert bleu([""], [refs])["bleu_4"] == 0.0


def test_cider_d_hand_checked():
    # Two images, refs "a big red circle" / "a big blue square"; idf = log 2 - log df, so
    # n-grams in both reference sets ("a", "big", "a big") weigh 0 and the rest L = log 2.
    # Image 1 is an exact match: cosine 1 at every order -> 10 · 4/4 = 10.
    # Image 2 "a small blue square": 1-grams {small, blue, square}·{blue, square} = 2L² /
    # (√3 L · √2 L) = 2/√6; 2-grams only "blue square" shared: 1/√6; 3-, 4-grams none.
    # Equal bigram counts: no length penalty. 10 · (2/√6 + 1/√6) / 4 = 3.0619.
    c = cider_d(["a big red circle", "a small blue square"], [["a big red circle"], ["a big blue square"]])
    assert c["per_image"][0] == pytest.approx(10.0, rel=1e-9)
    assert c["per_image"][1] == pytest.approx(10 * (3 / math.sqrt(6)) / 4, rel=1e-9)
    assert c["cider_d"] == pytest.approx((10 + 30 / (4 * math.sqrt(6))) / 2, rel=1e-9)  # 6.5309


def test_cider_d_gaussian_length_penalty():
    # Image 2 "a big blue square shape": 1-, 2-, 3-gram cosines 2/√6 each, 4-gram 1/√2; one more
    # bigram than the reference: penalty exp(-1/(2·6²)) = exp(-1/72).
    c = cider_d(["a big red circle", "a big blue square shape"], [["a big red circle"], ["a big blue square"]])
    expected = 10 / 4 * math.exp(-1 / 72) * (3 * 2 / math.sqrt(6) + 1 / math.sqrt(2))  # 7.7826
    assert c["per_image"][1] == pytest.approx(expected, rel=1e-9)


def test_cider_d_exact_match_is_high_and_beats_wrong_and_empty():
    refs = {
        1: ["a red circle at the top", "one red circle near the top", "a red round shape at the top"],
        2: ["a blue square in the middle", "a blue box in the centre", "the blue square sits in the middle"],
        3: ["two green triangles on the left", "green triangles at the left side", "a pair of green triangles left"],
        4: ["a yellow star below a cross", "yellow star under a black cross", "a star in yellow below the cross"],
    }
    exact = {k: v[0] for k, v in refs.items()}
    wrong = {k: refs[k % 4 + 1][0] for k in refs}
    c_exact = cider_d(exact, refs)["cider_d"]
    assert c_exact > 3.0  # well above the 0..~1.2 range of typical COCO systems
    assert cider_d(wrong, refs)["cider_d"] < 0.3 * c_exact
    assert cider_d({k: "" for k in refs}, refs)["cider_d"] == 0.0
    m = caption_metrics(exact, refs)
    assert set(m) == {"CIDEr-D", "BLEU-4", "n"} and m["n"] == 4 and m["BLEU-4"] > 0.9


def test_caption_metrics_reject_mismatched_input():
    with pytest.raises(CM3LeonError, match="no reference"):
        cider_d({"a": "x"}, {"b": ["x"]})
    with pytest.raises(CM3LeonError, match="2 candidates but 1"):
        bleu(["x", "y"], [["x"]])


# ---------------------------------------------------------------- VQA


def test_vqa_normalisation_follows_official_rules():
    assert normalize_answer("Two") == "2"
    assert normalize_answer("a dog") == "dog"
    assert normalize_answer("Two dogs.") == "2 dogs"
    assert normalize_answer("1,000") == "1000"  # digit,digit comma deleted
    assert normalize_answer("3.5") == "3.5"  # a period before a digit stays
    assert normalize_answer("black/white") == "black white"
    assert normalize_answer("dont") == "don’t"  # contraction table


def test_vqa_accuracy_counts_matching_annotators_over_leave_one_out_subsets():
    # m of 10 annotators agree: m=1 -> 9 subsets score 1/3 -> 0.3; m=2 -> (2·1/3 + 8·2/3)/10 = 0.6;
    # m=3 -> (3·2/3 + 7·1)/10 = 0.9; m>=4 -> 1.
    for m, expected in [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]:
        refs = ["two"] * m + ["three"] * (10 - m)
        assert vqa_accuracy("2", refs) == pytest.approx(expected)


def test_vqa_single_reference_is_exact_match_after_normalisation():
    assert vqa_accuracy("Two", ["2"]) == 1.0
    assert vqa_accuracy("a dog", ["dog"]) == 1.0
    assert vqa_accuracy("cat", ["dog"]) == 0.0
    s = vqa_score(["Two", "red", "circle"], [["2"], ["Red."], ["square"]])
    assert s["vqa_accuracy"] == pytest.approx(200 / 3) and s["n"] == 3


def test_vqa_official_reference_handling_leaves_references_unnormalised():
    # The official code does not lower-case references (VQAv2's were normalised at release).
    assert vqa_accuracy("Two", ["Two"] * 10, normalize_references=False) == 0.0
    assert vqa_accuracy("two", ["2"] * 10, normalize_references=False) == 1.0


# ---------------------------------------------------------------- shapes metrics


def _obj(shape, color, cell, size="large"):
    return {"shape": shape, "color": color, "size": size, "cell": list(cell)}


def test_match_objects_counts_multiset_intersection():
    truth = [_obj("circle", "red", (0, 0)), _obj("square", "blue", (1, 1))]
    dets = [_obj("circle", "red", (0, 0)), _obj("square", "green", (1, 1)), _obj("circle", "red", (0, 0))]
    assert match_objects(dets, truth) == {"tp": 1, "fp": 2, "fn": 1, "exact": False}
    assert match_objects(list(reversed(truth)), truth)["exact"]
    # ignoring size: a small red circle then matches a large one
    assert match_objects([_obj("circle", "red", (0, 0), "small")], truth[:1], ("shape", "color", "cell"))["tp"] == 1


def test_scene_metrics_with_stand_in_detector_split_by_object_count():
    # The stand-in "image" is the list of objects a perfect detector would see.
    truths = [
        [_obj("circle", "red", (0, 0))],
        [_obj("star", "yellow", (2, 2))],
        [_obj("circle", "red", (0, 0)), _obj("square", "blue", (1, 1))],
    ]
    images = [truths[0], [_obj("star", "red", (2, 2))], truths[2][:1]]  # 2nd wrong colour, 3rd misses one
    m = scene_metrics(images, truths, detect=lambda im: im)
    assert (m["tp"], m["fp"], m["fn"]) == (2, 1, 2)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 4)
    assert m["exact_scene"] == pytest.approx(1 / 3)
    assert m["by_num_objects"][1]["exact_scene"] == 0.5 and m["by_num_objects"][1]["n"] == 2
    assert m["by_num_objects"][2]["recall"] == 0.5 and m["by_num_objects"][2]["precision"] == 1.0


def test_prompt_and_caption_accuracy_with_stand_in_checkers():
    results = [
        {"colour_ok": True, "shape_ok": True, "position_ok": False, "all_ok": False},
        {"colour_ok": True, "shape_ok": False, "position_ok": True, "all_ok": False},
        {"colour_ok": False, "shape_ok": True, "position_ok": True, "all_ok": False},
        {"colour_ok": True, "shape_ok": True, "position_ok": True, "all_ok": True},
    ]
    p = prompt_accuracy(list(range(4)), ["p"] * 4, check=lambda i, _: results[i])
    assert (p["colour"], p["shape"], p["both"], p["n"]) == (0.75, 0.75, 0.5, 4)
    assert p["fields"]["position_ok"] == 0.75 and p["fields"]["all_ok"] == 0.25
    c = caption_accuracy(["x", "y"], [[], []], judge=lambda cap, t: {"all_ok": cap == "x", "recall": 0.5})
    assert c["correct"] == 0.5 and c["fields"]["recall"] == 0.5


def _rendered_scenes(n: int, max_objects: int, seed: int):
    shapes = pytest.importorskip("cm3leon.data.shapes")
    rng = random.Random(seed)
    scenes = [shapes.sample_scene(rng, max_objects) for _ in range(n)]
    return rng, scenes, [shapes.render_scene(s, 64) for s in scenes]


def test_shapes_metrics_with_real_checker_on_ground_truth_and_shuffled_prompts():
    pytest.importorskip("cm3leon.data.checker")
    from cm3leon.data.shapes import caption_scene

    _, scenes, images = _rendered_scenes(24, 3, seed=0)
    good = scene_metrics(images, scenes)
    assert good["precision"] > 0.95 and good["recall"] > 0.95 and good["exact_scene"] > 0.9
    shuffled = scene_metrics(images, scenes[1:] + scenes[:1])
    assert shuffled["exact_scene"] < 0.3 and shuffled["recall"] < 0.3

    rng, singles, simages = _rendered_scenes(16, 1, seed=1)
    prompts = [caption_scene(s, rng) for s in singles]
    acc = prompt_accuracy(simages, prompts)
    assert acc["both"] > 0.9
    assert prompt_accuracy(simages, prompts[1:] + prompts[:1])["both"] < 0.5
    assert caption_accuracy(prompts, singles)["correct"] > 0.9
    assert caption_accuracy(prompts[1:] + prompts[:1], singles)["correct"] < 0.5


# ---------------------------------------------------------------- `cm3leon eval` on files


def test_eval_cli_scores_files(tmp_path, capsys):
    from cm3leon.cli import main

    # COCO layout: results list + annotation JSON with one row per reference caption
    (tmp_path / "pred.json").write_text(json.dumps(
        [{"image_id": 1, "caption": "a big red circle"}, {"image_id": 2, "caption": "a small blue square"}]))
    (tmp_path / "refs.json").write_text(json.dumps({"annotations": [
        {"image_id": 1, "caption": "A big red circle."}, {"image_id": 2, "caption": "a big blue square"}]}))
    assert main(["eval", "captions", "--pred", str(tmp_path / "pred.json"), "--refs", str(tmp_path / "refs.json"),
                 "--out", str(tmp_path / "cap.json")]) == 0  # fmt: skip
    res = json.loads((tmp_path / "cap.json").read_text())
    assert res["CIDEr-D"] == pytest.approx((10 + 30 / (4 * math.sqrt(6))) / 2, rel=1e-9)  # as hand-checked above

    (tmp_path / "a.jsonl").write_text('{"question_id": 7, "answer": "Two"}\n{"question_id": 8, "answer": "red"}\n')
    (tmp_path / "q.jsonl").write_text('{"question_id": 7, "answers": [{"answer": "2"}]}\n{"question_id": 8, "answer": "blue"}\n')
    assert main(["eval", "vqa", "--pred", str(tmp_path / "a.jsonl"), "--refs", str(tmp_path / "q.jsonl")]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index('{\n  "vqa_accuracy"'):])["vqa_accuracy"] == pytest.approx(50.0)

    for name, shift in (("real", 0), ("fake", 60)):
        (tmp_path / name).mkdir()
        for i, im in enumerate(_images(4, shift, seed=shift)):
            im.save(tmp_path / name / f"{i}.png")
    assert main(["eval", "fd", "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"),
                 "--out", str(tmp_path / "fd.json")]) == 0  # fmt: skip
    fd = json.loads((tmp_path / "fd.json").read_text())
    assert fd["name"] == "FD-pixelstats" and fd["n_real"] == 4 and fd["value"] > 0
    assert main(["eval", "fd", "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"),
                 "--features", "clip"]) == 2  # fmt: skip
    assert "--features 'clip'" in capsys.readouterr().err
