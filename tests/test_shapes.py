"""The built-in shapes dataset: determinism, files and keys, splits, rendering, captions."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from cm3leon.data.shapes import (
    CAPTION_TEMPLATES, COLORS, POSITIONS, SHAPES, SIZES, ShapeObject, caption_scene, parse_caption,
    render_scene, sample_scene, synthesize, usable_templates,
)
from cm3leon.errors import CM3LeonError


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes") / "ds"
    summary = synthesize(out, num=40, size=32, seed=3)
    return out, summary


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_vocabulary_meets_the_dataset_contract():
    assert len(SHAPES) >= 4 and len(COLORS) >= 6 and SIZES == ("small", "large")
    assert len(POSITIONS) == 9 and sorted(POSITIONS.values()) == [(r, c) for r in range(3) for c in range(3)]
    rgb = np.asarray(list(COLORS.values()), dtype=float)
    dist = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1)
    assert dist[~np.eye(len(rgb), dtype=bool)].min() > 60  # colours well separated


def test_same_seed_gives_identical_bytes_and_other_seed_differs(ds, tmp_path):
    out, _ = ds
    again = tmp_path / "again"
    synthesize(again, num=40, size=32, seed=3)
    for name in ("captions.jsonl", "annotations.jsonl", "vqa.jsonl", "edits.jsonl", "layouts.jsonl",
                 "dataset.json", "images/000000.png", "images/000017.png", "edits/000005.png"):
        assert (out / name).read_bytes() == (again / name).read_bytes(), name
    other = tmp_path / "other"
    synthesize(other, num=40, size=32, seed=4)
    assert (out / "captions.jsonl").read_bytes() != (other / "captions.jsonl").read_bytes()
    assert any((out / f"images/{i:06d}.png").read_bytes() != (other / f"images/{i:06d}.png").read_bytes()
               for i in range(3))


def test_smaller_dataset_is_a_prefix_of_a_larger_one(ds, tmp_path):
    out, _ = ds
    small = tmp_path / "small"
    synthesize(small, num=10, size=32, seed=3)
    assert _rows(small / "captions.jsonl") == _rows(out / "captions.jsonl")[:10]


def test_every_file_has_the_documented_keys_and_splits(ds):
    out, summary = ds
    caps = _rows(out / "captions.jsonl")
    assert len(caps) == 40 and all(set(r) == {"image", "text", "split", "template"} for r in caps)
    assert all((out / r["image"]).is_file() for r in caps)
    assert {r["split"] for r in caps} == {"train", "val", "test"}
    assert summary["splits"] == {"train": 36, "val": 2, "test": 2}

    ann = _rows(out / "annotations.jsonl")
    assert all(set(r) == {"image", "split", "objects"} for r in ann)
    for r in ann:
        assert 1 <= len(r["objects"]) <= 3
        cells = [tuple(o["cell"]) for o in r["objects"]]
        assert len(set(cells)) == len(cells)  # one object per cell: never overlapping
        for o in r["objects"]:
            assert set(o) == {"shape", "color", "size", "cell", "position", "bbox"}
            assert POSITIONS[o["position"]] == tuple(o["cell"])
            x0, y0, x1, y1 = o["bbox"]
            assert 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32

    vqa = _rows(out / "vqa.jsonl")
    assert all(set(r) == {"image", "question", "answer", "type", "split"} for r in vqa)
    assert {r["type"] for r in vqa} == {"color", "shape", "count", "existence", "position"}
    assert {r["answer"] for r in vqa if r["type"] == "existence"} == {"yes", "no"}

    edits = _rows(out / "edits.jsonl")
    assert all(set(r) == {"image", "instruction", "target_image", "type", "split"} for r in edits)
    assert all((out / r["target_image"]).is_file() for r in edits)
    assert {r["type"] for r in edits} <= {"recolor", "move", "remove", "add"} and len({r["type"] for r in edits}) >= 3

    lay = _rows(out / "layouts.jsonl")
    assert all(set(r) == {"image", "caption", "objects", "split"} for r in lay)
    assert all(set(o) == {"name", "bbox"} for r in lay for o in r["objects"])

    meta = json.loads((out / "dataset.json").read_text())
    assert meta["counts"]["vqa"] == len(vqa) and meta["num"] == 40 and meta["size"] == 32
    assert meta["colors"] == {k: list(v) for k, v in COLORS.items()}
    assert meta["shapes"] == list(SHAPES) and meta["positions"]["top left"] == [0, 0]


def test_vqa_answers_and_edit_targets_agree_with_annotations(ds):
    out, _ = ds
    ann = {r["image"]: r["objects"] for r in _rows(out / "annotations.jsonl")}
    for r in _rows(out / "vqa.jsonl"):
        objs = ann[r["image"]]
        if r["type"] == "existence":
            named = r["question"][len("Is there "):-1].split()[-2:]
            assert (r["answer"] == "yes") == any([o["color"], o["shape"]] == named for o in objs)
        if r["type"] == "position":
            assert r["answer"] in {o["position"] for o in objs}
    from cm3leon.data.checker import detect_objects
    from PIL import Image

    for r in _rows(out / "edits.jsonl")[:10]:
        before = detect_objects(Image.open(out / r["image"]))
        after = detect_objects(Image.open(out / r["target_image"]))
        delta = {"add": 1, "remove": -1, "recolor": 0, "move": 0}[r["type"]]
        assert len(after) == len(before) + delta, r


def test_rendering_matches_the_annotation(ds):
    out, _ = ds
    from PIL import Image

    r = _rows(out / "annotations.jsonl")[0]
    img = np.asarray(Image.open(out / r["image"]))
    for o in r["objects"]:
        x0, y0, x1, y1 = o["bbox"]
        cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2 + 1)  # +1: inside a triangle too
        assert np.abs(img[cy, cx].astype(int) - COLORS[o["color"]]).max() <= 2
    assert (img[0, 0] == 255).all()  # corner is background


def test_bad_arguments_raise_clear_errors(tmp_path):
    with pytest.raises(CM3LeonError, match="--size"):
        synthesize(tmp_path / "a", num=2, size=16)
    with pytest.raises(CM3LeonError, match="--size"):
        synthesize(tmp_path / "a", num=2, size=300)
    with pytest.raises(CM3LeonError, match="--num"):
        synthesize(tmp_path / "a", num=0)
    with pytest.raises(CM3LeonError, match="--max-objects"):
        synthesize(tmp_path / "a", num=2, max_objects=4)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("user data")
    with pytest.raises(CM3LeonError, match="refusing"):
        synthesize(tmp_path / "busy", num=2, size=32)
    assert (tmp_path / "busy" / "keep.txt").read_text() == "user data"
    with pytest.raises(CM3LeonError, match="shape"):
        ShapeObject("hexagon", "red", "small", (0, 0))
    with pytest.raises(CM3LeonError, match="cell"):
        ShapeObject("circle", "red", "small", (3, 0))


def test_resynthesis_replaces_a_previous_dataset(tmp_path):
    out = tmp_path / "ds"
    synthesize(out, num=5, size=32, seed=0)
    synthesize(out, num=3, size=32, seed=0)
    assert len(_rows(out / "captions.jsonl")) == 3 and not (out / "images/000004.png").exists()


@pytest.mark.parametrize("template", CAPTION_TEMPLATES)
def test_parse_caption_round_trips_every_template(template):
    rng = random.Random(template)
    seen = 0
    for _ in range(300):
        objects = sample_scene(rng, 3)
        if template not in usable_templates(objects):
            continue
        seen += 1
        text = caption_scene(objects, rng, template)
        parsed = parse_caption(text)
        assert [(p["color"], p["shape"]) for p in parsed] == [(o.color, o.shape) for o in objects], text
        for i, (p, o) in enumerate(zip(parsed, objects)):
            assert p["size"] in (None, o.size), text
            if p["position"] is not None:
                assert p["position"] == o.position and tuple(p["cell"]) == o.cell, text
            if p["relation"] is not None:
                other = objects[p["relation_to"]]
                want = {"above": o.cell[0] < other.cell[0], "below": o.cell[0] > other.cell[0],
                        "to the left of": o.cell[1] < other.cell[1], "to the right of": o.cell[1] > other.cell[1]}
                assert want[p["relation"]], text
        stated = {"list": 0, "count": 0, "positions": len(objects), "there_is": 1, "relation": len(objects) - 2}
        assert sum(p["position"] is not None for p in parsed) == stated[template], text
        if template == "relation":
            assert parsed[0]["relation"] is not None and parsed[0]["relation_to"] == 1
    assert seen > 20


def test_caption_templates_state_sizes_sometimes_and_use_an_before_vowels():
    rng = random.Random(0)
    obj = [ShapeObject("circle", "orange", "small", (1, 1))]
    caps = {caption_scene(obj, rng, "list") for _ in range(40)}
    assert caps == {"a small orange circle", "an orange circle"}
    assert parse_caption("there is a large blue square at the bottom")[0]["cell"] == [2, 1]


def test_render_size_contract():
    img = render_scene([ShapeObject("square", "red", "large", (1, 1))], 32)
    assert img.size == (32, 32) and img.mode == "RGB"
    with pytest.raises(CM3LeonError, match="size"):
        render_scene([], 31)


def test_scenes_do_not_depend_on_the_process_hash_seed():
    # str seeds go through SHA-512, not Python's salted hash(): two processes agree
    import os
    import subprocess
    import sys

    code = ("from cm3leon.data.shapes import *; r = scene_rng(0, 5); o = sample_scene(r, 3); "
            "print(caption_scene(o, r), [x.cell for x in o])")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": h}).stdout for h in ("1", "2")}
    assert len(outs) == 1 and outs.pop().strip()


def test_webdataset_shards_hold_the_folder_scenes_and_read_back(ds, tmp_path):
    """`--format webdataset`: shards of `shard_size` scenes, byte-identical for a seed, whose
    records (read back by the webdataset reader) are the folder set's captions, splits and
    scenes, in order."""
    from cm3leon.data.readers import open_dataset
    from cm3leon.data.shapes import synthesize_webdataset

    folder, _ = ds
    out = tmp_path / "wds"
    summary = synthesize_webdataset(out, num=40, size=32, seed=3, shard_size=16)
    assert summary["num_shards"] == 3 and summary["splits"] == {"train": 36, "val": 2, "test": 2}
    assert sorted(p.name for p in out.iterdir()) == ["00000.tar", "00001.tar", "00002.tar", "dataset.json",
                                                     "synth_args.json"]
    again = tmp_path / "again"
    synthesize_webdataset(again, num=40, size=32, seed=3, shard_size=16)
    for p in out.iterdir():
        assert (again / p.name).read_bytes() == p.read_bytes(), p.name

    records = list(open_dataset(out, size=32))
    captions = _rows(folder / "captions.jsonl")
    annotations = _rows(folder / "annotations.jsonl")
    assert [r.key for r in records] == [f"{i:09d}" for i in range(40)]
    assert [(r.text, r.split) for r in records] == [(c["text"], c["split"]) for c in captions]
    assert [r.meta["objects"] for r in records] == [a["objects"] for a in annotations]
    assert [r.meta["template"] for r in records] == [c["template"] for c in captions]
    png = np.asarray(render_scene([ShapeObject.from_dict(o) for o in annotations[5]["objects"]], 32), float)
    assert np.abs(np.asarray(records[5].image, float) - png).mean() < 2.0  # the same picture, JPEG-compressed


def test_webdataset_synthesis_resumes_after_its_last_whole_shard(tmp_path):
    from cm3leon.data.shapes import synthesize_webdataset

    straight = tmp_path / "straight"
    synthesize_webdataset(straight, num=30, size=32, seed=1, shard_size=10)
    run = tmp_path / "run"
    synthesize_webdataset(run, num=30, size=32, seed=1, shard_size=10)
    # as a kill would leave it: shard 2 half-written (a temporary), no dataset.json
    (run / "00002.tar").rename(run / ".00002.tar.abc.tmp")
    (run / "dataset.json").unlink()
    before = (run / "00000.tar").stat().st_mtime_ns
    summary = synthesize_webdataset(run, num=30, size=32, seed=1, shard_size=10)
    assert summary["shards_resumed"] == 2 and (run / "00000.tar").stat().st_mtime_ns == before
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in straight.iterdir())
    for p in straight.iterdir():
        assert (run / p.name).read_bytes() == p.read_bytes(), p.name


def test_webdataset_synthesis_refuses_other_settings_and_foreign_folders(tmp_path):
    from cm3leon.cli import main
    from cm3leon.data.shapes import synthesize_webdataset

    synthesize_webdataset(tmp_path / "a", num=5, size=32, seed=0, shard_size=4)
    with pytest.raises(CM3LeonError, match=r"synth_args.json holds scenes of other settings"):
        synthesize_webdataset(tmp_path / "a", num=5, size=32, seed=1, shard_size=4)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    with pytest.raises(CM3LeonError, match="non-empty folder"):
        synthesize_webdataset(tmp_path / "b", num=5, size=32, shard_size=4)
    with pytest.raises(CM3LeonError, match="--shard-size"):
        synthesize_webdataset(tmp_path / "c", num=5, size=32, shard_size=0)
    assert main(["data", "synth", "--out", str(tmp_path / "d"), "--num", "5", "--shard-size", "4"]) == 2
    assert main(["data", "synth", "--out", str(tmp_path / "e"), "--num", "5", "--size", "32",
                 "--format", "webdataset", "--shard-size", "4"]) == 0
    assert sorted(p.name for p in (tmp_path / "e").glob("*.tar")) == ["00000.tar", "00001.tar"]
