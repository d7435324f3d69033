"""Dataset readers: bad records skipped and counted, mode conversions, the three formats agree,
disjoint worker / rank splits, seeded shuffle, resize + centre crop, `cm3leon data check`."""

import collections
import io
import json
import os
import resource
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cm3leon.cli import main
from cm3leon.data import readers
from cm3leon.data.readers import (
    SKIP_REASONS, SPLITS, check_dataset, collate_records, hash_split, iter_texts, load_image,
    open_dataset, outside_root_allowed, read_jsonl_images, resize_center_crop,
)
from cm3leon.errors import CM3LeonError

SIZE = 16


def _image(seed: int, w: int = 24, h: int = 24) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _png(img: Image.Image) -> bytes:
    b = io.BytesIO()
    img.save(b, "PNG")
    return b.getvalue()


def _png_header(w: int, h: int) -> bytes:
    """A valid PNG signature + IHDR claiming w x h pixels, with no real pixel data."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


GOOD = [(f"img{i:03d}", f"caption number {i}") for i in range(12)]


def _write_folder(root: Path, items=GOOD, extra_lines=()) -> Path:
    (root / "images").mkdir(parents=True)
    lines = []
    for i, (stem, text) in enumerate(items):
        (root / "images" / f"{stem}.png").write_bytes(_png(_image(i)))
        lines.append(json.dumps({"image": f"images/{stem}.png", "text": text, "source": "test"}).encode())
    (root / "captions.jsonl").write_bytes(b"\n".join(lines + list(extra_lines)) + b"\n")
    return root


def _write_tars(root: Path, items=GOOD, num_shards: int = 3) -> dict:
    """Round-robin the items over shards; returns key -> shard index."""
    root.mkdir(parents=True)
    where = {}
    tars = [tarfile.open(root / f"{s:05d}.tar", "w") for s in range(num_shards)]
    for i, (stem, text) in enumerate(items):
        s = i % num_shards
        _add(tars[s], f"{stem}.png", _png(_image(i)))
        if i % 2:
            _add(tars[s], f"{stem}.txt", text.encode())
        else:  # the img2dataset .json carries the caption too
            _add(tars[s], f"{stem}.json", json.dumps({"caption": text, "url": f"http://x/{i}"}).encode())
        where[stem] = s
    for tf in tars:
        tf.close()
    return where


def _write_coco(root: Path, items=GOOD, captions_per_image: int = 1) -> Path:
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, anns = [], []
    for i, (stem, text) in enumerate(items):
        (root / "val2017" / f"{stem}.png").write_bytes(_png(_image(i)))
        images.append({"id": 100 + i, "file_name": f"{stem}.png", "width": 24, "height": 24})
        for j in range(captions_per_image):
            anns.append({"id": 1000 + len(anns), "image_id": 100 + i, "caption": text if j == 0 else f"{text} v{j}"})
    path = root / "annotations" / "captions_val2017.json"
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    return path


def _normalised(reader, coco: bool = False) -> list:
    """(image stem, text, split, pixels) per record: keys differ by format, the rest must not."""
    out = []
    for r in reader:
        key = r.key.rsplit("/", 1)[0] if coco else r.key  # COCO keys are "<file stem>/<annotation id>"
        out.append((key.rsplit("/", 1)[-1], r.text, r.split, np.asarray(r.image).tobytes()))
    return sorted(out)


# --- bad records ----------------------------------------------------------------------------

def test_every_bad_folder_record_is_skipped_and_counted_while_good_ones_pass(tmp_path, capsys):
    root = _write_folder(tmp_path / "ds")
    img = root / "images"
    png = _png(_image(99))
    (img / "empty.png").write_bytes(b"")
    (img / "trunc.png").write_bytes(png[: len(png) // 2])
    (img / "text.png").write_bytes(b"this is not an image at all")
    (img / "bomb.png").write_bytes(_png_header(100_000, 100_000))
    (img / "ok_for_caption_tests.png").write_bytes(png)
    bad = [
        (json.dumps({"image": "images/nope.png", "text": "x"}).encode(), "missing_file"),
        (json.dumps({"image": "images/empty.png", "text": "x"}).encode(), "empty_file"),
        (json.dumps({"image": "images/trunc.png", "text": "x"}).encode(), "truncated_image"),
        (json.dumps({"image": "images/text.png", "text": "x"}).encode(), "not_an_image"),
        (json.dumps({"image": "images/bomb.png", "text": "x"}).encode(), "decompression_bomb"),
        (json.dumps({"image": "images/ok_for_caption_tests.png", "text": "   "}).encode(), "empty_caption"),
        (b'{"image": "images/ok_for_caption_tests.png", "text": "caf\xe9 latin-1"}', "bad_caption_encoding"),
        (b'{"image": "images/ok_for_caption_tests.png", "text": "\\ud800 lone surrogate"}', "bad_caption_encoding"),
        (b'{"image": "images/ok_for_caption_tests.png", "text": "unterminated', "malformed_json"),
        (b'["a", "list"]', "malformed_json"),
        (json.dumps({"image": "images/ok_for_caption_tests.png"}).encode(), "missing_field"),
        (json.dumps({"text": "no image"}).encode(), "missing_field"),
    ]
    lines = (root / "captions.jsonl").read_bytes().splitlines()
    # interleave bad lines with good ones so a bad record cannot end the stream early
    mixed = [x for pair in zip(lines, [b for b, _ in bad]) for x in pair] + lines[len(bad):]
    (root / "captions.jsonl").write_bytes(b"\n".join(mixed) + b"\n")
    expected = collections.Counter(reason for _, reason in bad)

    reader = open_dataset(root, size=SIZE)
    records = list(reader)
    assert sorted(r.key for r in records) == [f"images/{stem}" for stem, _ in GOOD]
    assert all(r.image.size == (SIZE, SIZE) and r.image.mode == "RGB" for r in records)
    assert all(r.meta == {"source": "test"} for r in records)
    assert reader.stats == expected and reader.num_ok == len(GOOD)
    assert set(expected) <= set(SKIP_REASONS)

    report = check_dataset(root, size=SIZE)
    assert report["format"] == "folder" and report["ok"] == len(GOOD)
    assert report["skipped"] == len(bad) and report["skipped_by_reason"] == dict(expected)
    assert sum(report["splits"].values()) == len(GOOD)

    capsys.readouterr()
    assert main(["data", "check", str(root), "--size", str(SIZE), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["skipped_by_reason"] == dict(expected) and printed["ok"] == len(GOOD)


def test_every_bad_tar_record_and_shard_is_skipped_and_counted(tmp_path):
    root = tmp_path / "shards"
    _write_tars(root, num_shards=2)
    png = _png(_image(99))
    with tarfile.open(root / "00002.tar", "w") as tf:
        _add(tf, "only_image.png", png)                                   # missing_caption
        _add(tf, "only_caption.txt", b"a caption without its image")     # missing_image
        _add(tf, "badtxt.png", png); _add(tf, "badtxt.txt", b"caf\xe9")   # bad_caption_encoding
        _add(tf, "badjson.png", png); _add(tf, "badjson.json", b"{nope")  # malformed_json
        _add(tf, "nocap.png", png); _add(tf, "nocap.json", b'{"url": "u"}')  # missing_caption
        _add(tf, "blank.png", png); _add(tf, "blank.txt", b"  \n")         # empty_caption
        _add(tf, "zero.png", b""); _add(tf, "zero.txt", b"zero bytes")    # empty_file
        _add(tf, "junk.jpg", b"GIF? no"); _add(tf, "junk.txt", b"junk")   # not_an_image
        _add(tf, "cut.png", png[: len(png) // 2]); _add(tf, "cut.txt", b"cut")        # truncated_image
    # a shard cut mid-archive: the records before the cut still come through
    cut_items = [(f"late{i}", f"late caption {i}") for i in range(6)]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for i, (stem, text) in enumerate(cut_items):
            _add(tf, f"{stem}.png", _png(_image(50 + i, 64, 64)))
            _add(tf, f"{stem}.txt", text.encode())
    (root / "00003.tar").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "00004.tar").write_bytes(b"not a tar archive " * 40)

    reader = open_dataset(root, size=SIZE)
    keys = [r.key for r in reader]
    good = {stem for stem, _ in GOOD}
    late = [k for k in keys if k.startswith("late")]
    assert good <= set(keys) and set(keys) - good == set(late)
    assert 0 < len(late) < len(cut_items) and late == [s for s, _ in cut_items[: len(late)]]
    assert reader.stats == collections.Counter(
        missing_caption=2, missing_image=1, bad_caption_encoding=1, malformed_json=1, empty_caption=1,
        empty_file=1, not_an_image=1, truncated_image=1, truncated_shard=1, bad_shard=1)
    assert check_dataset(root, size=SIZE)["skipped_by_reason"] == dict(reader.stats)


# --- confined inputs ------------------------------------------------------------------------

def _outside_folder(tmp_path: Path) -> tuple[Path, Path]:
    """A dataset folder whose captions name files outside it (absolute, "..", a symlink out),
    a FIFO, an oversized caption and an oversized JSONL line, beside two good records."""
    root = tmp_path / "data"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(_png(_image(7)))
    _write_folder(root, items=GOOD[:2])
    (root / "images" / "link.png").symlink_to(outside / "secret.png")
    (root / "images" / "dirlink").symlink_to(outside, target_is_directory=True)
    os.mkfifo(root / "images" / "pipe.png")
    rows = [{"image": "../outside/secret.png", "text": "dot-dot"},
            {"image": str(outside / "secret.png"), "text": "absolute"},
            {"image": "images/link.png", "text": "a symlink out"},
            {"image": "images/dirlink/secret.png", "text": "through a symlinked folder"},
            {"image": "../outside/absent.png", "text": "an outside file that does not exist"},
            {"image": "images/pipe.png", "text": "a FIFO"},
            {"image": "images/img000.png", "text": "x" * (readers.MAX_CAPTION_CHARS + 1)}]
    with open(root / "captions.jsonl", "ab") as f:
        for r in rows:
            f.write(json.dumps(r).encode() + b"\n")
        f.write(b'{"image": "images/img001.png", "text": "' + b"y" * (readers.MAX_LINE_BYTES + 10) + b'"}\n')
        f.write(json.dumps({"image": "images/img001.png", "text": "the line after the long one"}).encode() + b"\n")
    return root, outside


def test_paths_that_leave_the_dataset_folder_are_skipped_without_revealing_what_exists(tmp_path):
    root, _ = _outside_folder(tmp_path)
    reader = open_dataset(root, size=SIZE)
    texts = [r.text for r in reader]  # returns: a FIFO must not hang the reader
    assert sorted(texts) == sorted([GOOD[0][1], GOOD[1][1], "the line after the long one"])
    # five paths out (existing or not: the same reason), the FIFO, the long caption, the long line
    assert reader.stats == collections.Counter(outside_root=5, not_a_file=1, too_large=2)
    assert check_dataset(root, size=SIZE)["skipped_by_reason"] == dict(reader.stats)
    # captions only: the same records, no image opened
    assert sorted(iter_texts(root)) == sorted(texts + ["a FIFO"])  # the FIFO is only found when opened


def test_allow_outside_root_reads_paths_out_of_the_folder(tmp_path, capsys):
    root, _ = _outside_folder(tmp_path)
    with outside_root_allowed(True):
        reader = open_dataset(root, size=SIZE)
        texts = [r.text for r in reader]
    assert {"dot-dot", "absolute", "a symlink out", "through a symlinked folder"} <= set(texts)
    assert reader.stats["outside_root"] == 0 and reader.stats["missing_file"] == 1
    assert main(["data", "check", str(root), "--size", str(SIZE)]) == 0
    assert "outside_root: 5" in capsys.readouterr().out
    assert main(["--allow-outside-root", "data", "check", str(root), "--size", str(SIZE)]) == 0
    assert "outside_root:" not in capsys.readouterr().out


def test_coco_file_names_and_instruction_rows_are_confined_too(tmp_path):
    ann = _write_coco(tmp_path / "coco", items=GOOD[:2])
    (tmp_path / "coco" / "secret.png").write_bytes(_png(_image(3)))
    data = json.loads(ann.read_text())
    data["images"].append({"id": 7, "file_name": "../secret.png"})
    data["annotations"].append({"id": 9, "image_id": 7, "caption": "outside"})
    ann.write_text(json.dumps(data))
    reader = open_dataset(ann, size=SIZE)
    assert len(list(reader)) == 2 and reader.stats == collections.Counter(outside_root=1)

    folder = _write_folder(tmp_path / "sft", items=GOOD[:1])
    (folder / "vqa.jsonl").write_text(json.dumps({"image": "images/img000.png", "question": "q", "answer": "a"}) + "\n"
                                      + json.dumps({"image": "../coco/secret.png", "question": "q", "answer": "a"}) + "\n")
    stats = collections.Counter()
    assert len(list(read_jsonl_images(folder, "vqa.jsonl", size=SIZE, stats=stats))) == 1
    assert stats == collections.Counter(outside_root=1)


def test_oversized_tar_members_are_skipped_unread(tmp_path):
    root = tmp_path / "shards"
    root.mkdir()
    with tarfile.open(root / "00000.tar", "w:gz") as tf:
        _add(tf, "ok.png", _png(_image(1)))
        _add(tf, "ok.txt", b"a fine caption")
        _add(tf, "bomb.png", _png(_image(2)))
        _add(tf, "bomb.txt", b"a" * (readers.MAX_TEXT_BYTES + 1))  # inflates past the cap
    assert (root / "00000.tar").stat().st_size < 20_000
    reader = open_dataset(root, size=SIZE)
    assert [r.text for r in reader] == ["a fine caption"]
    assert reader.stats == collections.Counter(too_large=1)


# --- images ---------------------------------------------------------------------------------

def _solid(mode: str, value, size=(4, 4)) -> Image.Image:
    return Image.new(mode, size, value)


def test_image_modes_convert_to_correct_rgb(tmp_path):
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))  # index 1 = red
    transparent_palette = palette.copy()
    transparent_palette.info["transparency"] = 1
    sixteen = np.full((4, 4), 32768, dtype=np.uint16)
    sixteen[0, 0], sixteen[0, 1] = 65535, 1000
    cases = {
        "cmyk.tif": (_solid("CMYK", (0, 255, 255, 0)), (255, 0, 0)),  # cyan 0, magenta+yellow -> red
        "grey.png": (_solid("L", 100), (100, 100, 100)),
        "pal.png": (palette, (255, 0, 0)),
        "paltrans.png": (transparent_palette, (255, 255, 255)),
        "rgba.png": (_solid("RGBA", (255, 0, 0, 128)), (255, 127, 127)),  # half red over white
        "la.png": (_solid("LA", (0, 0)), (255, 255, 255)),  # fully transparent black
        "sixteen.png": (Image.fromarray(sixteen), (128, 128, 128)),  # 16-bit: 32768 -> 128, not 255
        "int32.tif": (Image.fromarray(sixteen.astype(np.int32)), (128, 128, 128)),
    }
    (tmp_path / "captions.jsonl").write_text("".join(
        json.dumps({"image": name, "text": name}) + "\n" for name in cases))
    for name, (img, _) in cases.items():
        img.save(tmp_path / name)
    assert Image.open(tmp_path / "sixteen.png").mode.startswith("I")  # the file really is 16-bit

    reader = open_dataset(tmp_path, size=4)
    got = {r.text: np.asarray(r.image) for r in reader}
    assert not reader.stats and set(got) == set(cases)
    for name, (_, rgb) in cases.items():
        assert got[name].dtype == np.uint8 and got[name].shape == (4, 4, 3)
        assert np.abs(got[name][2, 2].astype(int) - rgb).max() <= 1, (name, got[name][2, 2])
    assert tuple(got["sixteen.png"][0, 0]) == (255, 255, 255)
    assert tuple(got["sixteen.png"][0, 1]) == (4, 4, 4)  # 1000/65535*255, a dark grey


def test_resize_center_crop_keeps_the_centre_and_is_noop_at_size():
    wide = np.zeros((32, 64, 3), dtype=np.uint8)
    wide[:, :16] = (255, 0, 0)
    wide[:, 16:48] = (0, 255, 0)  # the centre square
    wide[:, 48:] = (0, 0, 255)
    out = np.asarray(resize_center_crop(Image.fromarray(wide), SIZE))
    assert out.shape == (SIZE, SIZE, 3)
    assert (out == (0, 255, 0)).all()

    tall = np.zeros((40, 20, 3), dtype=np.uint8)
    tall[10:30] = 200
    out = np.asarray(load_image(_png(Image.fromarray(tall)), size=10))
    assert out.shape == (10, 10, 3) and (out == 200).all()

    img = _image(3, SIZE, SIZE)
    assert resize_center_crop(img, SIZE) is img
    assert np.array_equal(np.asarray(load_image(_png(img), size=SIZE)), np.asarray(img))
    assert load_image(_png(_image(4, 20, 30)), size=None).size == (20, 30)


def test_decompression_bomb_is_skipped_without_allocating(tmp_path):
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    for w, h in [(12_000, 12_000), (100_000, 100_000)]:  # above our cap; above PIL's own hard cap
        with pytest.raises(Exception) as e:
            load_image(_png_header(w, h), size=SIZE)
        assert getattr(e.value, "reason", None) == "decompression_bomb"
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert grown_mib < 100  # decoding 12000^2 RGB would need ~430 MiB

    # the cap is configurable: a tiny one rejects an ordinary image
    root = _write_folder(tmp_path / "ds", GOOD[:3])
    reader = open_dataset(root, size=SIZE, max_pixels=20 * 20)
    assert list(reader) == [] and reader.stats == {"decompression_bomb": 3}


# --- formats --------------------------------------------------------------------------------

def test_folder_tar_and_coco_readers_yield_the_same_records(tmp_path):
    folder = _write_folder(tmp_path / "folder")
    _write_tars(tmp_path / "tars", num_shards=3)
    coco = _write_coco(tmp_path / "coco")
    a = _normalised(open_dataset(folder, size=SIZE))
    b = _normalised(open_dataset(tmp_path / "tars", size=SIZE))
    c = _normalised(open_dataset(coco, size=SIZE), coco=True)  # images found in ../val2017 by default
    assert len(a) == len(GOOD) and a == b == c
    assert {s for _, _, s, _ in a} <= set(SPLITS)
    # single shard, glob and brace-range paths read the same shards
    assert len(list(open_dataset(tmp_path / "tars" / "00000.tar", size=SIZE))) == 4
    assert _normalised(open_dataset(str(tmp_path / "tars" / "*.tar"), size=SIZE)) == b
    assert _normalised(open_dataset(str(tmp_path / "tars" / "{00000..00002}.tar"), size=SIZE)) == b
    # captions alone, in the same order as the records
    assert sorted(iter_texts(folder)) == sorted(iter_texts(tmp_path / "tars")) == sorted(t for _, t in GOOD)


def test_coco_gives_one_record_per_caption_with_all_references(tmp_path):
    coco = _write_coco(tmp_path / "coco", GOOD[:3], captions_per_image=2)
    records = list(open_dataset(coco, size=SIZE, images=tmp_path / "coco" / "val2017"))
    assert len(records) == 6 and len({r.key for r in records}) == 6
    by_image = collections.defaultdict(list)
    for r in records:
        by_image[r.meta["image_id"]].append(r)
    for recs in by_image.values():
        assert sorted(r.text for r in recs) == sorted(recs[0].meta["references"])
        assert len({r.split for r in recs}) == 1  # an image's captions never straddle splits
    with pytest.raises(FileNotFoundError, match="image folder"):
        list(open_dataset(coco, size=SIZE, images=tmp_path / "no_such_folder"))


def test_iter_texts_reads_captions_without_opening_images_and_filters_splits(tmp_path):
    items = [(f"img{i:03d}", f"caption {i}") for i in range(60)]
    root = tmp_path / "ds"
    root.mkdir()
    lines = [json.dumps({"image": f"gone/{s}.png", "text": t}) for s, t in items]  # no image files at all
    lines.append(json.dumps({"image": "gone/fixed.png", "text": "pinned to val", "split": "val"}))
    lines.append(json.dumps({"image": "gone/blank.png", "text": ""}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    texts = list(iter_texts(root))
    assert texts == [t for _, t in items] + ["pinned to val"]
    per_split = {s: list(iter_texts(root, split=s)) for s in SPLITS}
    assert sorted(sum(per_split.values(), [])) == sorted(texts)
    assert "pinned to val" in per_split["val"]
    assert per_split["train"] == [t for (s, t) in items if hash_split(s) == "train"]
    with pytest.raises(CM3LeonError, match="split"):
        iter_texts(root, split="validation")


def test_hash_split_is_stable_and_near_90_5_5():
    names = [f"{i:09d}" for i in range(20_000)]
    counts = collections.Counter(hash_split(n) for n in names)
    assert abs(counts["train"] / 20_000 - 0.90) < 0.01
    assert abs(counts["val"] / 20_000 - 0.05) < 0.01 and abs(counts["test"] / 20_000 - 0.05) < 0.01
    assert hash_split("000012345") == hash_split("000012345")


# --- work division and shuffle --------------------------------------------------------------

def test_rank_and_worker_splits_are_disjoint_and_cover_everything(tmp_path):
    from torch.utils.data import DataLoader

    folder = _write_folder(tmp_path / "folder")
    where = _write_tars(tmp_path / "tars", num_shards=4)
    everything = sorted(f"images/{s}" for s, _ in GOOD)

    # by record index (one captions.jsonl): 3 ranks
    parts = [[r.key for r in open_dataset(folder, size=4, rank=k, world_size=3)] for k in range(3)]
    assert all(parts) and sorted(sum(parts, [])) == everything

    # 2 ranks x 2 DataLoader workers = 4 parts over 4 shards: whole shards per part
    seen = []
    for rank in range(2):
        ds = open_dataset(tmp_path / "tars", size=4, rank=rank, world_size=2)
        keys = [r.key for r in DataLoader(ds, batch_size=None, num_workers=2)]
        assert len({where[k] for k in keys}) == 2  # this rank read exactly two whole shards
        seen += keys
    assert sorted(seen) == sorted(where) and len(seen) == len(set(seen))

    # by record index across shards when asked, 5 parts > 4 shards
    parts = [[r.key for r in open_dataset(tmp_path / "tars", size=4, rank=k, world_size=5)] for k in range(5)]
    assert all(parts) and sorted(sum(parts, [])) == sorted(where)


def test_shuffle_is_deterministic_by_seed_and_differs_across_seeds(tmp_path):
    items = [(f"img{i:03d}", f"caption {i}") for i in range(40)]
    _write_tars(tmp_path / "tars", items, num_shards=4)

    def order(seed, epoch=0):
        ds = open_dataset(tmp_path / "tars", size=4, shuffle=True, seed=seed, shuffle_buffer=8)
        ds.set_epoch(epoch)
        return list(ds.texts())

    plain = list(iter_texts(tmp_path / "tars"))
    assert order(1) == order(1)
    assert order(1) != order(2) and order(1) != order(1, epoch=1) and order(1) != plain
    assert sorted(order(1)) == sorted(plain)
    shuffled = [r.text for r in open_dataset(tmp_path / "tars", size=4, shuffle=True, seed=1, shuffle_buffer=8)]
    assert shuffled == order(1)  # decoding images does not change the order

    # one captions.jsonl: the bounded buffer alone shuffles, and never looks further ahead than it holds
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "captions.jsonl").write_text(
        "".join(json.dumps({"image": f"{s}.png", "text": t}) + "\n" for s, t in items))
    runs = [list(open_dataset(tmp_path / "folder", shuffle=True, seed=seed, shuffle_buffer=8).texts()) for seed in (5, 5, 6)]
    assert runs[0] == runs[1] != runs[2] and sorted(runs[0]) == sorted(t for _, t in items)
    assert runs[0] != [t for _, t in items]
    position = {t: i for i, (_, t) in enumerate(items)}
    assert all(position[t] <= out_index + 8 for out_index, t in enumerate(runs[0]))


# --- helpers for other stages ---------------------------------------------------------------

def test_read_jsonl_images_loads_every_image_field_and_skips_bad_rows(tmp_path):
    for i in range(3):
        (tmp_path / f"a{i}.png").write_bytes(_png(_image(i)))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG nope")
    rows = [
        {"image": "a0.png", "target": "a1.png", "instruction": "make it blue"},
        {"image": "a1.png", "target": "broken.png", "instruction": "x"},
        {"image": "a2.png", "instruction": "no target"},
        {"image": "a2.png", "target": "a0.png", "instruction": "swap"},
    ]
    (tmp_path / "edits.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n{bad\n")
    stats = collections.Counter()
    out = list(read_jsonl_images(tmp_path, "edits.jsonl", image_keys=("image", "target"), size=8, stats=stats))
    assert [r["instruction"] for r in out] == ["make it blue", "swap"]
    assert all(r["image"].size == (8, 8) and r["target"].mode == "RGB" for r in out)
    assert stats == {"not_an_image": 1, "missing_field": 1, "malformed_json": 1}


def test_collate_records_stacks_images_channels_first(tmp_path):
    root = _write_folder(tmp_path / "ds", GOOD[:3])
    records = list(open_dataset(root, size=8))
    batch = collate_records(records)
    assert tuple(batch["images"].shape) == (3, 3, 8, 8) and str(batch["images"].dtype) == "torch.uint8"
    assert np.array_equal(batch["images"][1].permute(1, 2, 0).numpy(), np.asarray(records[1].image))
    assert batch["texts"] == [r.text for r in records]


def test_bad_paths_and_arguments_raise_clear_errors(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        open_dataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CM3LeonError, match="captions.jsonl"):
        open_dataset(tmp_path / "empty")
    (tmp_path / "x.json").write_text('{"images": []}')
    with pytest.raises(CM3LeonError, match="COCO"):
        list(open_dataset(tmp_path / "x.json"))
    with pytest.raises(CM3LeonError, match="rank"):
        open_dataset(_write_folder(tmp_path / "ds", GOOD[:1]), rank=3, world_size=2)
    assert main(["data", "check", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err


# --- fuzz -----------------------------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_NAMES = st.sampled_from(["a.png", "b.png", "sub/c.png", "../out.png", "/abs.png", "missing.png", "", "d.jpg"])
_TEXTS = st.one_of(st.text(max_size=40), st.none(), st.integers(), st.just("  "), st.just("ok caption"))
_RECORDS = st.one_of(
    st.fixed_dictionaries({"image": st.one_of(_NAMES, st.integers(), st.none()), "text": _TEXTS},
                          optional={"split": st.sampled_from(["train", "val", "test", "dev", 3])}).map(
        lambda d: json.dumps(d).encode()),
    st.binary(max_size=60).filter(lambda b: b"\n" not in b and b"\r" not in b),
)
_FILES = st.one_of(st.binary(max_size=80), st.just("png"), st.just("truncated"))


def _fuzz_png(kind, seed: int) -> bytes:
    png = _png(_image(seed, 8, 8))
    return png if kind == "png" else png[: len(png) // 2] if kind == "truncated" else kind


@settings(max_examples=40, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(_RECORDS, max_size=12), files=st.dictionaries(st.sampled_from(["a.png", "b.png", "d.jpg"]),
                                                                     _FILES, max_size=3))
def test_fuzzed_caption_folders_yield_or_count_every_record_and_never_raise(tmp_path_factory, lines, files):
    root = tmp_path_factory.mktemp("fuzz")
    (root / "sub").mkdir()
    for i, (name, kind) in enumerate(files.items()):
        (root / name).write_bytes(_fuzz_png(kind, i))
    (root / "sub" / "c.png").write_bytes(_png(_image(9, 8, 8)))
    (root / "captions.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    reader = open_dataset(root, size=SIZE)
    records = list(reader)  # never raises
    records_lines = sum(1 for line in lines if line.strip())
    assert len(records) + sum(reader.stats.values()) == records_lines
    assert set(reader.stats) <= set(SKIP_REASONS)
    assert all(r.image.size == (SIZE, SIZE) and r.text.strip() for r in records)


@settings(max_examples=30, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(members=st.lists(st.tuples(st.sampled_from(["k1", "k2", "k3", "dir/k4"]),
                                  st.sampled_from(["png", "txt", "json", "jpg", "bin"]), _FILES), max_size=10))
def test_fuzzed_tar_shards_never_raise(tmp_path_factory, members):
    root = tmp_path_factory.mktemp("fuzztar")
    with tarfile.open(root / "00000.tar", "w") as tf:
        for i, (key, ext, kind) in enumerate(members):
            _add(tf, f"{key}.{ext}", _fuzz_png(kind, i) if ext in ("png", "jpg") else
                 (kind if isinstance(kind, bytes) else b"a caption"))
    reader = open_dataset(root, size=SIZE)
    records = list(reader)
    assert set(reader.stats) <= set(SKIP_REASONS)
    assert all(r.image.size == (SIZE, SIZE) for r in records)
