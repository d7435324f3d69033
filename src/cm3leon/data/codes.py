"""Code shards: a dataset tokenized once (BPE ids + VQ codes), read memory-mapped by training.

Layout of a tokenized directory:

    meta.json                 {"format": "cm3leon-codes/1", "grid": [h, w], "codebook_size",
                               "text_vocab_size", "num_records", "splits": {...},
                               "complete": true, ...extra}
    shard-00000-00000/        one directory per `shard_size` records of one input unit (a
                              webdataset .tar; a folder or COCO set is one unit), renamed into
                              place; named shard-UNIT-CHUNK, so sorted names give record order
    unit-00000.json           an input unit's shards are all written: {"unit", "source",
                              "num_records", "num_shards", "reader_skipped"}
      image_codes.npy         uint16/int32 [n, h*w]
      text_ids.npy            int32 [total text tokens of the shard]   (BPE ids, not offset)
      text_offsets.npy        int64 [n + 1]
      split.npy               uint8 [n]   index into SPLITS
      records.jsonl           {"key", "text", "split", ...extra keys of the record}

A shard directory appears only when complete, so an interrupted `cm3leon tokenize` resumes
after the last complete shard and never reads a half-written one. Units are tokenized
independently (by worker processes or torchrun ranks), and `meta.json` merges them.
"""

from __future__ import annotations

import json
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cm3leon.errors import CM3LeonError
from cm3leon.utils.io import atomic_path, load_npy, read_json, write_json

FORMAT = "cm3leon-codes/1"
SPLITS = ("train", "val", "test")


def split_id(split: str | None) -> int:
    split = split or "train"
    if split not in SPLITS:
        raise CM3LeonError(f"unknown split {split!r}; expected one of {SPLITS}")
    return SPLITS.index(split)


@dataclass
class CodeRecord:
    index: int  # global index in the tokenized directory
    key: str
    split: str
    text: str
    text_ids: np.ndarray  # int32 BPE ids
    image_codes: np.ndarray  # int64 [h*w]
    extra: dict


class CodeShardWriter:
    """Append records; every `shard_size` records a shard directory `{prefix}{n:05d}` is
    committed atomically. Writers of several input units share `out_dir` with one prefix each."""

    def __init__(self, out_dir: str | Path, grid: tuple[int, int], codebook_size: int,
                 text_vocab_size: int, shard_size: int = 4096, extra_meta: dict | None = None,
                 prefix: str = "shard-"):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.grid = (int(grid[0]), int(grid[1]))
        self.codebook_size = int(codebook_size)
        self.text_vocab_size = int(text_vocab_size)
        self.shard_size = int(shard_size)
        self.extra_meta = dict(extra_meta or {})
        self._code_dtype = np.uint16 if codebook_size <= 65536 else np.int32
        self.prefix = prefix
        shards = sorted(self.out_dir.glob(f"{prefix}*"))
        self._next_shard = len(shards)
        self.num_done = sum(_shard_len(s) for s in shards)  # records already on disk (resume)
        self._buf: list[tuple] = []

    def add(self, key: str, split: str, text: str, text_ids, image_codes, extra: dict | None = None) -> None:
        codes = np.asarray(image_codes).reshape(-1)
        if codes.size != self.grid[0] * self.grid[1]:
            raise CM3LeonError(f"record {key!r}: {codes.size} image codes, expected {self.grid[0]}x{self.grid[1]}")
        self._buf.append((key, split_id(split), text, np.asarray(text_ids, dtype=np.int32), codes, extra or {}))
        if len(self._buf) >= self.shard_size:
            self._flush()

    def _flush(self) -> None:
        if not self._buf:
            return
        name = self.out_dir / f"{self.prefix}{self._next_shard:05d}"
        with atomic_path(name) as tmp:
            tmp.mkdir()
            lens = [len(b[3]) for b in self._buf]
            np.save(tmp / "image_codes.npy", np.stack([b[4] for b in self._buf]).astype(self._code_dtype))
            np.save(tmp / "text_ids.npy", np.concatenate([b[3] for b in self._buf]) if sum(lens) else np.zeros(0, np.int32))
            np.save(tmp / "text_offsets.npy", np.concatenate([[0], np.cumsum(lens)]).astype(np.int64))
            np.save(tmp / "split.npy", np.array([b[1] for b in self._buf], dtype=np.uint8))
            with open(tmp / "records.jsonl", "w", encoding="utf-8") as f:
                for key, sid, text, _, _, extra in self._buf:
                    f.write(json.dumps({**extra, "key": key, "text": text, "split": SPLITS[sid]}) + "\n")
        self.num_done += len(self._buf)
        self._next_shard += 1
        self._buf = []

    def finish(self) -> int:
        """Flush the last shard; returns the number of records this writer's shards hold."""
        self._flush()
        return self.num_done

    def close(self) -> dict:
        """Flush the last shard and mark the directory complete; returns meta."""
        self.finish()
        return write_codes_meta(self.out_dir, self.grid, self.codebook_size, self.text_vocab_size, self.extra_meta)


def write_codes_meta(out_dir: str | Path, grid: tuple[int, int], codebook_size: int, text_vocab_size: int,
                     extra_meta: dict | None = None) -> dict:
    """Count the records and splits of every shard in `out_dir` and write `meta.json`, which
    marks the directory complete; returns meta."""
    out_dir = Path(out_dir)
    counts = {s: 0 for s in SPLITS}
    for shard in sorted(out_dir.glob("shard-*")):
        sp = np.load(shard / "split.npy", mmap_mode="r")
        for i, s in enumerate(SPLITS):
            counts[s] += int((sp == i).sum())
    meta = {
        **(extra_meta or {}),
        "format": FORMAT,
        "grid": [int(grid[0]), int(grid[1])],
        "tokens_per_image": int(grid[0]) * int(grid[1]),
        "codebook_size": int(codebook_size),
        "text_vocab_size": int(text_vocab_size),
        "num_records": sum(counts.values()),
        "splits": counts,
        "complete": True,
    }
    write_json(out_dir / "meta.json", meta)
    return meta


