"""Atomic writes when the disk is full: whatever the writer (Python, numpy, safetensors, torch),
a write that finds no space is a DiskFullError naming the file, the previous version stays in
place, and no temporary is left behind; other failures pass through unchanged."""

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cm3leon.errors import CM3LeonError, DiskFullError
from cm3leon.utils.io import atomic_path, out_of_space_reason, read_json, write_json


def _no_space(self, *args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))


def test_a_write_without_space_names_the_file_and_keeps_the_previous_version(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    write_json(path, {"step": 1})
    monkeypatch.setattr(Path, "write_text", _no_space)
    with pytest.raises(DiskFullError, match=f"^{re.escape(str(path))}: write failed, the disk is full") as e:
        write_json(path, {"step": 2})
    assert isinstance(e.value, CM3LeonError) and e.value.reason == "the disk is full"
    monkeypatch.undo()
    assert read_json(path) == {"step": 1}
    assert list(tmp_path.iterdir()) == [path]  # no temporary left


def test_a_folder_whose_inner_write_finds_no_space_is_named_not_its_temporary(tmp_path, monkeypatch):
    ckpt = tmp_path / "step-2"
    with atomic_path(ckpt) as tmp:
        tmp.mkdir()
        write_json(tmp / "trainer_state.json", {"step": 2})
    monkeypatch.setattr(Path, "write_text", _no_space)
    with pytest.raises(DiskFullError, match=f"^{re.escape(str(ckpt))}: write failed"):
        with atomic_path(ckpt) as tmp:
            tmp.mkdir()
            write_json(tmp / "trainer_state.json", {"step": 4})
    monkeypatch.undo()
    assert read_json(ckpt / "trainer_state.json") == {"step": 2}
    assert list(tmp_path.iterdir()) == [ckpt]


def test_other_failures_pass_through_unchanged(tmp_path):
    for exc in (ValueError("bad value"), RuntimeError("shape mismatch"), OSError(errno.EACCES, "Permission denied")):
        with pytest.raises(type(exc), match=str(exc.args[-1])):
            with atomic_path(tmp_path / "x.npy"):
                raise exc
        assert out_of_space_reason(exc, tmp_path) is None
    assert list(tmp_path.iterdir()) == []


def test_a_write_error_without_errno_on_a_full_disk_is_disk_full(tmp_path, monkeypatch):
    """torch's zip writer says only 'unexpected pos'; a disk with no free blocks explains it."""
    full = os.statvfs_result((4096, 4096, 1000, 0, 0, 100, 0, 0, 0, 255))
    monkeypatch.setattr(os, "statvfs", lambda path: full)
    with pytest.raises(DiskFullError, match="x.pt: write failed, the disk is full"):
        with atomic_path(tmp_path / "x.pt"):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert out_of_space_reason(RuntimeError("Error while serializing: I/O error: (os error 28)")) == "the disk is full"


WRITERS_OVER_A_SIZE_LIMIT = """
import json, resource, signal, sys
from pathlib import Path
import numpy as np, torch
from safetensors.torch import save_file
from cm3leon.errors import DiskFullError
from cm3leon.utils.io import atomic_path, write_text
from cm3leon.utils.logging import MetricsLogger

root = Path(sys.argv[1])
big = torch.arange(20000, dtype=torch.float32)
writers = {"text": lambda p: write_text(p, "x" * 20000), "npy": lambda p: np.save(p, big.numpy()),
           "safetensors": lambda p: save_file({"x": big}, str(p)), "torch": lambda p: torch.save({"x": big}, p)}
for name in writers:
    (root / name).write_text("previous")
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over the limit a write fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (8192, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
out = {}
for name, write in writers.items():
    try:
        with atomic_path(root / name) as tmp:
            write(tmp)
        out[name] = "written"
    except DiskFullError as e:
        out[name] = str(e)
(root / "metrics.jsonl").write_text("")
try:
    with MetricsLogger(root / "metrics.jsonl") as log:
        for step in range(1000):
            log.log(step=step, note="y" * 100)
except DiskFullError as e:
    out["metrics"] = str(e)
print(json.dumps(out))
"""


def test_every_writer_over_a_file_size_limit_is_disk_full_and_keeps_the_previous_file(tmp_path):
    """RLIMIT_FSIZE in a subprocess: each writer fails its own way (EFBIG, a short write, a
    Rust error, a zip-writer position); each is the same named error."""
    done = subprocess.run([sys.executable, "-c", WRITERS_OVER_A_SIZE_LIMIT, str(tmp_path)], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    errors = json.loads(done.stdout)
    for name in ("text", "npy", "safetensors", "torch"):
        assert errors[name].startswith(f"{tmp_path / name}: write failed, the file is over the file size limit")
        assert (tmp_path / name).read_text() == "previous"
    assert errors["metrics"].startswith(f"{tmp_path / 'metrics.jsonl'}: write failed, the file is over")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "npy", "safetensors", "text", "torch"]


def test_cli_prints_one_line_for_a_write_that_found_no_space(tmp_path, monkeypatch, capsys):
    import cm3leon.tokenizers.tokenize as tokenize
    from cm3leon.cli import main

    def fails(*args, **kwargs):  # a write outside atomic_path, e.g. a log line
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "out" / "log.txt"))

    monkeypatch.setattr(tokenize, "tokenize_dataset", fails)
    rc = main(["tokenize", "--data", "d", "--image-tokenizer", "v", "--text-tokenizer", "t", "--out", "o"])
    assert rc == 2
    log = tmp_path / "out" / "log.txt"
    assert capsys.readouterr().err == f"cm3leon tokenize: error: {log}: write failed, the disk is full\n"


def test_a_deletion_cut_short_leaves_the_folder_whole_or_gone(tmp_path, monkeypatch):
    """Pruning an old checkpoint: a kill inside the deletion must not leave a folder under its
    own name with files missing (resume would take it for a checkpoint and find it damaged)."""
    import shutil

    from cm3leon.utils.io import remove_stale_temporaries, remove_tree

    old = tmp_path / "step-00000002"
    old.mkdir()
    for name in ("model.safetensors", "optimizer.pt", "trainer_state.json"):
        (old / name).write_bytes(b"x" * 10)

    def killed(path, *args, **kwargs):  # the deletion stops after its first file
        next(Path(path).rglob("*.safetensors")).unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        remove_tree(old)
    monkeypatch.undo()
    assert not old.exists()  # gone from its name in one step
    assert remove_stale_temporaries(tmp_path) and list(tmp_path.iterdir()) == []  # the rest is cleaned up
    remove_tree(tmp_path / "absent")  # nothing to delete: no error
