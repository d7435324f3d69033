"""The shapes checker: exact on renderings, silent on noise, honest scoring of prompts/captions."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from cm3leon.data.checker import (
    UNKNOWN_SHAPE, Detection, caption_correct, check_prompt, detect_objects, evaluate_on_rendered, score_scene,
)
from cm3leon.data.shapes import SHAPES, ShapeObject, caption_scene, render_scene, sample_scene, usable_templates
from cm3leon.errors import CM3LeonError


@pytest.mark.parametrize("size", [32, 64])
def test_checker_recovers_at_least_99_percent_of_rendered_objects(size):
    res = evaluate_on_rendered(num=300, size=size, seed=11)
    print(f"\nchecker at {size}px on {res['num_scenes']} scenes ({res['num_objects']} objects): "
          f"recall {100 * res['object_recall']:.2f}%, precision {100 * res['object_precision']:.2f}%, "
          f"scenes exact {100 * res['scene_accuracy']:.2f}%")
    assert res["object_recall"] >= 0.99 and res["object_precision"] >= 0.99
    assert res["scene_accuracy"] >= 0.98
    assert set(res["recall_by_shape"]) == set(SHAPES) and min(res["recall_by_size"].values()) >= 0.98


def test_every_shape_colour_size_cell_is_recognised_alone_at_32px():
    from cm3leon.data.shapes import COLORS, SIZES

    wrong = []
    for shape in SHAPES:
        for color in COLORS:
            for size in SIZES:
                for cell in [(0, 0), (1, 1), (2, 2)]:
                    obj = ShapeObject(shape, color, size, cell)
                    dets = detect_objects(render_scene([obj], 32))
                    if [d.key() for d in dets] != [(shape, color, size, cell)]:
                        wrong.append((obj, dets))
    assert not wrong, wrong[:3]


def test_detections_carry_bbox_in_input_pixels_and_high_confidence():
    obj = ShapeObject("square", "blue", "large", (0, 2))
    img = render_scene([obj], 256)  # worked on at 128 px, reported at 256
    (d,) = detect_objects(img)
    assert isinstance(d, Detection) and d.position == "top right" and d.confidence > 0.95
    assert np.allclose(d.bbox, obj.bbox(256), atol=2.0)


def test_uniform_noise_gives_no_detections():
    rng = np.random.default_rng(0)
    for size in (32, 64, 100):
        for _ in range(5):
            assert detect_objects(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) == []


def test_gradients_colour_fields_and_blank_images_give_no_detections():
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:64, 0:64] / 64.0
    for _ in range(10):
        c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        linear = (c0 + (c1 - c0) * ((xx + yy) / 2)[..., None]).astype(np.uint8)
        radial = (c0 + (c1 - c0) * np.clip(np.hypot(xx - 0.5, yy - 0.5) * 2, 0, 1)[..., None]).astype(np.uint8)
        field = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((64, 64), Image.BICUBIC)
        for img in (linear, radial, field):
            assert detect_objects(img) == []
    for img in (np.full((64, 64, 3), 255, np.uint8), np.zeros((64, 64, 3), np.uint8)):
        assert detect_objects(img) == []


def test_non_shapes_on_white_are_rejected_or_not_given_a_shape():
    img = np.full((64, 64, 3), 255, np.uint8)
    img[30:33, 2:62] = (220, 30, 30)  # a thin red line: fits no shape at all
    img[40:64, 0:40] = (30, 160, 50)  # a green block larger than any object
    assert detect_objects(img) == []
    img[2:12, 2:8] = (30, 70, 220)  # a tall blue bar: a blue blob, but no shape of ours
    (d,) = detect_objects(img)
    assert d.color == "blue" and d.shape == UNKNOWN_SHAPE and d.confidence < 0.7


def test_odd_inputs_never_crash():
    assert detect_objects(np.full((1, 1, 3), 255, np.uint8)) == []
    assert detect_objects(np.full((17, 40), 128, np.uint8)) == []  # grayscale, non-square
    assert detect_objects(Image.new("RGBA", (50, 30), (0, 0, 0, 0))) == []
    obj = ShapeObject("circle", "green", "large", (1, 1))
    as_float = np.asarray(render_scene([obj], 64), dtype=np.float32) / 255.0
    assert [d.key() for d in detect_objects(as_float)] == [("circle", "green", "large", (1, 1))]
    with pytest.raises(CM3LeonError, match="dtype"):
        detect_objects(np.zeros((8, 8, 3), np.int64))
    with pytest.raises(CM3LeonError, match="PIL image or a numpy array"):
        detect_objects("image.png")


def test_checker_keeps_shapes_under_blur_and_colours_under_heavy_blur():
    from PIL import ImageFilter

    rng = random.Random(6)
    exact = colour_cell = total = 0
    for _ in range(60):
        objs = sample_scene(rng, 3)
        img = render_scene(objs, 32)
        exact += score_scene(detect_objects(img.filter(ImageFilter.GaussianBlur(0.6))), objs)["num_matched"]
        soft = img.resize((16, 16), Image.BILINEAR).resize((32, 32), Image.BILINEAR)  # half the resolution
        dets = detect_objects(soft)
        colour_cell += sum(any((d.color, d.cell) == (o.color, o.cell) for d in dets) for o in objs)
        total += len(objs)
    assert exact / total >= 0.97 and colour_cell / total >= 0.9


def test_checker_tolerates_mild_noise_and_colour_shift():
    rng, nrng = random.Random(5), np.random.default_rng(5)
    hits = total = 0
    for _ in range(60):
        objs = sample_scene(rng, 3)
        img = np.asarray(render_scene(objs, 64)).astype(float)
        img = img + nrng.normal(0, 8, img.shape) + nrng.uniform(-15, 15, 3)
        s = score_scene(detect_objects(np.clip(img, 0, 255).astype(np.uint8)), objs)
        hits, total = hits + s["num_matched"], total + s["num_truth"]
    assert hits / total >= 0.97


def test_score_scene_counts_exact_matches_only():
    truth = [ShapeObject("circle", "red", "small", (0, 0)), ShapeObject("square", "blue", "large", (2, 2))]
    dets = detect_objects(render_scene(truth, 64))
    s = score_scene(dets, truth)
    assert s["exact"] and s["precision"] == s["recall"] == 1.0
    wrong = [ShapeObject("circle", "red", "large", (0, 0)), truth[1]]  # size differs
    s = score_scene(dets, [o.to_dict() for o in wrong])
    assert not s["exact"] and s["recall"] == 0.5 and s["precision"] == 0.5
    assert score_scene([], truth)["recall"] == 0.0 and score_scene([], [])["exact"]


def test_check_prompt_true_on_its_rendering_for_every_template_and_false_on_wrong_colour():
    rng = random.Random(2)
    for _ in range(30):
        objs = sample_scene(rng, 2)
        for template in usable_templates(objs):
            cap = caption_scene(objs, rng, template)
            res = check_prompt(render_scene(objs, 32), cap)
            assert res["all_ok"], (cap, res["detections"])
        recoloured = [ShapeObject(objs[0].shape, next(c for c in ("red", "blue") if c != objs[0].color),
                                  objs[0].size, objs[0].cell)] + objs[1:]
        res = check_prompt(render_scene(recoloured, 32), caption_scene(objs, rng, "list"))
        assert not res["colour_ok"] and not res["all_ok"]


def test_check_prompt_checks_position_relation_shape_and_count():
    red_top = ShapeObject("circle", "red", "large", (0, 1))
    blue_bottom = ShapeObject("square", "blue", "large", (2, 1))
    img = render_scene([red_top, blue_bottom], 64)
    assert check_prompt(img, "a red circle above a blue square")["all_ok"]
    res = check_prompt(img, "a red circle below a blue square")
    assert res["colour_ok"] and res["shape_ok"] and not res["position_ok"] and not res["all_ok"]
    res = check_prompt(img, "a red circle in the center and a blue square at the bottom")
    assert not res["position_ok"]
    res = check_prompt(img, "a red triangle and a blue square")
    assert res["colour_ok"] and not res["shape_ok"]
    res = check_prompt(img, "a red circle")
    assert res["colour_ok"] and not res["count_ok"] and not res["all_ok"]
    res = check_prompt(img, "a small red circle and a blue square")
    assert not res["size_ok"]
    assert check_prompt(img, [red_top, blue_bottom])["all_ok"]
    assert check_prompt(img, [{"shape": "circle", "color": "red"}, {"shape": "square", "color": "blue"}])["all_ok"]
    blank = check_prompt(Image.new("RGB", (64, 64), "white"), "a red circle")
    assert not blank["colour_ok"] and blank["num_detected"] == 0
    with pytest.raises(CM3LeonError, match="names no object"):
        check_prompt(img, "a picture of something")


def test_caption_correct_on_right_and_wrong_captions():
    truth = [ShapeObject("circle", "red", "small", (0, 0)), ShapeObject("square", "blue", "large", (2, 2))]
    ok = caption_correct("a small red circle and a large blue square", truth)
    assert ok["all_ok"] and ok["colour_ok"] and ok["shape_ok"] and ok["size_ok"] and ok["recall"] == 1.0
    swapped = caption_correct("a red square and a blue circle", truth)  # right words, wrong pairs
    assert swapped["colour_ok"] and swapped["shape_ok"] and not swapped["all_ok"] and swapped["recall"] == 0.0
    wrong_colour = caption_correct("a green circle and a blue square", truth)
    assert not wrong_colour["colour_ok"] and wrong_colour["shape_ok"] and wrong_colour["recall"] == 0.5
    assert not caption_correct("a large red circle and a large blue square", truth)["size_ok"]
    assert not caption_correct("a red circle", truth)["all_ok"]
    nothing = caption_correct("", truth)
    assert not nothing["colour_ok"] and nothing["precision"] == 0.0
    assert caption_correct("a red circle", [truth[0].to_dict()])["all_ok"]
