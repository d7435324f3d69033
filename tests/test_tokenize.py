"""`cm3leon tokenize`: code shards hold exactly the tokenizers' output, and an interrupted run
resumes to the same shards as an uninterrupted one."""

import json

import numpy as np
import pytest
import torch

from cm3leon.data.codes import CodeDataset
from cm3leon.errors import CM3LeonError
from cm3leon.tokenizers.image import VQConfig, VQModel, images_to_tensor
from cm3leon.tokenizers.text import TextTokenizer
from cm3leon.tokenizers.tokenize import tokenize_dataset



def write_shapes(folder, n):
    """Captioned squares of a few colours (folder + captions.jsonl layout); last 8 are val."""
    from PIL import Image, ImageDraw

    colors = {"red": (220, 30, 30), "blue": (40, 70, 220), "green": (30, 170, 60)}
    (folder / "images").mkdir(parents=True)
    with open(folder / "captions.jsonl", "w") as f:
        for i in range(n):
            name = list(colors)[i % 3]
            im = Image.new("RGB", (16, 16), "white")
            ImageDraw.Draw(im).rectangle([i % 7, i % 5, i % 7 + 6, i % 5 + 8], fill=colors[name])
            im.save(folder / "images" / f"{i:03d}.png")
            f.write(json.dumps({"image": f"images/{i:03d}.png", "text": f"a {name} square number {i}",
                                "split": "train" if i < n - 8 else "val", "extra_field": i}) + "\n")
    return folder


def make_tokenizers(root, data):
    """A BPE of the dataset's captions (root / "text") and a random 16-px VQ of 32 codes, 8x8
    per image (root / "vq")."""
    captions = [json.loads(line)["text"] for line in open(data / "captions.jsonl")]
    TextTokenizer.train(captions * 5, vocab_size=300).save(root / "text")
    torch.manual_seed(0)
    VQModel(VQConfig(resolution=16, base_channels=8, channel_multipliers=(1, 2), num_res_blocks=1,
                     attn_resolutions=(), z_channels=8, embed_dim=4, codebook_size=32, norm_groups=4)
            ).save_pretrained(root / "vq")
    return root / "vq", root / "text"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    data = write_shapes(root / "data", n=30)
    with open(data / "captions.jsonl", "a") as f:  # one bad record: counted, not fatal
        f.write(json.dumps({"image": "images/missing.png", "text": "gone"}) + "\n")
    make_tokenizers(root, data)
    return root, data


def _run(setup, out, **kw):
    root, data = setup
    return tokenize_dataset(data, root / "vq", root / "text", out, **{"batch_size": 4, "shard_size": 8, **kw})


def test_round_trip_codes_equal_encode_and_text_decodes_to_captions(setup, tmp_path):
    from cm3leon.data.readers import open_dataset

    root, data = setup
    meta = _run(setup, tmp_path / "codes")
    assert meta["num_records"] == 30 and meta["complete"]
    assert meta["image_tokenizer"] == str((root / "vq").resolve())
    assert meta["text_tokenizer"] == str((root / "text").resolve())
    assert meta["data"] == str(data.resolve()) and meta["image_size"] == 16
    assert meta["reader_skipped"] == {"missing_file": 1}
    assert meta["grid"] == [8, 8] and meta["codebook_size"] == 32
    assert meta["splits"] == {"train": 22, "val": 8, "test": 0}

    ds = CodeDataset(tmp_path / "codes")
    records = list(open_dataset(data, size=16))
    vq = VQModel.from_pretrained(root / "vq")
    tok = TextTokenizer.load(root / "text")
    expected = vq.encode(images_to_tensor([r.image for r in records])).reshape(len(records), -1).numpy()
    assert np.array_equal(np.stack([ds[i].image_codes for i in range(len(ds))]), expected)
    for i, r in enumerate(records):
        got = ds[i]
        assert got.key == r.key and got.split == r.split
        assert tok.decode(got.text_ids) == r.text == got.text
        assert got.extra["extra_field"] == i  # the record's extra keys travel along


def test_interrupted_run_resumes_to_identical_shards(setup, tmp_path, monkeypatch):
    _run(setup, tmp_path / "full")

    calls = {"n": 0}
    real_encode = VQModel.encode

    def encode_then_crash(self, images):
        calls["n"] += 1
        if calls["n"] == 5:  # after two complete shards of 8 (batches of 4)
            raise KeyboardInterrupt
        return real_encode(self, images)

    monkeypatch.setattr(VQModel, "encode", encode_then_crash)
    with pytest.raises(KeyboardInterrupt):
        _run(setup, tmp_path / "part")
    monkeypatch.setattr(VQModel, "encode", real_encode)
    assert sorted(p.name for p in (tmp_path / "part").glob("shard-*")) == ["shard-00000-00000", "shard-00000-00001"]
    assert not (tmp_path / "part" / "meta.json").exists()

    meta = _run(setup, tmp_path / "part")
    assert meta["num_records"] == 30
    full = sorted((tmp_path / "full").glob("shard-*"))
    part = sorted((tmp_path / "part").glob("shard-*"))
    assert [p.name for p in full] == [p.name for p in part]
    for a, b in zip(full, part):
        for name in ("image_codes.npy", "text_ids.npy", "text_offsets.npy", "split.npy"):
            assert np.array_equal(np.load(a / name), np.load(b / name)), (a.name, name)
        assert (a / "records.jsonl").read_text() == (b / "records.jsonl").read_text()
    # a finished directory is not redone; other inputs are refused
    assert _run(setup, tmp_path / "part") == meta
    with pytest.raises(CM3LeonError, match="other inputs"):
        _run(setup, tmp_path / "part", shard_size=16)


