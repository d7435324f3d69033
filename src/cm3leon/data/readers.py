"""Streaming readers for captioned-image datasets, in three on-disk formats.

Formats (detected by `detect_format`):
- ``folder``: a folder with ``captions.jsonl``; one line per record,
  ``{"image": "rel/path.png", "text": "...", ...extra}`` (``caption`` is accepted for ``text``;
  an optional ``key`` names the record, else the image path without extension; an optional
  ``split`` fixes the split). Lines are read lazily, one at a time.
- ``webdataset``: ``.tar`` shards in the img2dataset layout: ``key.jpg|jpeg|png|webp`` with
  ``key.txt`` and/or ``key.json`` (``caption`` or ``text`` field). PATH is a folder of ``*.tar``,
  one ``.tar``, a glob (``data/*.tar``) or a brace range (``data/{00000..00099}.tar``). Shards
  are read member by member with ``tarfile`` in stream mode.
- ``coco``: a COCO captions JSON (``images`` + ``annotations``). One record per (image,
  caption) pair; ``meta["references"]`` holds every caption of that image (evaluation needs
  them). The image folder is ``images=``; by default the first existing of
  ``<json dir>/../<train2017>`` (the name taken from ``captions_<train2017>.json``, the
  official layout), ``<json dir>/<train2017>``, ``<json dir>/images``, ``<json dir>``.
  The JSON holds metadata only and is parsed whole; images are still read one at a time.

Splits: a record's own ``split`` field wins; otherwise the split is a stable hash of the
image's file stem (``SPLIT_FRACTIONS``: 90% train / 5% val / 5% test), so every caption of
one image lands in the same split, identically in all three formats and on every machine.

Work division (`DatasetReader`): the parts are (distributed rank) x (DataLoader worker).
With ``split_by="auto"``, when there are at least as many shards as parts each part reads
whole shards (shard i goes to part i mod parts); otherwise every part reads the stream and
keeps records whose index is its part modulo the number of parts. Both give disjoint parts
whose union is the whole dataset.

Bad records never stop a job: each is skipped and counted in ``reader.stats`` by a reason
from `SKIP_REASONS`.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import glob
import hashlib
import io
import json
import os
import random
import re
import stat
import tarfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from struct import error as struct_error  # PIL plugins raise it on some corrupt data
from typing import Iterable, Iterator

import numpy as np
import torch.utils.data
from PIL import Image, ImageOps, UnidentifiedImageError

from cm3leon.data.codes import SPLITS
from cm3leon.errors import CM3LeonError
from cm3leon.utils.logging import progress

# Hash-assigned split fractions for records without a `split` field; the rest is "test".
SPLIT_FRACTIONS = {"train": 0.90, "val": 0.05}
# PIL's own default cap (MAX_IMAGE_PIXELS): larger images are treated as decompression bombs.
DEFAULT_MAX_PIXELS = 89_478_485
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTIONS_FILE = "captions.jsonl"
DEFAULT_SHUFFLE_BUFFER = 1000
# Size caps: a record over one is skipped ("too_large") before it is read whole.
MAX_CAPTION_CHARS = 8192
MAX_LINE_BYTES = 1 << 20  # one JSONL record
MAX_TEXT_BYTES = 1 << 20  # a tar .txt / .json member
MAX_IMAGE_BYTES = 64 << 20  # an image file or tar image member

# Paths a dataset names resolve inside its root unless a caller allows otherwise
# (`cm3leon --allow-outside-root ...`, or `outside_root_allowed(True)` around the reads).
_ALLOW_OUTSIDE_ROOT = contextvars.ContextVar("cm3leon_allow_outside_root", default=False)


@contextlib.contextmanager
def outside_root_allowed(allow: bool = True):
    """Within the block, image paths of folder and COCO datasets may leave the dataset root
    (absolute paths, "..", symlinks out); by default they are skipped as "outside_root"."""
    token = _ALLOW_OUTSIDE_ROOT.set(bool(allow))
    try:
        yield
    finally:
        _ALLOW_OUTSIDE_ROOT.reset(token)


def confined_path(root: Path | None, name: str) -> Path | None:
    """`root / name`, refused (SkipRecord "outside_root") when it leaves `root`: an absolute
    name, ".." that climbs out, or a symlink (anywhere on the way) that points out. Decided
    from the path alone, so the skip counts never tell whether an outside file exists.
    root None (captions only, no image folder): the name alone is checked; returns None."""
    if _ALLOW_OUTSIDE_ROOT.get():
        return None if root is None else root / name
    if Path(name).is_absolute() or Path(name).drive:
        raise SkipRecord("outside_root", f"{name}: an absolute path")
    if os.path.normpath(name).split(os.sep)[0] == os.pardir:
        raise SkipRecord("outside_root", f"{name}: climbs out of the dataset folder")
    if root is None:
        return None
    path = root / name
    if not path.resolve().is_relative_to(root.resolve()):
        raise SkipRecord("outside_root", f"{name}: a symlink out of {root}")
    return path

# Every reason a record can be skipped for (the keys of `DatasetReader.stats`).
SKIP_REASONS = (
    "missing_file",          # folder / COCO: the image file does not exist
    "empty_file",            # image file (or tar member) has zero bytes
    "not_an_image",          # PIL cannot identify the bytes as an image
    "truncated_image",       # a recognised image whose header or pixel data is cut short / corrupt
    "decompression_bomb",    # header claims more than `max_pixels` pixels (never decoded)
    "unsupported_mode",      # an image mode that has no RGB conversion
    "empty_caption",         # caption is empty or whitespace
    "bad_caption_encoding",  # caption (or the JSONL line) is not valid UTF-8
    "malformed_json",        # a JSONL line / tar .json that does not parse to an object
    "missing_field",         # JSON object without a usable image / text (caption) field
    "missing_caption",       # tar: image without .txt/.json caption; COCO: image without captions
    "missing_image",         # tar: caption without an image member; COCO: caption of an unknown image
    "bad_shard",             # tar: the shard cannot be opened as a tar archive
    "truncated_shard",       # tar: the shard ends mid-archive (records after the cut are lost)
    "outside_root",          # a path that leaves the dataset folder (absolute, "..", a symlink out)
    "not_a_file",            # the path names a FIFO, device, socket or folder, not a regular file
    "too_large",             # a caption, JSONL line, image file or tar member over its size cap
)


@dataclass
class Record:
    """One (image, caption) pair ready for tokenizing."""

    key: str
    image: Image.Image  # RGB, size x size
    text: str
    split: str
    meta: dict = field(default_factory=dict)  # the source record's extra keys


class SkipRecord(Exception):
    """Raised inside the readers for a bad record; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# --- splits ---------------------------------------------------------------------------------