def _shard_len(shard: Path) -> int:
    return int(np.load(shard / "split.npy", mmap_mode="r").shape[0])


def load_shard(shard: Path) -> dict:
    """A shard directory's arrays, memory-mapped ({"dir", "codes", "text", "offsets", "split",
    "records": None}); a missing, damaged or inconsistent file is a CM3LeonError naming it."""
    entry = {"dir": shard,
             "codes": load_npy(shard / "image_codes.npy", "image codes"),
             "text": load_npy(shard / "text_ids.npy", "text ids"),
             "offsets": np.asarray(load_npy(shard / "text_offsets.npy", "text offsets")),
             "split": np.asarray(load_npy(shard / "split.npy", "splits")),
             "records": None}
    n = len(entry["split"])
    if entry["codes"].ndim < 2 or len(entry["codes"]) != n or len(entry["offsets"]) != n + 1 \
            or (n and int(entry["offsets"][-1]) != len(entry["text"])):
        raise CM3LeonError(f"{shard}: image_codes.npy {entry['codes'].shape}, text_offsets.npy "
                           f"{entry['offsets'].shape}, text_ids.npy {entry['text'].shape} do not fit "
                           f"{n} records (split.npy); re-run `cm3leon tokenize` into a new folder")
    return entry


def is_complete(path: str | Path) -> bool:
    p = Path(path) / "meta.json"
    if not p.is_file():
        return False
    try:
        return bool(json.loads(p.read_text()).get("complete"))
    except json.JSONDecodeError:
        return False


class CodeDataset:
    """Random access over a tokenized directory, memory-mapped; optionally one split."""

    def __init__(self, path: str | Path, split: str | None = None):
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{self.path} is not a tokenized dataset (no meta.json); run `cm3leon tokenize` first")
        self.meta = read_json(meta_path, "tokenized dataset metadata")
        if self.meta.get("format") != FORMAT:
            raise CM3LeonError(f"{meta_path}: format {self.meta.get('format')!r}, expected {FORMAT!r}")
        if not self.meta.get("complete"):
            raise CM3LeonError(f"{self.path}: tokenization did not finish; re-run `cm3leon tokenize` to resume")
        self.grid = tuple(self.meta["grid"])
        self._shards = [load_shard(shard) for shard in sorted(self.path.glob("shard-*"))]
        self._starts = np.concatenate([[0], np.cumsum([len(s["split"]) for s in self._shards])]).astype(np.int64)
        total = int(self._starts[-1])
        if total != int(self.meta["num_records"]):
            raise CM3LeonError(f"{self.path}: meta.json says {self.meta['num_records']} records, shards hold {total}")
        all_splits = np.concatenate([s["split"] for s in self._shards]) if self._shards else np.zeros(0, np.uint8)
        self.split = split
        self.indices = np.arange(total) if split is None else np.flatnonzero(all_splits == split_id(split))

    @property
    def tokens_per_image(self) -> int:
        return int(self.grid[0] * self.grid[1])

    def __len__(self) -> int:
        return len(self.indices)

    def _locate(self, gi: int) -> tuple[dict, int]:
        s = bisect_right(self._starts, gi) - 1
        return self._shards[s], gi - int(self._starts[s])

    def record_meta(self, gi: int) -> dict:
        shard, li = self._locate(int(gi))
        if shard["records"] is None:
            with open(shard["dir"] / "records.jsonl", encoding="utf-8") as f:
                shard["records"] = [json.loads(line) for line in f]
        return shard["records"][li]

    def keys_and_splits(self):
        """(key, split) of every record of the directory in global order, read shard by shard
        without keeping the rows (`record_meta` caches a shard's rows)."""
        for shard in self._shards:
            with open(shard["dir"] / "records.jsonl", encoding="utf-8") as f:
                for line in f:
                    row = json.loads(line)
                    yield row["key"], row["split"]

    def get(self, gi: int) -> CodeRecord:
        """Record by global index (what retrieval neighbours refer to)."""
        shard, li = self._locate(int(gi))
        o = shard["offsets"]
        meta = dict(self.record_meta(gi))
        key, text, split = meta.pop("key"), meta.pop("text"), meta.pop("split")
        return CodeRecord(
            index=int(gi), key=key, split=split, text=text,
            text_ids=np.asarray(shard["text"][o[li]:o[li + 1]], dtype=np.int32),
            image_codes=np.asarray(shard["codes"][li], dtype=np.int64),
            extra=meta,
        )

    def tokens(self, gi: int) -> tuple[np.ndarray, np.ndarray]:
        """(text_ids int32, image_codes int64) of a record by global index, without reading
        records.jsonl (the fast path for training)."""
        shard, li = self._locate(int(gi))
        o = shard["offsets"]
        return (np.asarray(shard["text"][o[li]:o[li + 1]], dtype=np.int32),
                np.asarray(shard["codes"][li], dtype=np.int64))

    def __getitem__(self, i: int) -> CodeRecord:
        return self.get(int(self.indices[i]))

    def image_codes(self) -> np.ndarray:
        """All image codes of this view, [len, h*w] (loads them)."""
        return np.stack([self.get(int(g)).image_codes for g in self.indices]) if len(self) else np.zeros((0, self.tokens_per_image), np.int64)