def test_cli_tokenize(setup, tmp_path, capsys):
    from cm3leon.cli import main

    root, data = setup
    rc = main(["tokenize", "--data", str(data), "--image-tokenizer", str(root / "vq"), "--text-tokenizer",
               str(root / "text"), "--out", str(tmp_path / "c"), "--batch-size", "16"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["num_records"] == 30
    assert len(CodeDataset(tmp_path / "c", split="val")) == 8


def test_a_tokenizer_retrained_in_place_is_other_inputs(setup, tmp_path):
    import shutil

    root, data = setup
    vq = tmp_path / "vq"
    shutil.copytree(root / "vq", vq)
    tokenize_dataset(data, vq, root / "text", tmp_path / "codes", batch_size=4, shard_size=8)
    torch.manual_seed(1)  # the same path, new weights: the codes it made are not this tokenizer's
    VQModel(VQModel.from_pretrained(vq).config).save_pretrained(vq)
    with pytest.raises(CM3LeonError, match="other inputs"):
        tokenize_dataset(data, vq, root / "text", tmp_path / "codes", batch_size=4, shard_size=8)


@pytest.fixture(scope="module")
def shards(setup, tmp_path_factory):
    """The built-in scenes as 4 webdataset shards of 8, 8, 8 and 6 records."""
    from cm3leon.data.shapes import synthesize_webdataset

    out = tmp_path_factory.mktemp("wds") / "data"
    synthesize_webdataset(out, num=30, size=32, seed=0, shard_size=8)
    return out


def _files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_workers_take_whole_shards_and_write_what_one_process_writes(setup, shards, tmp_path):
    """--workers 2 over 4 input shards: per input shard its own code shards (3 records per
    shard: 3 + 3 + 2 of 8) and unit marker; every file byte-identical to --workers 1, and the
    records in input order."""
    root, _ = setup
    one = tokenize_dataset(shards, root / "vq", root / "text", tmp_path / "one", batch_size=2, shard_size=3)
    two = tokenize_dataset(shards, root / "vq", root / "text", tmp_path / "two", batch_size=2, shard_size=3,
                           workers=2)
    assert one == two and one["num_records"] == 30 and one["num_units"] == 4
    assert _files(tmp_path / "one") == _files(tmp_path / "two")
    names = sorted(p.name for p in (tmp_path / "two").glob("shard-*"))
    assert names[:4] == ["shard-00000-00000", "shard-00000-00001", "shard-00000-00002", "shard-00001-00000"]
    assert len(names) == 3 * 3 + 2
    assert json.loads((tmp_path / "two" / "unit-00003.json").read_text()) == {
        "unit": 3, "source": "00003.tar", "num_records": 6, "num_shards": 2, "reader_skipped": {}}
    ds = CodeDataset(tmp_path / "two")
    assert [ds[i].key for i in range(len(ds))] == [f"{i:09d}" for i in range(30)]
    assert ds[5].extra["template"] and ds[5].extra["objects"]  # the shard's .json travels along


def test_a_run_cut_short_mid_unit_resumes_with_other_workers_to_the_same_files(setup, shards, tmp_path,
                                                                                 monkeypatch):
    root, _ = setup
    tokenize_dataset(shards, root / "vq", root / "text", tmp_path / "full", batch_size=2, shard_size=3)
    calls = {"n": 0}
    real_encode = VQModel.encode

    def encode_then_crash(self, images):
        calls["n"] += 1
        if calls["n"] == 7:  # unit 0 done (4 batches), unit 1 one shard in (and a batch more)
            raise KeyboardInterrupt
        return real_encode(self, images)

    monkeypatch.setattr(VQModel, "encode", encode_then_crash)
    with pytest.raises(KeyboardInterrupt):
        tokenize_dataset(shards, root / "vq", root / "text", tmp_path / "part", batch_size=2, shard_size=3)
    monkeypatch.setattr(VQModel, "encode", real_encode)
    part = tmp_path / "part"
    assert sorted(p.name for p in part.glob("unit-*")) == ["unit-00000.json"]
    assert sorted(p.name for p in part.glob("shard-00001-*")) == ["shard-00001-00000"]
    tokenize_dataset(shards, root / "vq", root / "text", part, batch_size=2, shard_size=3, workers=2)
    assert _files(part) == _files(tmp_path / "full")


def test_bad_worker_settings_are_refused(setup, shards, tmp_path, monkeypatch):
    root, _ = setup
    with pytest.raises(CM3LeonError, match="--workers must be >= 1"):
        tokenize_dataset(shards, root / "vq", root / "text", tmp_path / "a", workers=0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(CM3LeonError, match="under torchrun"):
        tokenize_dataset(shards, root / "vq", root / "text", tmp_path / "a", workers=2)


@pytest.mark.slow
def test_torchrun_ranks_take_whole_shards_and_write_what_one_process_writes(setup, shards, tmp_path):
    import os
    import subprocess
    import sys

    root, _ = setup
    tokenize_dataset(shards, root / "vq", root / "text", tmp_path / "one", batch_size=2, shard_size=3)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "cm3leon.cli",
           "tokenize", "--data", str(shards), "--image-tokenizer", str(root / "vq"), "--text-tokenizer",
           str(root / "text"), "--out", str(tmp_path / "ranks"), "--batch-size", "2", "--shard-size", "3"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["num_records"] == 30  # printed once, by rank 0
    assert _files(tmp_path / "ranks") == _files(tmp_path / "one")
