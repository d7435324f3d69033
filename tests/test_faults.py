"""Fault injection: every resumable stage (pretraining, SFT, VQ training, `cm3leon tokenize`,
`cm3leon index build` and `index neighbors`) killed with SIGKILL at random points (mid-step,
mid-save) and resumed each time ends exactly where an uninterrupted run ends: no state that
fails to load, the same final outputs byte for byte, each metrics row / record / document once.
A write that runs out of space (a file size limit in a subprocess) is one line from the CLI
naming the file, and the previous version still loads.
(`benchmarks/faults.py` is the long version with many more kills, and holds the helpers.)"""

import random
import subprocess
import sys
from pathlib import Path

import pytest

from cm3leon.utils.logging import read_metrics

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT / "benchmarks"))
from faults import (STEPS, differing_bytes, files_under, index_stage, kill_and_resume, kill_at_random, logged_steps, neighbors_stage,  # noqa: E402
                    pretrain_cmd, sft_cmd, temporaries, tokenize_stage, unloadable_checkpoints, unloadable_codes,
                    vq_cmd)
from faults import make_codes as make_shapes_codes  # noqa: E402
from test_retrieval import make_codes as make_fake_codes  # noqa: E402
from test_retrieval import make_dataset as make_scenes  # noqa: E402
from test_sequences import make_codes  # noqa: E402
from test_tokenize import make_tokenizers, write_shapes  # noqa: E402

# What a kill-and-resume run must show besides its kills: nothing unloadable, no byte of the
# outputs different from the uninterrupted run's, no row twice or missing, no temporary left.
CLEAN = {"corrupt_states": 0, "bytes_differing": 0, "duplicated_rows": 0, "missing_rows": 0, "temporaries_left": 0}


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_matches_an_uninterrupted_run(tmp_path):
    codes = make_codes(tmp_path)
    straight = tmp_path / "straight"
    subprocess.run(pretrain_cmd(codes, straight), check=True, capture_output=True)

    run = tmp_path / "killed"
    rng = random.Random(0)
    kills = 0
    for _ in range(3):
        kills += kill_at_random(pretrain_cmd(codes, run), run, rng)
        assert unloadable_checkpoints(run) == []  # whatever a kill left loads
    assert kills == 3
    done = subprocess.run(pretrain_cmd(codes, run), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]

    assert (run / "model.safetensors").read_bytes() == (straight / "model.safetensors").read_bytes()
    assert logged_steps(run) == list(range(1, STEPS + 1))  # each step once, in order
    assert [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r] == \
        [r["loss"] for r in read_metrics(straight / "metrics.jsonl") if "loss" in r]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # no temporaries left


