"""Files on disk: atomic writes (a crash never leaves a half-written file), JSON / JSONL."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from cm3leon.errors import CM3LeonError, DiskFullError


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`.

    Works for files and directories alike: whatever the caller writes at the yielded path
    replaces `path` in one `os.replace` (a directory target is removed first). A write that
    fails for lack of space is a DiskFullError naming `path`; the old `path` stays as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent))
    except OSError as e:
        raise_if_out_of_space(e, path)
        raise
    target = tmp / path.name
    try:
        try:
            yield target
            _fsync_tree(target)  # the data is on disk before the rename makes it visible
        except Exception as e:  # noqa: BLE001 - only a lack of space is translated, the rest re-raised
            raise_if_out_of_space(e, path, tmp)
            raise
        if path.is_dir() and target.is_dir():
            old = path.with_name(f".{path.name}{OLD_SUFFIX}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(target, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(target, path)
        _fsync_dir(path.parent)  # ... and so is the rename
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


TMP_SUFFIX, OLD_SUFFIX = ".tmp", ".old"  # atomic_path's temporaries: `.NAME.XXXX.tmp`, `.NAME.old`
OUT_OF_SPACE_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
                       errno.EFBIG: "the file is over the file size limit"}
LOW_SPACE_BYTES = 1 << 20  # less than this left free after a failed write: the disk filled up


def out_of_space_reason(exc: BaseException, written: str | os.PathLike | None = None) -> str | None:
    """Why a write failed, if for lack of space; else None.

    safetensors gives the errno only in its message ("(os error 28)"); numpy and torch's zip
    writer report a short write without it, so when `written` (the file or folder being
    written) is given the disk itself is asked too: the free space left, and the process's
    file size limit reached by a file in `written`."""
    if isinstance(exc, DiskFullError):
        return exc.reason
    code = exc.errno if isinstance(exc, OSError) else None
    if code is None and (m := re.search(r"\(os error (\d+)\)", str(exc))):
        code = int(m.group(1))
    if code in OUT_OF_SPACE_ERRNOS:
        return OUT_OF_SPACE_ERRNOS[code]
    if written is None or not (isinstance(exc, (OSError, RuntimeError)) or type(exc).__name__ == "SafetensorError"):
        return None
    written = Path(written)
    try:
        st = os.statvfs(written if written.is_dir() else written.parent)
        if st.f_bavail * st.f_frsize < LOW_SPACE_BYTES:
            return OUT_OF_SPACE_ERRNOS[errno.ENOSPC]
        import resource
    except (AttributeError, ImportError, OSError):  # not a Unix, or the folder is gone
        return None
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        files = [written] if written.is_file() else [p for p in written.rglob("*") if p.is_file()]
        if any(p.stat().st_size >= limit for p in files):
            return f"{OUT_OF_SPACE_ERRNOS[errno.EFBIG]} of {limit} bytes"
    return None


def raise_if_out_of_space(exc: BaseException, path: str | os.PathLike, written: Path | None = None) -> None:
    """Raise a DiskFullError naming `path` if `exc` is a write that found no space."""
    reason = out_of_space_reason(exc, written)
    if reason is not None:
        raise DiskFullError(f"{path}: write failed, {reason}: free some space and run the command again",
                            reason) from exc


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a platform without directory handles (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """fsync a file, or every file and folder under a folder."""
    if path.is_dir():
        for root, _, files in os.walk(path):
            for name in files:
                _fsync_tree(Path(root) / name)
            _fsync_dir(Path(root))
    elif path.is_file():
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def remove_tree(path: str | os.PathLike) -> None:
    """Delete a folder so that a kill at any moment leaves it either whole or gone: it is
    renamed to a temporary beside it in one step (cleaned by `remove_stale_temporaries` if
    the deletion is cut short), then deleted. rmtree alone, killed midway, leaves a folder
    under its own name with some of its files missing."""
    path = Path(path)
    if not path.exists():
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent))
    os.replace(path, trash / path.name)
    _fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Clean up after an `atomic_path` interrupted in `folder`: temporaries being written are
    removed; the previous version of a folder being swapped (`.NAME.old`) is removed when
    NAME is in place, and put back as NAME when the kill fell between the swap's two renames.
    Returns the paths removed or put back."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    touched = []
    for p in sorted(folder.iterdir()):
        if not p.name.startswith("."):
            continue
        if p.name.endswith(OLD_SUFFIX):
            name = folder / p.name[1:-len(OLD_SUFFIX)]
            if not name.exists():
                os.replace(p, name)
                _fsync_dir(folder)
                touched.append(p)
                continue
        elif not p.name.endswith(TMP_SUFFIX):
            continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        touched.append(p)
    return touched


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Read JSON with an error that names the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CM3LeonError(f"{path}: not valid JSON ({e})") from None


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (read in 1 MiB pieces)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            h.update(piece)
    return h.hexdigest()


def load_safetensors(path: str | os.PathLike, what: str = "weights", device: str = "cpu") -> dict:
    """A safetensors file's tensors; a missing, truncated or corrupt file is a CM3LeonError
    naming it and `what` it holds."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CM3LeonError(f"{path}: {what} file missing")
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError) as e:
        raise CM3LeonError(f"{path}: {what} file truncated or corrupt ({e})") from None


def load_npy(path: str | os.PathLike, what: str = "array", mmap: bool = True):
    """A .npy array (memory-mapped by default, never pickled objects); a missing, truncated
    or foreign file is a CM3LeonError naming it."""
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise CM3LeonError(f"{path}: {what} file missing")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise CM3LeonError(f"{path}: {what} file truncated or not a plain .npy array ({str(e)[:120]})") from None


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, default=_json_default) + "\n")


def read_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    """Yield the rows of a trusted JSONL file (our own outputs); raises naming file:line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise CM3LeonError(f"{path}:{lineno}: malformed JSON line ({e})") from None


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):  # numpy / torch scalars and arrays
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
