"""Instruction-tuning data: reading records, encoding their images once, rendering templates.

Sources (`--data`, any number):
- a dataset folder. Every file of the built-in "shapes" layout that is present is read
  (`cm3leon.data.shapes`), plus `sft.jsonl` when present:
      captions.jsonl  {"image", "text" (or "caption")}          -> tasks caption and t2i
      vqa.jsonl       {"image", "question", "answer"}           -> vqa (and vqa_image when asked for)
      edits.jsonl     {"image", "instruction", "target_image"}  -> edit
      layouts.jsonl   {"image", "caption", "objects": [{"name", "bbox": [x0, y0, x1, y1] px}]} -> layout
- a `.jsonl` file of task lines, one task per line type; every field of the task's template
  (`cm3leon.layout.templates.TEMPLATES`), image fields as paths relative to the file's folder:
      {"task": "caption", "image": "a.png", "caption": "..."}
      {"task": "caption_detailed", "image": "a.png", "caption": "..."}
      {"task": "t2i", "image": "a.png", "caption": "..."}
      {"task": "vqa", "image": "a.png", "question": "...", "answer": "..."}
      {"task": "edit", "image": "a.png", "instruction": "...", "target_image": "b.png"}
      {"task": "layout", "image": "a.png", "caption": "...", "objects": [{"name", "bbox"}]}
          (or "segmentations": "name at <x0,y0,x1,y1>, ..." already written)
      {"task": "edge2img" | "seg2img" | "depth2img", "condition_image": "e.png", "image": "a.png", "caption": "..."}
      {"task": "ocr", "image": "a.png", "text": "...", "caption": "..."}
  (the same lines are read from `sft.jsonl` inside a dataset folder).
Every record may carry `"split"` (train / val / test); otherwise the split is the stable hash
of its first image's file stem (`cm3leon.data.readers.hash_split`), as for pretraining.
Bad records and unreadable images are skipped and counted by reason, never fatal.

The cache (`build_sft_cache`): every distinct image is encoded ONCE with the model's image
tokenizer, in batches, into `<out>/sft_data/`:
    codes.npy       int32 [num_images, tokens_per_image]
    examples.jsonl  {"task", "split", "text": {field: str}, "images": {field: row of codes.npy}}
    meta.json       fingerprint of the inputs, counts per task and split, skip counts
It is reused when the fingerprint matches (same sources, tasks and image tokenizer).
"""

from __future__ import annotations

import collections
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from cm3leon.data.codes import SPLITS
from cm3leon.data.readers import CAPTIONS_FILE
from cm3leon.errors import CM3LeonError
from cm3leon.layout.templates import TEMPLATES, TemplateDoc, format_segmentations, render, required_fields
from cm3leon.tokenizers.vocab import Vocab
from cm3leon.utils.io import atomic_path, load_npy, read_json, read_jsonl, write_json
from cm3leon.utils.logging import progress

CACHE_DIR = "sft_data"
USER_FILE = "sft.jsonl"
# Built-in files of a dataset folder and the tasks each feeds.
FOLDER_FILES = {CAPTIONS_FILE: ("caption", "t2i"), "vqa.jsonl": ("vqa", "vqa_image"), "edits.jsonl": ("edit",),
                "layouts.jsonl": ("layout",)}
DEFAULT_TASKS = ("caption", "vqa", "edit", "t2i", "layout")
# Tasks that read another task's records of a folder the other way round: read only when asked
# for (`tasks`, or `opt_in` from a mixture weight), so a run that does not name them is as before.
OPT_IN_TASKS = ("vqa_image",)


@dataclass
class RawExample:
    """One record before its images are encoded: text fields and image file paths."""

    task: str
    split: str
    text: dict[str, str]
    images: dict[str, str]  # field -> absolute image path