@pytest.mark.slow
def test_sft_killed_mid_run_resumes_to_the_uninterrupted_weights(tmp_path):
    """The same guarantee for instruction tuning: its task cache, mixture stream position and
    checkpoints survive SIGKILLs, and the resumed run ends on the uninterrupted run's bytes."""
    codes = make_shapes_codes(tmp_path)  # the built-in data (with its SFT tasks) under tmp_path / "data"
    init = tmp_path / "pretrained"
    subprocess.run(pretrain_cmd(codes, init, steps=4), check=True, capture_output=True)
    data = tmp_path / "data"
    straight = tmp_path / "sft_straight"
    subprocess.run(sft_cmd(init, data, straight), check=True, capture_output=True)

    run = tmp_path / "sft_killed"
    rng = random.Random(1)
    kills = sum(kill_at_random(sft_cmd(init, data, run), run, rng, steps=16) for _ in range(2))
    assert kills == 2 and unloadable_checkpoints(run) == []
    done = subprocess.run(sft_cmd(init, data, run), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (run / "model.safetensors").read_bytes() == (straight / "model.safetensors").read_bytes()
    assert logged_steps(run) == list(range(1, 17))


@pytest.mark.slow
def test_image_tokenizer_killed_mid_run_resumes_to_the_uninterrupted_weights(tmp_path):
    """VQ training killed with SIGKILL resumes from its checkpoint to the same weights."""
    make_shapes_codes(tmp_path)
    data = tmp_path / "data"
    straight = tmp_path / "vq_straight"
    subprocess.run(vq_cmd(data, straight), check=True, capture_output=True)
    run = tmp_path / "vq_killed"
    rng = random.Random(2)
    kills = sum(kill_at_random(vq_cmd(data, run), run, rng, steps=16) for _ in range(2))
    assert kills == 2
    done = subprocess.run(vq_cmd(data, run), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (run / "model.safetensors").read_bytes() == (straight / "model.safetensors").read_bytes()
    assert logged_steps(run) == logged_steps(straight)  # each step once, in order


def _clean(result: dict) -> dict:
    return {k: result[k] for k in CLEAN}


@pytest.mark.slow
def test_tokenize_killed_at_random_points_resumes_to_the_uninterrupted_shards(tmp_path):
    """`cm3leon tokenize` killed mid-shard / mid-meta.json three times: every shard on disk
    loads, and the resumed directory is the uninterrupted one byte for byte (batches of 3 do
    not divide shards of 4, so resumed batches start elsewhere)."""
    data = write_shapes(tmp_path / "data", n=40)
    vq, text = make_tokenizers(tmp_path, data)
    result = kill_and_resume(tokenize_stage(data, vq, text, 10, batch_size=3, shard_size=4), tmp_path, 3,
                             random.Random(3))
    # every kill is followed by a resume, or by a fresh start when it landed after the outputs were complete
    assert result["kills"] == 3 and result["resumes"] + result["restarts_after_finishing"] >= 3
    assert _clean(result) == CLEAN, result["corrupt_examples"]
    assert result["files_compared"] == 10 * 5 + 3  # 10 shards of 5 files, unit-00000.json, meta.json, tokenize_args.json


@pytest.mark.slow
def test_tokenize_with_workers_killed_resumes_to_the_one_process_shards(tmp_path):
    """`cm3leon tokenize --workers 2` over webdataset shards, SIGKILLed twice (its workers die
    with it): nothing on disk fails to load, and the resumed directory is byte for byte what
    an uninterrupted run with one process writes."""
    from cm3leon.data.shapes import synthesize_webdataset
    from cm3leon.tokenizers.tokenize import tokenize_dataset

    data = synthesize_webdataset(tmp_path / "data", num=48, size=32, seed=0, shard_size=12)["out"]
    vq, text = make_tokenizers(tmp_path, write_shapes(tmp_path / "captions", n=12))
    result = kill_and_resume(tokenize_stage(Path(data), vq, text, 12, batch_size=2, shard_size=4, workers=2),
                             tmp_path, 2, random.Random(4))
    assert result["kills"] == 2 and _clean(result) == CLEAN, result["corrupt_examples"]
    tokenize_dataset(data, vq, text, tmp_path / "one", batch_size=2, shard_size=4)
    assert files_under(tmp_path / "one") == files_under(tmp_path / "tokenize-killed")
    assert differing_bytes(tmp_path / "tokenize-killed", tmp_path / "one", files_under(tmp_path / "one")) == 0


def _index_inputs(root: Path) -> tuple[Path, Path, Path]:
    from cm3leon.retrieval.train import train_retriever

    data = make_scenes(root / "data")  # 32 scenes, 24 in train
    codes = make_fake_codes(data, root / "codes")
    train_retriever(data, root / "retriever", steps=2, batch_size=8, size=32, dim=16, seed=0)
    return data, root / "retriever", codes


@pytest.mark.slow
def test_index_build_killed_at_random_points_resumes_to_the_uninterrupted_index(tmp_path):
    """`cm3leon index build` killed mid-chunk and mid-output three times: every chunk and a
    finished bank load, and the resumed index's files are the uninterrupted ones byte for byte."""
    data, retriever, codes = _index_inputs(tmp_path)
    result = kill_and_resume(index_stage(data, retriever, codes, 24, batch_size=2, chunk_size=2), tmp_path, 3,
                             random.Random(4))
    # every kill is followed by a resume, or by a fresh start when it landed after the outputs were complete
    assert result["kills"] == 3 and result["resumes"] + result["restarts_after_finishing"] >= 3
    assert _clean(result) == CLEAN, result["corrupt_examples"]
    assert result["files_compared"] == 5  # index.json, index.faiss, vectors.npy, metadata.jsonl, image_codes.npy


@pytest.mark.slow
def test_index_build_with_workers_killed_resumes_to_the_one_process_index(tmp_path):
    """`cm3leon index build --workers 2` over webdataset shards, SIGKILLed twice mid-embedding
    (its workers die with it): nothing on disk fails to load, and the resumed index is byte
    for byte what an uninterrupted build with one process writes."""
    from cm3leon.data.readers import open_dataset
    from cm3leon.data.shapes import synthesize_webdataset
    from cm3leon.retrieval.index import build_index
    from cm3leon.retrieval.train import train_retriever

    data = Path(synthesize_webdataset(tmp_path / "data", num=48, size=32, seed=0, shard_size=12)["out"])
    codes = make_fake_codes(data, tmp_path / "codes")
    train_retriever(data, tmp_path / "retriever", steps=2, batch_size=8, size=32, dim=16, seed=0)
    num_docs = sum(1 for _ in open_dataset(data, size=None, split="train").texts())
    result = kill_and_resume(index_stage(data, tmp_path / "retriever", codes, num_docs, batch_size=2, chunk_size=2,
                                         workers=2), tmp_path, 2, random.Random(5))
    assert result["kills"] == 2 and _clean(result) == CLEAN, result["corrupt_examples"]
    build_index(data, tmp_path / "retriever", tmp_path / "one", codes=codes, batch_size=2, chunk_size=2)
    assert files_under(tmp_path / "one") == files_under(tmp_path / "index-killed")
    assert differing_bytes(tmp_path / "index-killed", tmp_path / "one", files_under(tmp_path / "one")) == 0


@pytest.mark.slow
def test_neighbours_killed_at_random_times_rerun_to_the_uninterrupted_file(tmp_path):
    """`cm3leon index neighbors` over one unit (a captions folder: nothing finished to keep
    before its end): killed three times, then rerun, it writes the uninterrupted run's
    neighbors.npy / .json byte for byte."""
    from cm3leon.retrieval.index import build_index

    data, retriever, codes = _index_inputs(tmp_path)
    build_index(data, retriever, tmp_path / "index", codes=codes, batch_size=8, chunk_size=8)
    result = kill_and_resume(neighbors_stage(tmp_path / "index", codes), tmp_path, 3, random.Random(5))
    assert result["kills"] == 3
    assert _clean(result) == CLEAN, result["corrupt_examples"]


@pytest.mark.slow
def test_neighbours_with_workers_killed_resume_to_the_one_process_file(tmp_path):
    """`cm3leon index neighbors --workers 2` over 6 webdataset shards, SIGKILLed after some
    units' parts were written (its workers die with it): every part loads, and the rerun
    writes what one uninterrupted process writes (the reference run here), byte for byte."""
    import shutil
    import time

    from cm3leon.data.shapes import synthesize_webdataset
    from cm3leon.retrieval.index import build_index, compute_neighbors
    from cm3leon.retrieval.train import train_retriever

    data = Path(synthesize_webdataset(tmp_path / "data", num=48, size=32, seed=0, shard_size=8)["out"])
    codes = make_fake_codes(data, tmp_path / "codes")
    train_retriever(data, tmp_path / "retriever", steps=2, batch_size=8, size=32, dim=16, seed=0)
    build_index(data, tmp_path / "retriever", tmp_path / "index", codes=codes, batch_size=8, chunk_size=8)
    shutil.copytree(codes, tmp_path / "neighbors-straight")
    t0 = time.perf_counter()
    compute_neighbors(tmp_path / "index", tmp_path / "neighbors-straight", k=2, batch_size=4)
    result = kill_and_resume(neighbors_stage(tmp_path / "index", codes, num_units=6, workers=2, batch_size=4),
                             tmp_path, 1, random.Random(6), straight_s=time.perf_counter() - t0)
    assert result["kills"] == 1 and result["resumes"] >= 1 and _clean(result) == CLEAN, result["corrupt_examples"]
    assert result["files_compared"] == 2  # neighbors.npy, neighbors.json


def test_index_build_refuses_embedding_chunks_with_a_gap(tmp_path, monkeypatch):
    """Chunks 0 and 2 without 1 (deleted by hand: the build itself removes embeddings/ in one
    rename) would silently leave documents out on resume: a named error instead."""
    from cm3leon.errors import CM3LeonError
    from cm3leon.retrieval.encoder import BiEncoderRetriever
    from cm3leon.retrieval.index import build_index

    data, retriever, codes = _index_inputs(tmp_path)
    real, calls = BiEncoderRetriever.embed_documents, []

    def interrupted(self, texts, images):
        calls.append(len(texts))
        if len(calls) == 4:
            raise KeyboardInterrupt  # after 3 chunks of 4 are on disk
        return real(self, texts, images)

    monkeypatch.setattr(BiEncoderRetriever, "embed_documents", interrupted)
    out = tmp_path / "index"
    with pytest.raises(KeyboardInterrupt):
        build_index(data, retriever, out, batch_size=4, chunk_size=4)
    (out / "embeddings" / "chunk-00000-00001.npy").unlink()
    with pytest.raises(CM3LeonError, match=r"embeddings: embedding chunks .* not numbered 0, 1"):
        build_index(data, retriever, out, batch_size=4, chunk_size=4)


RUN_OUT_OF_SPACE = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over the limit a write fails with EFBIG instead
import {module} as target
real = target.{name}

def filling(*args, **kwargs):
    filling.calls += 1
    if filling.calls == {call}:  # the disk fills up before this write
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return real(*args, **kwargs)

filling.calls = 0
target.{name} = filling
from cm3leon.cli import main
sys.exit(main({argv!r}))
"""


def run_out_of_space(module: str, name: str, call: int, limit: int, cmd: list[str]) -> subprocess.CompletedProcess:
    """Run a CLI command whose `call`-th call of module.name runs with files limited to
    `limit` bytes (RLIMIT_FSIZE): as a disk that filled up mid-run."""
    assert cmd[:3] == [sys.executable, "-m", "cm3leon.cli"]
    script = RUN_OUT_OF_SPACE.format(module=module, name=name, call=call, limit=limit, argv=cmd[3:])
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)


def _error_lines(stderr: str, command: str) -> list[str]:
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.startswith(f"cm3leon {command}: error:")]


@pytest.mark.slow
def test_disk_full_during_a_checkpoint_save_is_one_line_and_the_last_checkpoint_still_loads(tmp_path):
    from cm3leon.train.checkpoint import list_checkpoints

    codes = make_codes(tmp_path)
    run = tmp_path / "run"
    full = run_out_of_space("cm3leon.train.checkpoint", "save_checkpoint", 2, 16 << 10,
                            pretrain_cmd(codes, run, steps=6))
    assert full.returncode == 2, full.stderr[-3000:]
    (line,) = _error_lines(full.stderr, "pretrain")
    assert f"{run / 'checkpoints' / 'step-00000004'}: write failed, the file is over the file size limit" in line
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [2]  # no step-4 half-written in its place
    assert unloadable_checkpoints(run) == [] and temporaries(run / "checkpoints") == []

    done = subprocess.run(pretrain_cmd(codes, run, steps=6), capture_output=True, text=True)  # space again
    assert done.returncode == 0, done.stderr[-2000:]
    assert logged_steps(run) == list(range(1, 7))


def test_disk_full_while_tokenize_writes_a_shard_is_one_line_and_resumes(tmp_path):
    from cm3leon.tokenizers.tokenize import tokenize_dataset

    data = write_shapes(tmp_path / "data", n=12)
    vq, text = make_tokenizers(tmp_path, data)
    out = tmp_path / "codes"
    cmd = [sys.executable, "-m", "cm3leon.cli", "tokenize", "--data", str(data), "--image-tokenizer", str(vq),
           "--text-tokenizer", str(text), "--out", str(out), "--batch-size", "4", "--shard-size", "4"]
    # a shard's image codes: 4 records x 64 codes x 2 bytes + the .npy header > 256 bytes
    full = run_out_of_space("cm3leon.data.codes", "CodeShardWriter._flush", 2, 256, cmd)
    assert full.returncode == 2, full.stderr[-3000:]
    (line,) = _error_lines(full.stderr, "tokenize")
    assert f"{out / 'shard-00000-00001'}: write failed, the file is over the file size limit" in line
    assert sorted(p.name for p in out.iterdir()) == ["shard-00000-00000", "tokenize_args.json"]  # no temporary, no meta
    assert unloadable_codes(out) == []

    resumed = tokenize_dataset(data, vq, text, out, batch_size=4, shard_size=4)
    straight = tokenize_dataset(data, vq, text, tmp_path / "straight", batch_size=4, shard_size=4)
    assert resumed == straight
    for shard in ("shard-00000-00000", "shard-00000-00001", "shard-00000-00002"):
        for f in (tmp_path / "straight" / shard).iterdir():
            assert (out / shard / f.name).read_bytes() == f.read_bytes()