def hash_split(name: str) -> str:
    """Deterministic split of a record from a stable hash of `name` (its image file stem)."""
    h = int.from_bytes(hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")
    u = h / 2**64
    acc = 0.0
    for split, frac in SPLIT_FRACTIONS.items():
        acc += frac
        if u < acc:
            return split
    return "test"


def _check_split(split: str | None, what: str = "split") -> str | None:
    if split is not None and split not in SPLITS:
        raise CM3LeonError(f"{what}: unknown split {split!r}; expected one of {SPLITS} or None (all)")
    return split


# --- images ---------------------------------------------------------------------------------

def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB: transparency is composited on white, 16/32-bit greyscale is
    scaled to 8 bits (not clipped), CMYK / L / P / 1 / YCbCr use PIL's conversions."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img).astype(np.int64)
        if mode == "I" and (arr.min() < 0 or arr.max() > 65535):
            # Genuine 32-bit data has no fixed range: stretch what is there.
            lo, hi = int(arr.min()), int(arr.max())
            arr = (arr - lo) * 255 // max(1, hi - lo)
        else:
            # 16-bit samples (mode "I" is how PIL opens 16-bit PNGs too): 65535 -> 255.
            arr = (arr * 255 + 32767) // 65535
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 if arr.size and np.nanmax(arr) <= 1.0 else 1.0  # [0, 1] floats or 8-bit range
        arr = np.nan_to_num(np.clip(arr * scale, 0, 255)).round()
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    if mode == "P":
        mode = "RGBA" if "transparency" in img.info else "RGB"
        img = img.convert(mode)
        if mode == "RGB":
            return img
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError as e:
        raise SkipRecord("unsupported_mode", f"{mode}: {e}") from None


def resize_center_crop(img: Image.Image, size: int, resample: int = Image.Resampling.BICUBIC) -> Image.Image:
    """Crop the centre square (side = the short side) and resize it to `size` x `size`.

    A no-op for an image that is already size x size. Cropping first keeps pixels outside the
    square out of the filter's support; `reducing_gap` first shrinks by an integer factor
    (box filter) when downscaling a lot, which is fast and alias-free."""
    w, h = img.size
    if (w, h) == (size, size):
        return img
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    if s != w or s != h:
        img = img.crop((left, top, left + s, top + s))
    return img if s == size else img.resize((size, size), resample=resample, reducing_gap=3.0)


def load_image(source: str | Path | bytes, size: int | None = 64,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an image file path or its bytes, as RGB, short-side resized and centre-cropped to
    `size` (None keeps the size). Raises SkipRecord with the reason for a bad image."""
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise SkipRecord("empty_file")
        return _decode(io.BytesIO(source), size, max_pixels)
    path = Path(source)
    try:
        st = path.stat()  # before opening: opening a FIFO would block
        if not stat.S_ISREG(st.st_mode):
            raise SkipRecord("not_a_file", f"{path} is not a regular file")
        if st.st_size == 0:
            raise SkipRecord("empty_file", str(path))
        if st.st_size > MAX_IMAGE_BYTES:
            raise SkipRecord("too_large", f"{path}: {st.st_size} bytes > {MAX_IMAGE_BYTES}")
        with open(path, "rb") as f:  # our own handle: closed even when decoding fails
            return _decode(f, size, max_pixels)
    except (FileNotFoundError, NotADirectoryError):
        raise SkipRecord("missing_file", str(path)) from None


def _decode(fp, size: int | None, max_pixels: int) -> Image.Image:
    with warnings.catch_warnings():
        # We apply our own pixel cap below; PIL's warning for large images is noise here.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(fp)  # reads the header only
        except Image.DecompressionBombError as e:
            raise SkipRecord("decompression_bomb", str(e)) from None
        except UnidentifiedImageError as e:
            raise SkipRecord("not_an_image", str(e)) from None
        except (OSError, SyntaxError, ValueError, EOFError, struct_error) as e:
            # A format plugin recognised the file, then failed on its header: cut short.
            raise SkipRecord("truncated_image", str(e)) from None
        w, h = img.size
        if w * h > max_pixels:  # checked before any pixel is decoded or allocated
            raise SkipRecord("decompression_bomb", f"{w}x{h} > {max_pixels} pixels")
        if w == 0 or h == 0:
            raise SkipRecord("not_an_image", "zero-sized image")
        try:
            if size is not None and img.format == "JPEG":
                # Decode at a reduced DCT scale when much larger than needed (>= 2*size kept).
                img.draft(img.mode, (2 * size, 2 * size))
            img.load()
            ImageOps.exif_transpose(img, in_place=True)  # camera photos stored rotated
        except Image.DecompressionBombError as e:
            raise SkipRecord("decompression_bomb", str(e)) from None
        except (OSError, SyntaxError, ValueError, EOFError, struct_error) as e:
            raise SkipRecord("truncated_image", str(e)) from None
    img = to_rgb(img)
    return img if size is None else resize_center_crop(img, size)


# --- raw items: what each format yields before images are decoded ---------------------------

@dataclass
class _Item:
    key: str
    stem: str  # image file stem: the split hash key, identical across formats
    text: str
    split: str
    meta: dict
    image: Path | bytes | None  # None when reading captions only


def _clean_caption(value) -> str:
    if not isinstance(value, str):
        raise SkipRecord("missing_field", "caption is not a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from a "\ud800" escape
        raise SkipRecord("bad_caption_encoding") from None
    value = value.strip()
    if not value:
        raise SkipRecord("empty_caption")
    if len(value) > MAX_CAPTION_CHARS:
        raise SkipRecord("too_large", f"caption of {len(value)} characters > {MAX_CAPTION_CHARS}")
    return value


def _stem(name: str) -> str:
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    return base.split(".", 1)[0] if not base.startswith(".") else base


def _split_of(split, stem: str, where: str) -> str:
    if split is None:
        return hash_split(stem)
    if split not in SPLITS:
        raise SkipRecord("missing_field", f"{where}: unknown split {split!r}")
    return split


def iter_jsonl_objects(path: str | Path) -> Iterator[tuple[int, dict | SkipRecord]]:
    """Yield (line number, object) for each non-blank line of a JSONL file, lazily; a line
    that is not UTF-8 or not a JSON object comes as a SkipRecord in place of the object."""
    with open(path, "rb") as f:
        lineno = 0
        while raw := f.readline(MAX_LINE_BYTES + 1):
            lineno += 1
            if len(raw) > MAX_LINE_BYTES:  # never held whole: the rest of the line is read in pieces
                while raw and not raw.endswith(b"\n"):
                    raw = f.readline(MAX_LINE_BYTES + 1)
                yield lineno, SkipRecord("too_large", f"{path}:{lineno}: a line over {MAX_LINE_BYTES} bytes")
                continue
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield lineno, SkipRecord("bad_caption_encoding", f"{path}:{lineno}")
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                yield lineno, SkipRecord("malformed_json", f"{path}:{lineno}")
                continue
            if not isinstance(obj, dict):
                yield lineno, SkipRecord("malformed_json", f"{path}:{lineno}: not an object")
                continue
            yield lineno, obj


class _FolderSource:
    format = "folder"

    def __init__(self, captions: Path):
        self.captions = captions
        self.root = captions.parent

    def units(self) -> list:
        return [self.captions]

    def items(self, unit: Path, with_images: bool) -> Iterator[_Item | SkipRecord]:
        for lineno, obj in iter_jsonl_objects(unit):
            if isinstance(obj, SkipRecord):
                yield obj
                continue
            try:
                image = obj.get("image")
                if not isinstance(image, str) or not image:
                    raise SkipRecord("missing_field", f"{unit}:{lineno}: no 'image'")
                text = obj.get("text", obj.get("caption"))
                if text is None:
                    raise SkipRecord("missing_field", f"{unit}:{lineno}: no 'text'")
                text = _clean_caption(text)
                stem = _stem(image)
                split = _split_of(obj.get("split"), stem, f"{unit}:{lineno}")
            except SkipRecord as s:
                yield s
                continue
            key = str(obj.get("key") or image.rsplit(".", 1)[0])
            meta = {k: v for k, v in obj.items() if k not in ("image", "text", "caption", "key", "split")}
            try:
                path = confined_path(self.root, image)
            except SkipRecord as s:
                yield s
                continue
            yield _Item(key, stem, text, split, meta, path if with_images else None)


_PRESENT = object()  # a tar member that exists but whose bytes were not needed


@dataclass(frozen=True)
class _TooLarge:  # a tar member over its size cap, left unread
    detail: str


class _TarSource:
    format = "webdataset"

    def __init__(self, shards: list[Path]):
        self.shards = shards

    def units(self) -> list:
        return list(self.shards)

    def items(self, unit: Path, with_images: bool) -> Iterator[_Item | SkipRecord]:
        n_members = 0
        key, group = None, {}
        try:
            with tarfile.open(unit, mode="r|*") as tf:
                for m in tf:
                    n_members += 1
                    if not m.isfile():
                        continue
                    k, ext = _split_member(m.name)
                    if k != key:
                        if group:
                            yield self._item(key, group)
                        key, group = k, {}
                    wanted = ext in ("txt", "json") or (with_images and ext in IMAGE_EXTS)
                    cap = MAX_TEXT_BYTES if ext in ("txt", "json") else MAX_IMAGE_BYTES
                    if m.size > cap:  # the header's (inflated) size: never read
                        group[ext] = _TooLarge(f"{m.name}: {m.size} bytes > {cap}")
                    else:
                        group[ext] = tf.extractfile(m).read() if wanted else _PRESENT
        except (tarfile.TarError, OSError, EOFError) as e:
            yield SkipRecord("truncated_shard" if n_members else "bad_shard", f"{unit}: {e}")
            return
        if group:
            yield self._item(key, group)

    @staticmethod
    def _item(key: str, group: dict) -> _Item | SkipRecord:
        image_ext = next((e for e in IMAGE_EXTS if e in group), None)
        big = next((v for v in group.values() if isinstance(v, _TooLarge)), None)
        if big is not None:
            return SkipRecord("too_large", big.detail)
        try:
            if image_ext is None:
                raise SkipRecord("missing_image", key)
            meta, text, own_split = {}, None, None
            if "json" in group:
                try:
                    obj = json.loads(group["json"].decode("utf-8"))
                except UnicodeDecodeError:
                    raise SkipRecord("bad_caption_encoding", f"{key}.json") from None
                except json.JSONDecodeError:
                    raise SkipRecord("malformed_json", f"{key}.json") from None
                if not isinstance(obj, dict):
                    raise SkipRecord("malformed_json", f"{key}.json: not an object")
                text = obj.get("caption", obj.get("text"))
                own_split = obj.get("split")
                meta = {k: v for k, v in obj.items() if k not in ("caption", "text", "key", "split")}
            if "txt" in group:
                try:
                    text = group["txt"].decode("utf-8")
                except UnicodeDecodeError:
                    raise SkipRecord("bad_caption_encoding", f"{key}.txt") from None
            if text is None:
                raise SkipRecord("missing_caption", key)
            text = _clean_caption(text)
            stem = _stem(key)
            split = _split_of(own_split, stem, key)
        except SkipRecord as s:
            return s
        image = group[image_ext]
        return _Item(key, stem, text, split, meta, None if image is _PRESENT else image)


def _split_member(name: str) -> tuple[str, str]:
    # webdataset convention: the key is the path up to the first dot of the base name.
    d, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext.lower()


class _CocoSource:
    format = "coco"

    def __init__(self, path: Path, images: str | Path | None):
        self.path = path
        self._images = Path(images) if images is not None else None
        self._index = None

    def images_dir(self) -> Path:
        if self._images is not None:
            if not self._images.is_dir():
                raise FileNotFoundError(f"COCO image folder not found: {self._images}")
            return self._images
        self._images = next(c for c in coco_image_dir_candidates(self.path) if c.is_dir())
        return self._images

    def _load(self) -> tuple[list, dict, collections.Counter]:
        if self._index is None:
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CM3LeonError(f"{self.path}: not valid JSON ({e})") from None
            if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
                    or not isinstance(data.get("annotations"), list):
                raise CM3LeonError(f"{self.path}: not a COCO captions file (needs 'images' and 'annotations' lists)")
            images = [im for im in data["images"] if isinstance(im, dict) and "id" in im
                      and isinstance(im.get("file_name"), str)]
            bad = collections.Counter(missing_field=len(data["images"]) - len(images))
            known = {im["id"] for im in images}
            captions: dict = {}
            for ann in data["annotations"]:
                if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
                    bad["missing_field"] += 1
                elif ann["image_id"] not in known:
                    bad["missing_image"] += 1
                else:
                    captions.setdefault(ann["image_id"], []).append(ann)
            self._index = (images, captions, bad)
        return self._index

    def units(self) -> list:
        return [self.path]

    def items(self, unit: Path, with_images: bool) -> Iterator[_Item | SkipRecord]:
        images, captions, bad = self._load()
        for reason, n in bad.items():
            for _ in range(n):
                yield SkipRecord(reason, str(self.path))
        root = self.images_dir() if with_images else None
        for im in images:
            anns = captions.get(im["id"])
            if not anns:
                yield SkipRecord("missing_caption", im["file_name"])
                continue
            references = [a["caption"].strip() for a in anns if isinstance(a["caption"], str)]
            stem = _stem(im["file_name"])
            extra = {k: v for k, v in im.items() if k not in ("id", "split")}
            for j, ann in enumerate(anns):
                try:
                    text = _clean_caption(ann["caption"])
                    split = _split_of(im.get("split"), stem, im["file_name"])
                except SkipRecord as s:
                    yield s
                    continue
                meta = {**extra, "image_id": im["id"], "annotation_id": ann.get("id", j),
                        "references": references,
                        **{k: v for k, v in ann.items() if k not in ("id", "image_id", "caption")}}
                key = f"{im['file_name'].rsplit('.', 1)[0]}/{ann.get('id', j)}"
                try:
                    path = confined_path(root, im["file_name"])
                except SkipRecord as s:
                    yield s
                    continue
                yield _Item(key, stem, text, split, meta, path)


def coco_image_dir_candidates(json_path: str | Path) -> list[Path]:
    """Where the images of a COCO captions JSON are looked for when no folder is given, in
    order; the last, the JSON's own folder, always exists."""
    json_path = Path(json_path)
    m = re.match(r"captions_(\w+)\.json$", json_path.name)
    cands = []
    if m:
        cands += [json_path.parent.parent / m.group(1), json_path.parent / m.group(1)]
    cands += [json_path.parent / "images", json_path.parent]
    return cands


# --- format detection -----------------------------------------------------------------------

def _expand_braces(pattern: str) -> list[str]:
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return [pattern]
    lo, hi = m.group(1), m.group(2)
    width = len(lo)
    out = []
    for i in range(int(lo), int(hi) + 1):
        out += _expand_braces(pattern[: m.start()] + str(i).zfill(width) + pattern[m.end():])
    return out


def detect_format(path: str | Path, images: str | Path | None = None):
    """Return the source reader for PATH (see the module docstring for the rules)."""
    s = str(path)
    if any(c in s for c in "*?[") or re.search(r"\{\d+\.\.\d+\}", s):
        shards = sorted({Path(p) for pat in _expand_braces(s) for p in (glob.glob(pat) if any(c in pat for c in "*?[")
                                                                      else [pat]) if Path(p).is_file()})
        if not shards:
            raise FileNotFoundError(f"no .tar shards match {s}")
        return _TarSource(shards)
    p = Path(path)
    if p.is_dir():
        if (p / CAPTIONS_FILE).is_file():
            return _FolderSource(p / CAPTIONS_FILE)
        shards = sorted(p.glob("*.tar"))
        if shards:
            return _TarSource(shards)
        raise CM3LeonError(f"{p}: not a dataset folder (no {CAPTIONS_FILE} and no .tar shards)")
    if not p.exists():
        raise FileNotFoundError(f"dataset not found: {p}")
    if p.name.endswith(".tar"):
        return _TarSource([p])
    if p.suffix == ".jsonl":
        return _FolderSource(p)
    if p.suffix == ".json":
        return _CocoSource(p, images)
    raise CM3LeonError(f"{p}: unknown dataset format (expected a folder with {CAPTIONS_FILE}, "
                       f".tar shards, or a COCO captions .json)")


# --- the reader -----------------------------------------------------------------------------

def _resolve_parts(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(part, num_parts) for this process and DataLoader worker."""
    if rank is None and world_size is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            rank, world_size = dist.get_rank(), dist.get_world_size()
        else:
            rank, world_size = 0, 1
    info = torch.utils.data.get_worker_info()
    wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * nw + wid, world_size * nw


class DatasetReader(torch.utils.data.IterableDataset):
    """Stream `Record`s from a dataset; build with `open_dataset`.

    Deterministic for a given (seed, epoch, rank, worker) layout. `stats` counts skipped
    records by reason and `num_ok` the records yielded, in the process that iterates (with
    DataLoader workers, each worker has its own copy)."""

    def __init__(self, source, size: int | None = 64, split: str | None = None, shuffle: bool = False,
                 seed: int = 0, rank: int | None = None, world_size: int | None = None,
                 shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER, max_pixels: int = DEFAULT_MAX_PIXELS,
                 split_by: str = "auto", units: list[int] | None = None):
        super().__init__()
        if size is not None and size < 1:
            raise CM3LeonError(f"size must be a positive number of pixels, got {size}")
        if (rank is None) != (world_size is None):
            raise CM3LeonError("rank and world_size must be given together")
        if world_size is not None and not 0 <= rank < world_size:
            raise CM3LeonError(f"rank {rank} is outside world_size {world_size}")
        if split_by not in ("auto", "shard", "record"):
            raise CM3LeonError(f"split_by must be 'auto', 'shard' or 'record', got {split_by!r}")
        if shuffle_buffer < 1:
            raise CM3LeonError(f"shuffle_buffer must be >= 1, got {shuffle_buffer}")
        self.source = source
        self.format = source.format
        self.size = size
        self.split = _check_split(split)
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer = shuffle_buffer
        self.max_pixels = max_pixels
        self.split_by = split_by
        num_units = len(source.units())
        if units is not None and not all(0 <= u < num_units for u in units):
            raise CM3LeonError(f"units {units}: the dataset has units 0..{num_units - 1}")
        self.units = units  # read only these units (shards) of the source, by index
        self.stats: collections.Counter = collections.Counter()
        self.num_ok = 0
        self.split_counts: collections.Counter = collections.Counter()

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle differently (but reproducibly) each epoch."""
        self.epoch = int(epoch)

    def _raw(self, with_images: bool, part: int, parts: int) -> Iterator[_Item | SkipRecord]:
        units = self.source.units()
        if self.units is not None:
            units = [units[u] for u in self.units]
        if self.shuffle:  # same permutation in every part, so shard assignment stays disjoint
            random.Random(f"{self.seed}:{self.epoch}:units").shuffle(units)
        by_shard = self.split_by == "shard" or (self.split_by == "auto" and len(units) >= parts)
        if by_shard:
            for i, unit in enumerate(units):
                if i % parts == part:
                    yield from self.source.items(unit, with_images)
        else:
            index = 0
            for unit in units:
                for item in self.source.items(unit, with_images):
                    if index % parts == part:
                        yield item
                    index += 1

    def _items(self, with_images: bool) -> Iterator[_Item]:
        part, parts = _resolve_parts(self.rank, self.world_size)
        stream = self._raw(with_images, part, parts)
        if self.shuffle:
            stream = _shuffle_buffer(stream, self.shuffle_buffer, random.Random(f"{self.seed}:{self.epoch}:{part}"))
        for item in stream:
            if isinstance(item, SkipRecord):
                self.stats[item.reason] += 1
            elif self.split is None or item.split == self.split:
                yield item

    def __iter__(self) -> Iterator[Record]:
        for item in self._items(with_images=True):
            try:
                image = load_image(item.image, self.size, self.max_pixels)
            except SkipRecord as s:
                self.stats[s.reason] += 1
                continue
            self.num_ok += 1
            self.split_counts[item.split] += 1
            yield Record(item.key, image, item.text, item.split, item.meta)

    def texts(self) -> Iterator[str]:
        """Captions only, without opening any image (caption / JSON skip rules apply)."""
        for item in self._items(with_images=False):
            self.num_ok += 1
            self.split_counts[item.split] += 1
            yield item.text


def _shuffle_buffer(stream: Iterable, capacity: int, rng: random.Random) -> Iterator:
    # Bounded-memory shuffle: fill a buffer, then emit a random element per incoming one.
    buf = []
    for x in stream:
        if len(buf) < capacity:
            buf.append(x)
            continue
        i = rng.randrange(capacity)
        buf[i], x = x, buf[i]
        yield x
    rng.shuffle(buf)
    yield from buf


def open_dataset(path: str | Path, size: int | None = 64, split: str | None = None,
                 images: str | Path | None = None, shuffle: bool = False, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None, *,
                 shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER, max_pixels: int = DEFAULT_MAX_PIXELS,
                 split_by: str = "auto", units: list[int] | None = None) -> DatasetReader:
    """Open a dataset in any supported format (autodetected) as a streaming `DatasetReader`.

    size: image side after short-side resize + centre crop (None keeps the original size).
    split: "train" / "val" / "test", or None for every record. images: COCO image folder.
    shuffle: shard order + a `shuffle_buffer`-record buffer, seeded by (seed, epoch, part).
    rank / world_size: explicit distributed layout (else torch.distributed when initialised).
    max_pixels: larger images are skipped as decompression bombs (PIL also refuses anything
    above twice its own MAX_IMAGE_PIXELS). split_by: "auto", "shard" or "record". units: read
    only these units (indices into `dataset_units(path)`: a webdataset's shards)."""
    return DatasetReader(detect_format(path, images), size=size, split=split, shuffle=shuffle, seed=seed,
                         rank=rank, world_size=world_size, shuffle_buffer=shuffle_buffer,
                         max_pixels=max_pixels, split_by=split_by, units=units)


def dataset_units(path: str | Path, images: str | Path | None = None) -> list[str]:
    """The units a dataset is read in, in order: a webdataset's .tar shards; the one
    captions.jsonl of a folder; the one JSON of a COCO set."""
    return [str(u) for u in detect_format(path, images).units()]


def iter_texts(path: str | Path, split: str | None = None) -> Iterator[str]:
    """Captions of a dataset, in order, without decoding images (for training the BPE)."""
    return open_dataset(path, size=None, split=split).texts()


def check_dataset(path: str | Path, size: int | None = 64, images: str | Path | None = None,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """Read every record (decoding images) and report what is usable and what is skipped."""
    reader = open_dataset(path, size=size, images=images, max_pixels=max_pixels)
    with progress(desc=f"checking {Path(str(path)).name}", unit="rec") as bar:
        for _ in reader:
            bar.update(1)
    skipped = sum(reader.stats.values())
    return {
        "path": str(path),
        "format": reader.format,
        "ok": reader.num_ok,
        "skipped": skipped,
        "skipped_by_reason": dict(sorted(reader.stats.items())),
        "splits": {s: reader.split_counts.get(s, 0) for s in SPLITS},
    }


def collate_records(batch: list[Record]) -> dict:
    """DataLoader `collate_fn` for Records: images stacked as uint8 (B, 3, H, W)."""
    import torch

    images = torch.from_numpy(np.stack([np.asarray(r.image, dtype=np.uint8) for r in batch]))  # (B, H, W, 3)
    return {
        "keys": [r.key for r in batch],
        "texts": [r.text for r in batch],
        "splits": [r.split for r in batch],
        "meta": [r.meta for r in batch],
        "images": images.permute(0, 3, 1, 2).contiguous(),  # (B, 3, H, W)
    }


def read_jsonl_images(folder: str | Path, filename: str, image_keys: tuple[str, ...] = ("image",),
                      size: int | None = 64, stats: collections.Counter | None = None,
                      max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[dict]:
    """Rows of `folder/filename` (JSONL) with each field in `image_keys` (a path relative to
    `folder`) replaced by the loaded RGB image, resized like the readers do.

    For instruction-tuning files (VQA, edits, layouts): a row with a bad JSON line, a missing
    image field or any bad image is skipped and counted in `stats` by reason."""
    folder = Path(folder)
    path = folder / filename
    if not path.is_file():
        raise FileNotFoundError(f"{filename} not found in {folder}")
    stats = stats if stats is not None else collections.Counter()
    for lineno, obj in iter_jsonl_objects(path):
        try:
            if isinstance(obj, SkipRecord):
                raise obj
            row = dict(obj)
            for k in image_keys:
                rel = obj.get(k)
                if not isinstance(rel, str) or not rel:
                    raise SkipRecord("missing_field", f"{path}:{lineno}: no {k!r}")
                row[k] = load_image(confined_path(folder, rel), size, max_pixels)
        except SkipRecord as s:
            stats[s.reason] += 1
            continue
        yield row