class _Skip(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# --- reading records ---------------------------------------------------------------------------

def _split_of(row: dict, images: dict[str, str]) -> str:
    from cm3leon.data.readers import hash_split

    s = row.get("split")
    if s is not None:
        if s not in SPLITS:
            raise _Skip("bad_split")
        return s
    return hash_split(Path(next(iter(images.values()))).stem)


def _image_size(path: str, cache: dict) -> tuple[int, int]:
    if path not in cache:
        from PIL import Image

        try:
            with Image.open(path) as im:
                cache[path] = im.size
        except (OSError, ValueError):
            cache[path] = None
    if cache[path] is None:
        raise _Skip("bad_image")
    return cache[path]


def _record(task: str, row: dict, folder: Path, sizes: dict) -> RawExample:
    """A task record from a row holding the template's fields (images as relative paths)."""
    text_fields, image_fields = required_fields(task)
    images = {}
    for k in image_fields:
        rel = row.get(k)
        if not isinstance(rel, str) or not rel:
            raise _Skip("missing_field")
        from cm3leon.data.readers import SkipRecord, confined_path

        try:
            images[k] = str(confined_path(folder, rel).resolve())
        except SkipRecord as s:
            raise _Skip(s.reason) from None
    text = {}
    for k in text_fields:
        v = row.get(k)
        if k == "segmentations" and v is None and "objects" in row:
            w, h = _image_size(images["image"], sizes)
            try:
                v = format_segmentations(row["objects"], w, h)
            except (CM3LeonError, TypeError, ValueError):
                raise _Skip("bad_layout") from None
        if not isinstance(v, str) or not v.strip():
            raise _Skip("missing_field")
        text[k] = v.strip()
    return RawExample(task, _split_of(row, images), text, images)


def _folder_rows(name: str, row: dict) -> Iterator[tuple[str, dict]]:
    """(task, row with the template's field names) for a row of a built-in file."""
    if name == CAPTIONS_FILE:
        caption = row.get("text", row.get("caption"))
        yield "caption", {**row, "caption": caption}
        yield "t2i", {**row, "caption": caption}
    elif name == "vqa.jsonl":
        yield "vqa", row
        yield "vqa_image", row
    elif name == "edits.jsonl":
        yield "edit", row
    elif name == "layouts.jsonl":
        yield "layout", row


def _jsonl(path: Path, stats: collections.Counter) -> Iterator[dict]:
    from cm3leon.data.readers import SkipRecord, iter_jsonl_objects

    for _, obj in iter_jsonl_objects(path):
        if isinstance(obj, SkipRecord):
            stats[obj.reason] += 1
            continue
        yield obj


def _task_lines(path: Path, tasks: set[str] | None, stats: collections.Counter, sizes: dict) -> Iterator[RawExample]:
    for row in _jsonl(path, stats):
        task = row.get("task")
        if task not in TEMPLATES:
            stats["unknown_task"] += 1
            continue
        if tasks is not None and task not in tasks:
            continue
        try:
            yield _record(task, row, path.parent, sizes)
        except _Skip as s:
            stats[s.reason] += 1


def read_sources(sources: Sequence[str | Path], tasks: Iterable[str] | None = None,
                 stats: collections.Counter | None = None, opt_in: Iterable[str] = ()) -> list[RawExample]:
    """All SFT records of the given folders / JSONL files (see the module docstring). A
    folder's `OPT_IN_TASKS` rows are read only when `tasks` or `opt_in` names them."""
    wanted = set(tasks) if tasks is not None else None
    folder_skip = set(OPT_IN_TASKS) - set(opt_in) - (wanted or set())
    if wanted is not None:
        unknown = sorted(wanted - set(TEMPLATES))
        if unknown:
            raise CM3LeonError(f"unknown SFT task(s) {unknown}; known: {sorted(TEMPLATES)}")
    stats = stats if stats is not None else collections.Counter()
    sizes: dict = {}
    out: list[RawExample] = []
    if not sources:
        raise CM3LeonError("no SFT data given: pass --data with a dataset folder or a .jsonl file")
    for src in sources:
        src = Path(src)
        if src.is_file():
            out += _task_lines(src, wanted, stats, sizes)
        elif src.is_dir():
            found = [n for n in (*FOLDER_FILES, USER_FILE) if (src / n).is_file()]
            if not found:
                raise CM3LeonError(f"--data {src}: no SFT file found; expected one of "
                                   f"{[*FOLDER_FILES, USER_FILE]}")
            for name in found:
                if name == USER_FILE:
                    out += _task_lines(src / name, wanted, stats, sizes)
                    continue
                for row in _jsonl(src / name, stats):
                    for task, r in _folder_rows(name, row):
                        if (wanted is not None and task not in wanted) or task in folder_skip:
                            continue
                        try:
                            out.append(_record(task, r, src, sizes))
                        except _Skip as s:
                            stats[s.reason] += 1
        else:
            raise FileNotFoundError(f"--data {src}: no such file or folder")
    return out


# --- the code cache ----------------------------------------------------------------------------

def folder_tasks(data: str | Path) -> set[str] | None:
    """The SFT tasks a dataset folder has files for (FOLDER_FILES); None when it may hold any
    (a user's sft.jsonl, or a source that is not a folder)."""
    data = Path(data)
    if not data.is_dir() or (data / USER_FILE).is_file():
        return None
    return {t for name, tasks in FOLDER_FILES.items() if (data / name).is_file() for t in tasks}


def instruction_texts(data: str | Path, split: str = "train") -> list[str]:
    """The text of a dataset's instruction-tuning records beyond its captions (VQA questions
    and answers, edit instructions, layouts, with their template words), one string per piece
    a document encodes (`templates.text_strings`): SFT feeds them to the model, so the text
    tokenizer should learn them too. [] when the data has no such records (a captions-only
    folder, shards, a COCO file)."""
    from cm3leon.layout.templates import text_strings

    data = Path(data)
    caption_tasks = set(FOLDER_FILES[CAPTIONS_FILE])
    present = folder_tasks(data)
    if present is not None and not present - caption_tasks:
        return []
    if present is None and not (data.is_dir() or (data.is_file() and data.suffix == ".jsonl")):
        return []
    # The opt-in tasks' words are those of the tasks they mirror.
    examples = read_sources([data], tasks=[t for t in TEMPLATES if t not in caption_tasks and t not in OPT_IN_TASKS])
    return [t for ex in examples if ex.split == split for t in text_strings(ex.task, ex.text)]


def _fingerprint(sources: Sequence[str | Path], tasks: Iterable[str] | None, image_tokenizer_dir: Path,
                 opt_in: Sequence[str] = ()) -> str:
    h = hashlib.sha256()
    files: list[Path] = []
    for src in sources:
        src = Path(src).resolve()
        files += [src] if src.is_file() else [src / n for n in (*FOLDER_FILES, USER_FILE) if (src / n).is_file()]
    files += [image_tokenizer_dir / "config.json", image_tokenizer_dir / "model.safetensors"]
    for f in files:
        st = f.stat()
        h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(json.dumps(sorted(tasks) if tasks is not None else None).encode())
    if opt_in:
        h.update(json.dumps(sorted(opt_in)).encode())
    return h.hexdigest()


def build_sft_cache(sources: Sequence[str | Path], out_dir: str | Path, image_tokenizer_dir: str | Path,
                    tasks: Iterable[str] | None = None, batch_size: int = 64, device: str = "cpu",
                    opt_in: Iterable[str] = ()) -> Path:
    """Read the records, encode every distinct image once, write `<out_dir>/sft_data/`;
    returns its path (reused as is when its fingerprint matches). `opt_in`: as `read_sources`."""
    import torch

    from cm3leon.data.readers import SkipRecord, load_image
    from cm3leon.tokenizers.image import VQModel, images_to_tensor

    out = Path(out_dir) / CACHE_DIR
    image_tokenizer_dir = Path(image_tokenizer_dir)
    tasks = sorted(set(tasks)) if tasks is not None else None
    opt_in = sorted(set(opt_in))
    fp = _fingerprint(sources, tasks, image_tokenizer_dir, opt_in)
    if (out / "meta.json").is_file() and read_json(out / "meta.json").get("fingerprint") == fp:
        return out

    stats: collections.Counter = collections.Counter()
    raw = read_sources(sources, tasks, stats, opt_in)
    if not raw:
        raise CM3LeonError(f"no usable SFT record in {[str(s) for s in sources]} "
                           f"(tasks {tasks or 'all'}; skipped: {dict(stats)})")
    vq = VQModel.from_pretrained(image_tokenizer_dir, device=device)
    size = vq.config.resolution
    paths = sorted({p for ex in raw for p in ex.images.values()})
    rows: dict[str, int] = {}
    codes_out: list[np.ndarray] = []
    bar = progress(total=len(paths), desc="sft: encode images", unit="img")
    try:
        for b in range(0, len(paths), batch_size):
            batch, names = [], []
            for p in paths[b:b + batch_size]:
                try:
                    batch.append(load_image(p, size))
                    names.append(p)
                except SkipRecord as s:
                    stats[s.reason] += 1
            if batch:
                with torch.no_grad():
                    codes = vq.encode(images_to_tensor(batch).to(device)).reshape(len(batch), -1)
                for p, c in zip(names, codes.cpu().numpy()):
                    rows[p] = len(codes_out)
                    codes_out.append(c.astype(np.int32))
            bar.update(len(paths[b:b + batch_size]))
    finally:
        bar.close()

    examples, counts = [], collections.Counter()
    for ex in raw:
        if not all(p in rows for p in ex.images.values()):
            stats["image_failed"] += 1
            continue
        examples.append({"task": ex.task, "split": ex.split, "text": ex.text,
                         "images": {k: rows[p] for k, p in ex.images.items()}})
        counts[f"{ex.task}/{ex.split}"] += 1
    if not examples:
        raise CM3LeonError(f"no SFT record has readable images (skipped: {dict(stats)})")
    with atomic_path(out) as tmp:
        tmp.mkdir()
        np.save(tmp / "codes.npy", np.stack(codes_out))
        with open(tmp / "examples.jsonl", "w", encoding="utf-8") as f:
            for e in examples:
                f.write(json.dumps(e) + "\n")
        write_json(tmp / "meta.json", {
            "fingerprint": fp, "sources": [str(Path(s).resolve()) for s in sources], "tasks": tasks,
            "num_examples": len(examples), "num_images": len(codes_out),
            "tokens_per_image": int(vq.config.tokens_per_image), "codebook_size": int(vq.config.codebook_size),
            "counts": dict(sorted(counts.items())), "skipped": dict(stats)})
    return out


class SFTData:
    """A cache directory made by `build_sft_cache`, rendered through the templates."""

    def __init__(self, cache_dir: str | Path, vocab: Vocab, text_tokenizer):
        self.path = Path(cache_dir)
        self.meta = read_json(self.path / "meta.json", "SFT cache metadata")
        self.codes = np.asarray(load_npy(self.path / "codes.npy", "SFT image codes"))
        self.examples = list(read_jsonl(self.path / "examples.jsonl"))
        self.vocab, self.text_tokenizer = vocab, text_tokenizer
        if self.codes.size and int(self.codes.max()) >= vocab.image_vocab_size:
            raise CM3LeonError(f"{self.path}: image codes reach {int(self.codes.max())}, beyond the model's "
                               f"{vocab.image_vocab_size} image ids (another image tokenizer?)")
        self._docs: dict[int, TemplateDoc] = {}

    def __len__(self) -> int:
        return len(self.examples)

    def task_indices(self, split: str) -> dict[str, np.ndarray]:
        """Example ids per task in one split."""
        out: dict[str, list[int]] = collections.defaultdict(list)
        for i, e in enumerate(self.examples):
            if e["split"] == split:
                out[e["task"]].append(i)
        return {t: np.asarray(ix, dtype=np.int64) for t, ix in sorted(out.items())}

    def fields(self, i: int) -> dict:
        e = self.examples[i]
        return {**e["text"], **{k: self.codes[r] for k, r in e["images"].items()}}

    def document(self, i: int) -> TemplateDoc:
        """The rendered template of example `i` (memoised)."""
        doc = self._docs.get(i)
        if doc is None:
            doc = self._docs[i] = render(self.examples[i]["task"], self.fields(i), self.vocab, self.text_tokenizer)
        return doc
