"""What the evaluation reads from a dataset: the split's images with every reference caption
(any format the readers open: folder, webdataset shards, COCO JSON), their shapes annotations,
and the instruction files of a folder (vqa.jsonl, edits.jsonl)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from cm3leon.errors import CM3LeonError


@dataclass
@dataclass
class CaptionedImage:
    """One image of the split with every reference caption; `objects` is its shapes
    annotation (None outside shapes data)."""

    key: str
    image: Any  # PIL image
    references: list[str]
    objects: list[dict] | None = None

    @property
    def prompt(self) -> str:
        return self.references[0]


@dataclass
class EvalData:
    """What the evaluation reads from a dataset: images with their captions (any format the
    readers open: folder, webdataset shards, COCO JSON) and, for a folder, its instruction
    files (vqa.jsonl, edits.jsonl) and shapes annotations."""

    path: Path
    split: str | None
    images: list[CaptionedImage]
    folder: Path | None  # the dataset folder (None for shards / COCO)
    is_shapes: bool = False
    notes: list[str] = field(default_factory=list)


def _stem(rel: str) -> str:
    # the readers' split key: the file name up to its first dot
    return rel.replace("\\", "/").rsplit("/", 1)[-1].split(".", 1)[0]


def _row_split(row: dict) -> str:
    from cm3leon.data.readers import hash_split

    return row.get("split") or hash_split(_stem(row["image"]))


def check_num(num: int | None) -> None:
    """A prompt count: a positive integer, or None for all of them."""
    if num is not None and (isinstance(num, bool) or not isinstance(num, int) or num < 1):
        raise CM3LeonError(f"num_prompts must be a positive integer or None (all), got {num!r}")


def load_eval_data(data: str | os.PathLike, split: str | None = "test", num: int | None = None,
                   size: int | None = None, images: str | os.PathLike | None = None) -> EvalData:
    """The first `num` images of `split` (None: all) with all their captions, read by the
    dataset readers; images are decoded only for the images kept (`size`: short-side resize
    + centre crop, None keeps them as stored). `images`: a COCO image folder."""
    from cm3leon.data.readers import detect_format, load_image, SkipRecord
    from cm3leon.utils.io import read_jsonl

    from cm3leon.data.codes import SPLITS

    check_num(num)
    if split is not None and split not in SPLITS:
        raise CM3LeonError(f"split: unknown split {split!r}; expected one of {SPLITS} or None (all)")
    source = detect_format(data, images)
    groups: dict[Any, dict] = {}
    for unit in source.units():
        for item in source.items(unit, True):
            if isinstance(item, SkipRecord) or (split is not None and item.split != split):
                continue
            gid = item.meta.get("image_id", str(item.image) if isinstance(item.image, Path) else item.key)
            g = groups.get(gid)
            if g is None:
                if num is not None and len(groups) >= num:
                    continue  # still read on: later rows may add captions of kept images
                g = groups[gid] = {"item": item, "refs": []}
            refs = item.meta.get("references")
            if refs:  # COCO: every caption of the image comes with each record
                g["refs"] = [r for r in refs if isinstance(r, str) and r.strip()]
            else:
                g["refs"].append(item.text)
    folder = Path(data) if Path(data).is_dir() and (Path(data) / "captions.jsonl").is_file() else None
    annotations: dict[str, list[dict]] = {}
    if folder is not None and (folder / "annotations.jsonl").is_file():
        for row in read_jsonl(folder / "annotations.jsonl"):
            if isinstance(row.get("image"), str) and isinstance(row.get("objects"), list):
                annotations[str((folder / row["image"]).resolve())] = row["objects"]
    out = EvalData(Path(data), split, [], folder, is_shapes=bool(annotations))
    skipped = 0
    for g in groups.values():
        item = g["item"]
        try:
            im = load_image(item.image, size)
        except SkipRecord:
            skipped += 1
            continue
        objects = annotations.get(str(Path(item.image).resolve())) if isinstance(item.image, Path) else None
        out.images.append(CaptionedImage(item.key, im, g["refs"], objects))
    if skipped:
        out.notes.append(f"{skipped} unreadable image(s) of split {split!r} skipped")
    if not out.images:
        raise CM3LeonError(f"{data}: no readable images in split {split!r}")
    return out


def load_instruction_rows(data: EvalData, filename: str, image_keys: Sequence[str], num: int | None,
                          size: int | None) -> list[dict] | None:
    """The first `num` rows of `filename` (vqa.jsonl, edits.jsonl) in the data's split with
    their images loaded; None when the dataset has no such file."""
    from cm3leon.data.readers import confined_path, iter_jsonl_objects, load_image, SkipRecord

    if data.folder is None or not (data.folder / filename).is_file():
        return None
    rows = []
    for _, obj in iter_jsonl_objects(data.folder / filename):
        if num is not None and len(rows) >= num:
            break
        if isinstance(obj, SkipRecord) or not all(isinstance(obj.get(k), str) for k in image_keys):
            continue
        if data.split is not None and _row_split(obj) != data.split:
            continue
        try:
            rows.append({**obj, **{f"{k}_pil": load_image(confined_path(data.folder, obj[k]), size)
                                   for k in image_keys}})
        except SkipRecord:
            continue
    return rows
