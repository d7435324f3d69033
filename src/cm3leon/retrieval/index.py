"""The memory bank: document vectors of a dataset in a FAISS index (maximum inner product
search, CM3Leon Sec. 2.2), metadata mapping each hit back to its record, and the neighbours
file pretraining reads.

An index directory:

    index.json        {"format", "dim", "count", "index_type", "params", "retriever", "data",
                       "split", "codes"}; written last, so its presence means the build finished
    index.faiss       the FAISS index (ids 0..count-1 in metadata order)
    vectors.npy       float32 [count, dim] document vectors (exact relevance for the policy)
    metadata.jsonl    one row per document: {"key", "text", "split", "code_index", "sig"}
                      (a loaded bank keeps only each row's byte offset and reads rows on demand)
    image_codes.npy   [count, h*w] VQ codes of each document (only with --codes)
    embeddings/       while embedding: each dataset unit's chunks (`chunk-UNIT-CHUNK`) and, once
                      it is done, its `unit-*.json`; a rerun skips done units and resumes a
                      started one after its last chunk (`--workers N` take whole units)

Exact search (IndexFlatIP) is the default; IVF and IVF-PQ (trained on a sample) scale to
millions of documents.

`Retrieval` pairs a retriever with a bank and the selection policy: documents for a prompt at
generation time.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import threading
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from cm3leon.errors import CM3LeonError
from cm3leon.retrieval.policy import (
    Query, RetrievalPolicy, document_signature, image_digest, search_candidates, select_documents,
)
from cm3leon.utils.io import (atomic_path, file_digest, load_npy, read_json, remove_stale_temporaries, remove_tree,
                              write_json)
from cm3leon.utils.logging import progress
from cm3leon.utils.units import barrier_group, check_job, check_workers, run_units, torchrun

FORMAT = "cm3leon-index/1"
NEIGHBORS_FORMAT = "cm3leon-neighbors/1"
INDEX_TYPES = ("flat", "ivf", "ivfpq")
EMBEDDINGS = "embeddings"  # the resumable chunks of a build in progress
EMBED_LAYOUT = "chunk-UNIT-CHUNK"  # recorded in embeddings/build.json: another layout is not resumed


# ---------------------------------------------------------------------------- FAISS

def index_params(n: int, dim: int, index_type: str, nlist: int | None = None, pq_m: int | None = None,
                 pq_nbits: int = 8, nprobe: int | None = None, refine: int = 16) -> dict:
    """Parameters of an index over n vectors, with defaults that suit n (recorded in index.json).

    IVF-PQ `refine`: fetch refine*k hits by compressed distance, re-rank them by exact inner
    product with the stored vectors (PQ alone confuses close neighbours; 1 = off).

    Defaults measured on 225,000 32-dimensional retriever vectors of the built-in data
    (benchmarks/scale.py; recall@10 against exact search, a hit counted when it ties the 10th
    best score): 4-byte codes (m = 4) found 0.27 at refine 4 and 0.53 at 16; 8-byte 0.58 / 0.83;
    16-byte (m = 16, two dimensions per sub-quantiser) 0.96 / 0.996 at 8-14k queries/s on one
    core. So m = dim / 2, at most 64 sub-quantisers (8+ dimensions each for CLIP-size vectors),
    and refine 16."""
    if index_type not in INDEX_TYPES:
        raise CM3LeonError(f"--index-type {index_type!r}: expected one of {INDEX_TYPES}")
    if index_type == "flat":
        return {}
    # ~sqrt(n) lists (FAISS suggests sqrt(n)..16 sqrt(n); the low end trains fastest on a CPU),
    # and FAISS wants >= 39 training points per list.
    nlist = int(nlist or max(1, round(math.sqrt(n))))
    nlist = max(1, min(nlist, n // 39 or 1))
    params = {"nlist": nlist, "nprobe": int(min(nlist, nprobe or 16))}
    if index_type == "ivfpq":
        # m sub-quantisers of >= 2 dimensions each, at most 64; 8 bits per code unless n is too
        # small to train 256 centroids.
        m = int(pq_m or max([d for d in range(1, min(dim, 64) + 1) if dim % d == 0 and dim // d >= 2] or [1]))
        if dim % m:
            raise CM3LeonError(f"--pq-m {m} must divide the embedding dimension {dim}")
        params.update({"pq_m": m, "pq_nbits": int(max(1, min(pq_nbits, int(math.log2(max(2, n // 8)))))),
                       "refine": int(refine)})
    return params


def make_faiss_index(vectors: np.ndarray, index_type: str = "flat", params: dict | None = None,
                     train_sample: int | None = None, seed: int = 0, add_batch: int = 65536):
    """Build a FAISS inner-product index over `vectors` [n, dim] (float32). IVF / IVF-PQ are
    trained on a random sample (default: 64 vectors per list, at least 10,000)."""
    import faiss

    n, dim = vectors.shape
    params = params if params is not None else index_params(n, dim, index_type)
    if index_type == "flat":
        index = faiss.IndexFlatIP(dim)
    else:
        quantizer = faiss.IndexFlatIP(dim)
        if index_type == "ivf":
            index = faiss.IndexIVFFlat(quantizer, dim, params["nlist"], faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.IndexIVFPQ(quantizer, dim, params["nlist"], params["pq_m"], params["pq_nbits"],
                                     faiss.METRIC_INNER_PRODUCT)
        train_sample = train_sample or max(64 * params["nlist"], 10_000)
        sample = np.sort(np.random.default_rng(seed).choice(n, min(n, train_sample), replace=False))
        index.train(np.ascontiguousarray(vectors[sample], dtype=np.float32))
        index.nprobe = params["nprobe"]
    for s in range(0, n, add_batch):
        index.add(np.ascontiguousarray(vectors[s:s + add_batch], dtype=np.float32))
    return index


def rerank_exact(vectors: np.ndarray, queries: np.ndarray, ids: np.ndarray, k: int,
                 batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank candidate ids [N, m] by exact inner product with `vectors` (may be a memmap):
    (scores float32 [N, k], ids int64 [N, k]), -1 where there are fewer than k candidates."""
    n = len(queries)
    out_s = np.full((n, k), -np.inf, dtype=np.float32)
    out_i = np.full((n, k), -1, dtype=np.int64)
    for s in range(0, n, batch):
        cand = ids[s:s + batch]  # (b, m)
        safe = np.maximum(cand, 0)
        uniq, inv = np.unique(safe, return_inverse=True)
        vecs = np.asarray(vectors[uniq], dtype=np.float32)[inv.reshape(safe.shape)]  # (b, m, dim)
        sc = np.einsum("bmd,bd->bm", vecs, queries[s:s + batch])
        sc[cand < 0] = -np.inf
        top = np.argsort(-sc, axis=1, kind="stable")[:, :k]
        out_s[s:s + batch, : top.shape[1]] = np.take_along_axis(sc, top, 1)
        out_i[s:s + batch, : top.shape[1]] = np.where(np.isfinite(np.take_along_axis(sc, top, 1)),
                                                      np.take_along_axis(cand, top, 1), -1)
    return out_s, out_i


# ---------------------------------------------------------------------------- the bank

class MetadataRows:
    """The rows of a bank's metadata.jsonl, read on demand: what stays in memory is the byte
    offset of each row (8 bytes a document) and a small cache of recently read rows, not a
    Python dict per document.

    Opening scans the file once and checks that every non-blank line is a JSON object with a
    string "key" and a "text" (errors name file:line). The file stays open, so a bank rebuilt
    in place (files are replaced by rename) does not change the rows under a loaded bank."""

    def __init__(self, path: str | Path, cache_size: int = 4096):
        self.path = Path(path)
        self._cache: OrderedDict[int, dict] = OrderedDict()
        self._cache_size = int(cache_size)
        self._lock = threading.Lock()
        self._file = open(self.path, "rb")
        try:
            self._starts = self._scan()
        except BaseException:
            self._file.close()
            raise

    def _scan(self) -> np.ndarray:
        starts = array("q")
        pos = 0
        for lineno, line in enumerate(self._file, 1):
            if line.strip():
                self._check(self._parse(line, f"{self.path}:{lineno}"), f"{self.path}:{lineno}")
                starts.append(pos)
            pos += len(line)
        return np.frombuffer(starts, dtype=np.int64).copy() if starts else np.zeros(0, np.int64)

    @staticmethod
    def _parse(line: bytes, where: str) -> dict:
        try:
            return json.loads(line.decode("utf-8"))
        except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
            raise CM3LeonError(f"{where}: malformed JSON line ({e})") from None

    def _check(self, row, where: str) -> None:
        if not isinstance(row, dict):
            raise CM3LeonError(f"{self.path}: every line must be a JSON object ({where} is a {type(row).__name__})")
        if not isinstance(row.get("key"), str):
            raise CM3LeonError(f"{where}: the row needs a string 'key' (got {row.get('key')!r})")
        if "text" not in row:
            raise CM3LeonError(f"{where}: the row has no 'text'")

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, i: int) -> dict:
        """Row i (a cached dict: callers must not modify it)."""
        i = int(i)
        if not 0 <= i < len(self._starts):
            raise IndexError(f"{self.path}: row {i} of {len(self._starts)}")
        with self._lock:
            row = self._cache.get(i)
            if row is not None:
                self._cache.move_to_end(i)
                return row
            self._file.seek(int(self._starts[i]))
            line = self._file.readline()
            row = self._parse(line, f"{self.path}: row {i}")
            self._check(row, f"{self.path}: row {i}")
            self._cache[i] = row
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return row

    def batches(self, size: int = 65536) -> Iterator[tuple[int, list[dict]]]:
        """(first row, rows) of `size` rows at a time, in order, for one pass over all rows."""
        for s in range(0, len(self._starts), size):
            e = min(s + size, len(self._starts))
            with self._lock:
                self._file.seek(int(self._starts[s]))
                block = self._file.read(-1 if e == len(self._starts) else int(self._starts[e] - self._starts[s]))
            rows = [self._parse(line, f"{self.path}: rows {s}..{e - 1}")
                    for line in block.split(b"\n") if line.strip()]  # lines as the scan saw them
            if len(rows) != e - s:
                raise CM3LeonError(f"{self.path}: changed while the bank was loaded; load it again")
            yield s, rows

    def close(self) -> None:
        self._file.close()

    def __del__(self):
        f = getattr(self, "_file", None)
        if f is not None:
            f.close()


class MemoryBank:
    """A built index directory: `search`, `document`, `doc_info`, `vectors`, `len()`, `.dim`;
    `metadata` reads the rows of metadata.jsonl on demand."""

    def __init__(self, path: Path, info: dict, index, metadata: MetadataRows, vectors: np.ndarray,
                 image_codes: np.ndarray | None):
        self.path, self.info, self.index, self.metadata = path, info, index, metadata
        self._vectors, self._codes = vectors, image_codes
        self.dim = int(info["dim"])

    @classmethod
    def load(cls, path: str | Path, nprobe: int | None = None) -> "MemoryBank":
        import faiss

        path = Path(path)
        info_path = path / "index.json"
        if not info_path.is_file():
            raise CM3LeonError(f"{info_path}: missing; {path} is not a built index "
                               "(or its build did not finish: rerun `cm3leon index build` to resume)")
        info = read_json(info_path, "index description")
        if info.get("format") != FORMAT:
            raise CM3LeonError(f"{info_path}: format {info.get('format')!r}, expected {FORMAT!r}")
        for name in ("index.faiss", "metadata.jsonl", "vectors.npy"):
            if not (path / name).is_file():
                raise CM3LeonError(f"{path / name}: missing index file; rebuild with `cm3leon index build`")
        try:
            index = faiss.read_index(str(path / "index.faiss"))
        except RuntimeError as e:
            raise CM3LeonError(f"{path / 'index.faiss'}: not a readable FAISS index ({str(e).splitlines()[0][:160]}); "
                               "rebuild with `cm3leon index build`") from None
        rows = MetadataRows(path / "metadata.jsonl")
        vectors = load_npy(path / "vectors.npy", "index vectors")
        codes_path = path / "image_codes.npy"
        codes = load_npy(codes_path, "image codes") if codes_path.is_file() else None
        try:
            n, dim = int(info["count"]), int(info["dim"])
        except (KeyError, TypeError, ValueError):
            raise CM3LeonError(f"{info_path}: needs integer 'count' and 'dim'") from None
        if vectors.ndim != 2:
            raise CM3LeonError(f"{path / 'vectors.npy'}: expected a 2-D array, got shape {vectors.shape}")
        for what, got in (("index.faiss vectors", index.ntotal), ("metadata.jsonl rows", len(rows)),
                          ("vectors.npy rows", vectors.shape[0]),
                          *((("image_codes.npy rows", codes.shape[0]),) if codes is not None else ())):
            if got != n:
                raise CM3LeonError(f"{path}: index.json says {n} documents but {what} = {got}; rebuild the index")
        if index.d != dim or vectors.shape[1] != dim:
            raise CM3LeonError(f"{path}: index.json says dim {dim} but index.faiss has {index.d}, vectors.npy {vectors.shape[1]}")
        if hasattr(index, "nprobe"):
            index.nprobe = int(nprobe or info.get("params", {}).get("nprobe", 16))
        return cls(path, info, index, rows, vectors, codes)

    def __len__(self) -> int:
        return len(self.metadata)

    @property
    def retriever_path(self) -> Path | None:
        """The retriever the index was built with: recorded path, else a sibling `retriever/`
        (the layout of a model directory)."""
        rec = self.info.get("retriever")
        if rec and (Path(rec) / "config.json").is_file():
            return Path(rec)
        sib = self.path.parent / "retriever"
        return sib if (sib / "config.json").is_file() else (Path(rec) if rec else None)

    def check_retriever(self, retriever) -> None:
        """A retriever whose dimension differs from the index's cannot query it."""
        if retriever.dim != self.dim:
            src = f"{retriever.path / 'config.json'}" if getattr(retriever, "path", None) else "the retriever"
            raise CM3LeonError(f"{src} embeds in {retriever.dim} dimensions but {self.path / 'index.json'} holds "
                               f"{self.dim}-dimensional vectors: query with the retriever the index was built with "
                               f"({self.info.get('retriever')}) or rebuild the index")

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product: (scores float32 [N, k], ids int64 [N, k]); id -1 = no hit."""
        q = np.asarray(queries, dtype=np.float32)
        q = np.ascontiguousarray(q.reshape(-1, q.shape[-1]))
        if q.shape[1] != self.dim:
            raise CM3LeonError(f"query vectors have {q.shape[1]} dimensions, {self.path / 'index.json'} holds {self.dim}")
        k = max(1, min(int(k), len(self)))
        refine = int(self.info.get("params", {}).get("refine", 1))
        if refine <= 1:
            scores, ids = self.index.search(q, k)
            return scores.astype(np.float32), ids.astype(np.int64)
        _, ids = self.index.search(q, min(len(self), refine * k))
        return rerank_exact(self._vectors, q, ids, k)

    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        """Stored document vectors [len(ids), dim] (exact, also for a compressed index)."""
        return np.asarray(self._vectors[np.asarray(ids, dtype=np.int64)], dtype=np.float32)

    def document(self, i: int) -> dict:
        """{key, text, split, code_index (or None), image_codes (np.ndarray or None)}."""
        row = self.metadata[i]
        return {"key": row["key"], "text": row["text"], "split": row.get("split"),
                "code_index": row.get("code_index"),
                "image_codes": None if self._codes is None else np.asarray(self._codes[int(i)], dtype=np.int64)}

    def doc_info(self, i: int) -> tuple[str, str | None, bool]:
        """(key, content signature, eligible) for the selection policy."""
        row = self.metadata[i]
        return row["key"], row.get("sig"), True


# ---------------------------------------------------------------------------- generation

class Retrieval:
    """A retriever and a memory bank: documents for a prompt at generation time.

    The decoding code calls `Retrieval.from_model_dir(dir)` (None when the directory holds no
    `retriever/` and `index/`) and `retrieve_for_prompt(text=..., image=..., k=...)`."""

    def __init__(self, retriever, bank, policy: RetrievalPolicy | None = None):
        bank.check_retriever(retriever)
        self.retriever = retriever
        self.bank = bank
        self.policy = policy or RetrievalPolicy.for_generation()

    @classmethod
    def from_model_dir(cls, model_dir, policy: RetrievalPolicy | None = None, device=None) -> "Retrieval | None":
        from cm3leon.retrieval.encoder import load_retriever

        model_dir = Path(model_dir)
        if not ((model_dir / "retriever").is_dir() and (model_dir / "index").is_dir()):
            return None
        return cls(load_retriever(model_dir / "retriever", device=device), MemoryBank.load(model_dir / "index"), policy)

    def retrieve_for_prompt(self, text: str | None = None, image=None, k: int = 2) -> list[dict]:
        """Up to k documents for a text and/or image prompt, most relevant first:
        [{key, text, code_index, image_codes (or None), score}]."""
        return retrieve_for_prompt(self.retriever, self.bank, text=text, image=image, k=k, policy=self.policy)


def retrieve_for_prompt(retriever, bank, text: str | None = None, image=None, k: int = 2,
                        policy: RetrievalPolicy | None = None) -> list[dict]:
    """Documents for one prompt (see `Retrieval.retrieve_for_prompt`)."""
    policy = policy or RetrievalPolicy.for_generation(num_docs=k)
    if len(bank) == 0 or k <= 0:
        return []
    ids, scores = search_candidates(retriever, bank, [Query(text=text, image=image)], policy)[0]
    chosen, _ = select_documents(ids, scores, bank.doc_info, policy, k=k)
    return [{**bank.document(i), "score": s} for i, s in chosen]


# ---------------------------------------------------------------------------- build

def _encode_key(key: str) -> bytes:
    # UTF-8 (lone surrogates kept) plus 0xFF, a byte UTF-8 never contains: numpy's fixed-width
    # bytes drop trailing NULs, the end marker keeps "a" and "a\x00" apart.
    return key.encode("utf-8", "surrogatepass") + b"\xff"


class KeyLookup:
    """Record key -> global record index of a tokenized directory, and every record's split,
    in numpy arrays: the distinct keys as sorted fixed-width bytes (binary search), their
    record indices, and a split code per record. A key that occurs more than once maps to its
    first (lowest) record index."""

    def __init__(self, keys_and_splits: Iterable[tuple[str, str]], chunk: int = 65536):
        parts: list[np.ndarray] = []
        buf: list[bytes] = []
        names: dict[str, int] = {}
        codes = array("H")
        for key, split in keys_and_splits:
            buf.append(_encode_key(key))
            codes.append(names.setdefault(split, len(names)))
            if len(buf) >= chunk:
                parts.append(np.array(buf, dtype=bytes))
                buf = []
        if buf:
            parts.append(np.array(buf, dtype=bytes))
        self.num_records = len(codes)
        # splits renumbered in sorted order (what np.unique of the names gives)
        self.split_names: tuple[str, ...] = tuple(sorted(names))
        remap = np.array([self.split_names.index(n) for n in names], dtype=np.uint16)
        self.split_codes = remap[np.frombuffer(codes, dtype=np.uint16)] if len(codes) else np.zeros(0, np.uint16)
        keys = np.concatenate(parts) if parts else np.zeros(0, dtype="S1")
        del parts
        order = np.argsort(keys, kind="stable")  # equal keys stay in record order
        keys = keys[order]
        first = np.ones(len(keys), dtype=bool)
        first[1:] = keys[1:] != keys[:-1]
        self._keys, self._index = keys[first], order[first].astype(np.int64)

    def __len__(self) -> int:
        return self.num_records

    def lookup(self, keys: Iterable[str]) -> np.ndarray:
        """Global record index of each key, int64, -1 where the key is not in the directory."""
        enc = [_encode_key(k) for k in keys]
        out = np.full(len(enc), -1, dtype=np.int64)
        if not enc or not len(self._keys):
            return out
        width = self._keys.dtype.itemsize
        # a key longer than every stored one is absent; b"" matches nothing (stored keys end in 0xFF)
        q = np.array([e if len(e) <= width else b"" for e in enc], dtype=self._keys.dtype)
        pos = np.minimum(np.searchsorted(self._keys, q), len(self._keys) - 1)
        hit = self._keys[pos] == q
        out[hit] = self._index[pos[hit]]
        return out

    def get(self, key: str, default=None):
        gi = int(self.lookup([key])[0])
        return default if gi < 0 else gi

    def in_split(self, name: str) -> np.ndarray:
        """bool [num_records]: which records are in split `name`."""
        if name not in self.split_names:
            return np.zeros(self.num_records, dtype=bool)
        return self.split_codes == self.split_names.index(name)


def _code_lookup(codes_dir: str | Path):
    """(CodeDataset, KeyLookup) of a tokenized directory."""
    from cm3leon.data.codes import CodeDataset

    codes = CodeDataset(codes_dir)
    return codes, KeyLookup(codes.keys_and_splits())


@dataclass(frozen=True)
class EmbedJob:
    """What a process needs to embed units of a dataset (picklable, for worker processes)."""

    data: str
    retriever: str
    emb_dir: str
    split: str | None  # None: every split
    codes: str | None
    batch_size: int
    chunk_size: int
    device: str | None


def embed_unit_file(emb_dir: str | Path, unit: int) -> Path:
    """The marker of a finished unit (its chunks all written)."""
    return Path(emb_dir) / f"unit-{unit:05d}.json"


def _unit_chunk(emb_dir: str | Path, unit: int, chunk: int) -> Path:
    return Path(emb_dir) / f"chunk-{unit:05d}-{chunk:05d}.npy"


def _retriever_digests(retriever_dir: Path) -> dict:
    """SHA-256 of a retriever's config and weights: resumable state records them, since one
    retrained in place embeds differently."""
    return {f.name: file_digest(f) for f in (retriever_dir / "config.json", retriever_dir / "model.safetensors")
            if f.is_file()}


@functools.cache
def _cached_retriever(path: str, device: str | None):
    from cm3leon.retrieval.encoder import load_retriever

    return load_retriever(path, device=device)


@functools.cache
def _cached_key_lookup(codes: str):
    return _code_lookup(codes)[1]


def embed_unit(job: EmbedJob, unit: int, bar=None) -> dict:
    """Embed the records of `job.split` in unit `unit` of the dataset into chunks
    `chunk-UNIT-CHUNK.npy/.jsonl` of `job.chunk_size` documents (batches start afresh in each
    unit, so the vectors do not depend on which process embeds which unit), resuming after the
    unit's last complete chunk, and write its `unit-*.json`; returns that file's contents."""
    from cm3leon.data.readers import open_dataset

    emb_dir = Path(job.emb_dir)
    enc = _cached_retriever(job.retriever, job.device)
    key_lookup = _cached_key_lookup(job.codes) if job.codes is not None else None
    done_chunks = sorted(emb_dir.glob(f"chunk-{unit:05d}-*.npy"))
    if [c.name for c in done_chunks] != [_unit_chunk(emb_dir, unit, i).name for i in range(len(done_chunks))]:
        raise CM3LeonError(f"{emb_dir}: embedding chunks {[c.name for c in done_chunks]} of unit {unit} are not "
                           f"numbered 0, 1, ... (some were deleted); delete {emb_dir} to start over")
    done = sum(load_npy(c, "embedding chunk").shape[0] for c in done_chunks)

    chunk_vecs: list[np.ndarray] = []
    chunk_rows: list[dict] = []
    next_chunk = len(done_chunks)

    def flush_chunk():
        nonlocal next_chunk, chunk_vecs, chunk_rows
        if not chunk_rows:
            return
        name = _unit_chunk(emb_dir, unit, next_chunk)
        with atomic_path(name.with_suffix(".jsonl")) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for r in chunk_rows:
                f.write(json.dumps(r) + "\n")
        with atomic_path(name) as tmp:  # the .npy marks the chunk complete
            np.save(tmp, np.concatenate(chunk_vecs).astype(np.float32))
        next_chunk += 1
        chunk_vecs, chunk_rows = [], []

    batch_t, batch_im, batch_rows = [], [], []

    def flush_batch():
        nonlocal batch_t, batch_im, batch_rows
        if batch_rows:
            chunk_vecs.append(enc.embed_documents(batch_t, batch_im).numpy())
            chunk_rows.extend(batch_rows)
            batch_t, batch_im, batch_rows = [], [], []
        if len(chunk_rows) >= job.chunk_size:
            flush_chunk()

    # the whole unit, also under torchrun (the reader would otherwise take this rank's part of it)
    reader = open_dataset(job.data, size=enc.image_size, split=job.split, units=[unit], rank=0, world_size=1)
    seen = 0
    for n_seen, rec in enumerate(reader):
        seen = n_seen + 1
        if n_seen < done:  # already embedded in an earlier run
            continue
        batch_t.append(rec.text)
        batch_im.append(rec.image)
        batch_rows.append({"key": rec.key, "text": rec.text, "split": rec.split or "train",
                           "code_index": key_lookup.get(rec.key) if key_lookup is not None else None,
                           "sig": document_signature(rec.text, image_digest(rec.image))})
        if len(batch_rows) >= job.batch_size or len(chunk_rows) + len(batch_rows) >= job.chunk_size:
            flush_batch()
        if bar is not None:
            bar.update(1)
    flush_batch()
    flush_chunk()
    if seen < done:
        raise CM3LeonError(f"{job.data}: unit {unit} now has fewer records than {emb_dir} already holds of it "
                           f"({done}); the dataset changed since the interrupted build: delete {emb_dir} to start over")
    info = {"unit": unit, "num_docs": seen, "num_chunks": next_chunk}
    write_json(embed_unit_file(emb_dir, unit), info)
    return info


def _forgets_caches(stage):
    """A stage that loads retrievers, key maps and banks through the caches below (once for all
    the units of one call) forgets them when it returns: a long-lived process (a pipeline) then
    sees a retriever retrained, or a bank rebuilt, at the same path."""
    @functools.wraps(stage)
    def run(*args, **kwargs):
        try:
            return stage(*args, **kwargs)
        finally:
            for cache in (_cached_bank, _cached_retriever, _cached_key_lookup):
                cache.cache_clear()
    return run


@_forgets_caches
def build_index(data: str | Path, retriever: str | Path, out: str | Path, index_type: str = "flat",
                split: str = "train", codes: str | Path | None = None, batch_size: int = 256,
                chunk_size: int = 8192, nlist: int | None = None, pq_m: int | None = None, pq_nbits: int = 8,
                nprobe: int | None = None, refine: int = 16, train_sample: int | None = None,
                device: str | None = None, workers: int = 1) -> dict:
    """Embed `split` of a dataset with a retriever and index the document vectors.

    The dataset is embedded unit by unit (a webdataset's .tar shards; a folder or COCO set is
    one unit), each unit in chunks of `chunk_size` documents in `out/embeddings/`, finished by
    its `unit-*.json`; a rerun with the same arguments skips finished units and resumes a
    started one after its last complete chunk. `workers` processes, or the ranks of torchrun
    (one worker each), take whole units; the merge writes the documents in the dataset's
    order, so the index does not depend on their number. With `codes`, each document records
    its global index in that tokenized directory and its image codes are stored."""
    import torch
    import torch.distributed as dist

    from cm3leon.data.readers import detect_format

    if index_type not in INDEX_TYPES:
        raise CM3LeonError(f"--index-type {index_type!r}: expected one of {INDEX_TYPES}")
    if batch_size < 1 or chunk_size < 1:
        raise CM3LeonError(f"--batch-size and --chunk-size must be >= 1 (got {batch_size}, {chunk_size})")
    rank, world = torchrun()
    check_workers(workers, world)
    out = Path(out)
    retriever_dir = Path(retriever).resolve()
    enc = _cached_retriever(str(retriever_dir), device)
    code_ds = None
    if codes is not None:
        from cm3leon.data.codes import CodeDataset

        code_ds = CodeDataset(codes)
    split_arg = None if split == "all" else split

    emb_dir = out / EMBEDDINGS
    state = {"data": str(Path(data).resolve()), "retriever": str(retriever_dir), "split": split,
             "dim": enc.dim, "image_size": enc.image_size, "chunk_size": chunk_size, "layout": EMBED_LAYOUT,
             "retriever_sha256": _retriever_digests(retriever_dir)}
    check_job(emb_dir / "build.json", state, "build")

    group = barrier_group(world)
    try:
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            (out / "index.json").unlink(missing_ok=True)  # the directory is incomplete until the end
            remove_stale_temporaries(out)  # an output file write cut short by a kill, the old embeddings/
            remove_stale_temporaries(emb_dir)  # ... or a chunk write
            if not (emb_dir / "build.json").is_file():
                shutil.rmtree(emb_dir, ignore_errors=True)
                emb_dir.mkdir(parents=True)
                write_json(emb_dir / "build.json", state)
        if world > 1:
            dist.barrier()
        num_units = len(detect_format(data).units())
        pending = [u for u in range(num_units) if not embed_unit_file(emb_dir, u).is_file()]
        initial = sum(read_json(embed_unit_file(emb_dir, u), "unit marker")["num_docs"]
                      for u in range(num_units) if u not in pending)
        job = EmbedJob(str(data), str(retriever_dir), str(emb_dir), split_arg,
                       None if codes is None else str(codes), batch_size, chunk_size, device)
        with progress(desc=f"embedding {split}", unit="doc", initial=initial) as bar:
            # every worker embeds with this process's torch threads: on a CPU the vectors'
            # last bits depend on the thread count (how a kernel splits a sum), so fewer
            # threads per worker would not write the one-process build's bytes
            run_units(functools.partial(embed_unit, job), pending[rank::world], workers, bar, count="num_docs",
                      threads=torch.get_num_threads())
        if world > 1:
            dist.barrier()
        if rank == 0:
            _merge_index(out, data, retriever_dir, enc, code_ds, codes, split, num_units, index_type,
                         index_params_args=(nlist, pq_m, pq_nbits, nprobe, refine), train_sample=train_sample)
        if world > 1:
            dist.barrier()
    finally:
        if group:
            dist.destroy_process_group()
    return read_json(out / "index.json", "index description")


def _merge_index(out: Path, data, retriever_dir: Path, enc, code_ds, codes, split: str, num_units: int,
                 index_type: str, index_params_args: tuple, train_sample: int | None) -> dict:
    """The finished units' chunks, in unit order (the dataset's record order), streamed into
    vectors.npy / metadata.jsonl / image_codes.npy, then the FAISS index and index.json."""
    emb_dir = out / EMBEDDINGS
    chunks = []
    for u in range(num_units):
        marker = read_json(embed_unit_file(emb_dir, u), "unit marker")
        for c in range(int(marker["num_chunks"])):
            if not _unit_chunk(emb_dir, u, c).is_file():
                raise CM3LeonError(f"{embed_unit_file(emb_dir, u)}: unit {u} has {marker['num_chunks']} chunks but "
                                   f"{_unit_chunk(emb_dir, u, c).name} is missing; delete {emb_dir} to start over")
            chunks.append(_unit_chunk(emb_dir, u, c))
    count = sum(np.load(c, mmap_mode="r").shape[0] for c in chunks)
    if count == 0:
        raise CM3LeonError(f"{data}: no records in split {split!r} to index")
    with atomic_path(out / "vectors.npy") as tmp:
        vecs = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(count, enc.dim))
        s = 0
        for c in chunks:
            a = np.load(c)
            vecs[s:s + len(a)] = a
            s += len(a)
        vecs.flush()
        del vecs
    # each document's code index (-1: none), not its whole row
    code_index = np.full(count, -1, dtype=np.int64) if code_ds is not None else None
    n_rows = 0
    with atomic_path(out / "metadata.jsonl") as tmp, open(tmp, "w", encoding="utf-8") as f:
        for c in chunks:
            with open(c.with_suffix(".jsonl"), encoding="utf-8") as g:
                for line in g:
                    f.write(line)
                    if code_index is not None and n_rows < count:
                        ci = json.loads(line)["code_index"]
                        code_index[n_rows] = -1 if ci is None else ci
                    n_rows += 1
    if n_rows != count:
        raise CM3LeonError(f"{emb_dir}: the chunks hold {count} vectors but {n_rows} metadata rows; "
                           f"delete {emb_dir} to start over")
    missing_codes = 0
    if code_ds is not None:
        with atomic_path(out / "image_codes.npy") as tmp:  # filled on disk: [count, h*w] may not fit in memory
            codes_arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int32,
                                                  shape=(count, code_ds.tokens_per_image))
            for i, ci in enumerate(code_index.tolist()):
                if ci < 0:
                    missing_codes += 1
                else:
                    codes_arr[i] = code_ds.tokens(ci)[1]
            codes_arr.flush()
            del codes_arr
    else:
        (out / "image_codes.npy").unlink(missing_ok=True)

    import faiss

    params = index_params(count, enc.dim, index_type, *index_params_args)
    vecs = np.load(out / "vectors.npy", mmap_mode="r")
    index = make_faiss_index(vecs, index_type, params, train_sample=train_sample)
    with atomic_path(out / "index.faiss") as tmp:
        faiss.write_index(index, str(tmp))
    info = {"format": FORMAT, "dim": enc.dim, "count": count, "index_type": index_type, "params": params,
            "retriever": str(retriever_dir), "retriever_kind": enc.kind, "image_size": enc.image_size,
            "data": str(Path(data).resolve()), "split": split,
            "codes": str(Path(codes).resolve()) if codes is not None else None,
            "documents_without_codes": missing_codes if codes is not None else None}
    write_json(out / "index.json", info)
    # whole or gone: a kill inside a plain rmtree would leave chunks with gaps that a rerun
    # would take for a prefix of the documents
    remove_tree(emb_dir)
    return info


# ---------------------------------------------------------------------------- neighbours

NEIGHBOR_PARTS = "neighbors.parts"  # in the codes directory while `index neighbors` runs
NEIGHBOR_LAYOUT = "unit-UNIT.npz"  # recorded in neighbors.parts/job.json: another layout is not resumed
SKIP_REASONS = ("self", "threshold", "duplicate", "ineligible")  # select_documents' reasons, in summary order


@dataclass(frozen=True)
class NeighborsJob:
    """What a process needs to retrieve neighbours for units of a dataset (picklable, for
    worker processes)."""

    index: str
    codes: str
    data: str
    retriever: str
    parts: str
    policy: RetrievalPolicy
    seed: int
    batch_size: int
    device: str | None
    faiss_threads: int  # the main process's FAISS OpenMP threads, kept by every worker


def neighbors_part(parts: str | Path, unit: int) -> Path:
    """A finished unit's queries: `records` int64 [n] (global record indices, in the unit's
    order), `neighbors` int64 [n, k], `skipped` int32 [n, len(SKIP_REASONS)], `not_in_codes`."""
    return Path(parts) / f"unit-{unit:05d}.npz"


@functools.cache
def _cached_bank(path: str) -> MemoryBank:
    return MemoryBank.load(path)


def neighbors_unit(job: NeighborsJob, unit: int, bar=None) -> dict:
    """Retrieve `job.policy.num_docs` documents for every record of unit `unit` of the dataset
    that is in the codes, in batches of `job.batch_size` that start afresh in the unit (so the
    result does not depend on which process takes which unit), and write its part file in one
    atomic step; returns {"unit", "num_queries"}."""
    import faiss

    from cm3leon.data.readers import open_dataset

    faiss.omp_set_num_threads(job.faiss_threads)
    bank = _cached_bank(job.index)
    enc = _cached_retriever(job.retriever, job.device)
    key_lookup = _cached_key_lookup(job.codes)
    code_train = key_lookup.in_split("train")
    # each bank document's global record index; -1: not a usable neighbour (not a train record of the codes)
    doc_record = load_npy(Path(job.parts) / "documents.npy", "bank documents' record indices")
    k = job.policy.num_docs

    def doc_info(i: int):
        key, sig, _ = bank.doc_info(i)
        return key, sig, bool(doc_record[i] >= 0)

    # per batch (empty first pieces: a unit may have no record in the codes)
    records = [np.zeros(0, np.int64)]
    neighbors = [np.zeros((0, k), np.int64)]
    skipped = [np.zeros((0, len(SKIP_REASONS)), np.int32)]

    def run(batch: list[tuple[int, Query]]) -> None:
        rngs = [np.random.default_rng([job.seed, gi]) for gi, _ in batch]  # per record: batching changes nothing
        nb = np.full((len(batch), k), -1, dtype=np.int64)
        sk = np.zeros((len(batch), len(SKIP_REASONS)), dtype=np.int32)
        hits = search_candidates(enc, bank, [q for _, q in batch], job.policy, rngs)
        for row, ((_, q), (ids, scores)) in enumerate(zip(batch, hits)):
            chosen, why = select_documents(ids, scores, doc_info, job.policy, query_key=q.key,
                                           query_signature=q.signature)
            sk[row] = [why[r] for r in SKIP_REASONS]
            nb[row, :len(chosen)] = doc_record[[d for d, _ in chosen]]
        records.append(np.array([gi for gi, _ in batch], dtype=np.int64))
        neighbors.append(nb)
        skipped.append(sk)
        if bar is not None:
            bar.update(len(batch))

    # the whole unit, also under torchrun (the reader would otherwise take this rank's part of it)
    reader = open_dataset(job.data, size=enc.image_size, units=[unit], rank=0, world_size=1)
    not_in_codes = 0
    pending: list[tuple[int, Query]] = []
    for rec in reader:
        gi = key_lookup.get(rec.key)
        if gi is None:
            not_in_codes += 1
            continue
        pending.append((gi, Query(text=rec.text, image=rec.image, key=rec.key,
                                  signature=document_signature(rec.text, image_digest(rec.image)),
                                  training=bool(code_train[gi]))))
        if len(pending) >= job.batch_size:
            run(pending)
            pending = []
    if pending:
        run(pending)
    records = np.concatenate(records)
    with atomic_path(neighbors_part(job.parts, unit)) as tmp, open(tmp, "wb") as f:
        np.savez(f, records=records, neighbors=np.concatenate(neighbors), skipped=np.concatenate(skipped),
                 not_in_codes=np.int64(not_in_codes))
    return {"unit": unit, "num_queries": len(records)}


def load_neighbors_part(parts: Path, unit: int) -> dict:
    """A finished unit's part file (see `neighbors_part`); an unreadable one is a CM3LeonError."""
    path = neighbors_part(parts, unit)
    try:
        with np.load(path, allow_pickle=False) as z:
            return {name: z[name] for name in ("records", "neighbors", "skipped", "not_in_codes")}
    except (ValueError, OSError, EOFError, KeyError) as e:
        raise CM3LeonError(f"{path}: unreadable neighbours part ({str(e)[:120]}); delete {parts} to start over") from None


@_forgets_caches
def compute_neighbors(index_dir: str | Path, codes_dir: str | Path, k: int = 2, seed: int = 0,
                      policy: RetrievalPolicy | None = None, data: str | Path | None = None,
                      retriever: str | Path | None = None, batch_size: int = 256, device: str | None = None,
                      workers: int = 1) -> dict:
    """Retrieve k documents for every record of a tokenized dataset, once, and write
    `codes_dir/neighbors.npy` (int64 [num_records, k], global record indices, -1 = none) and
    `codes_dir/neighbors.json` (policy and counts).

    Only records of the codes' train split that are in the bank can be neighbours; every
    record of every split is a query (query dropout only on train records, seeded by
    (seed, record index) so the file does not depend on batching). A record whose key occurs
    more than once is queried at its first occurrence.

    The dataset is searched unit by unit (a webdataset's .tar shards; a folder or COCO set is
    one unit), each unit's result written in one step to `codes_dir/neighbors.parts/`; a rerun
    with the same arguments skips finished units. `workers` processes, or the ranks of
    torchrun (one worker each), take whole units; the merge reads them in the dataset's order,
    so the files do not depend on their number. Each process loads the bank (a flat index is
    held in memory: dim * 4 bytes a document)."""
    import faiss
    import torch
    import torch.distributed as dist

    from cm3leon.data.readers import detect_format

    if batch_size < 1:
        raise CM3LeonError(f"batch_size must be >= 1 (got {batch_size})")
    rank, world = torchrun()
    check_workers(workers, world)
    index_dir, codes_dir = Path(index_dir), Path(codes_dir)
    bank = _cached_bank(str(index_dir))
    retriever_dir = Path(retriever) if retriever else bank.retriever_path
    if retriever_dir is None:
        raise CM3LeonError(f"{index_dir / 'index.json'} records no retriever; pass --retriever DIR")
    enc = _cached_retriever(str(retriever_dir), device)
    bank.check_retriever(enc)
    policy = (policy or RetrievalPolicy()).with_(num_docs=int(k))
    data = data or bank.info.get("data")
    if not data or not Path(data).exists():
        raise CM3LeonError(f"dataset {data!r} recorded in {index_dir / 'index.json'} not found; pass --data DIR")
    key_lookup = _cached_key_lookup(str(codes_dir))
    parts = codes_dir / NEIGHBOR_PARTS
    state = {"index": str(index_dir.resolve()), "index_sha256": file_digest(index_dir / "index.json"),
             "codes_sha256": file_digest(codes_dir / "meta.json"), "data": str(Path(data).resolve()),
             "retriever": str(retriever_dir.resolve()), "retriever_sha256": _retriever_digests(retriever_dir),
             "seed": seed, "policy": policy.to_dict(), "batch_size": batch_size, "layout": NEIGHBOR_LAYOUT}
    check_job(parts / "job.json", state, "run")
    group = barrier_group(world)
    try:
        if rank == 0:
            remove_stale_temporaries(codes_dir)  # an output write or a removal of the parts cut short
            remove_stale_temporaries(parts)  # ... or a part write
            if not (parts / "job.json").is_file():
                shutil.rmtree(parts, ignore_errors=True)
                parts.mkdir()
                with atomic_path(parts / "documents.npy") as tmp:
                    np.save(tmp, _document_records(bank, key_lookup))
                write_json(parts / "job.json", state)  # last: the folder is ready
        if world > 1:
            dist.barrier()
        num_units = len(detect_format(data).units())
        pending = [u for u in range(num_units) if not neighbors_part(parts, u).is_file()]
        initial = sum(len(load_neighbors_part(parts, u)["records"]) for u in range(num_units) if u not in pending)
        job = NeighborsJob(str(index_dir), str(codes_dir), str(data), str(retriever_dir), str(parts), policy,
                           seed, batch_size, device, faiss.omp_get_max_threads())
        with progress(total=key_lookup.num_records, desc="neighbours", unit="rec", initial=initial) as bar:
            # every worker keeps this process's torch threads: the query vectors' last bits
            # on a CPU depend on the thread count
            run_units(functools.partial(neighbors_unit, job), pending[rank::world], workers, bar,
                      count="num_queries", threads=torch.get_num_threads())
        if world > 1:
            dist.barrier()
        if rank == 0:
            _merge_neighbors(job, num_units, key_lookup, len(bank))
        if world > 1:
            dist.barrier()
    finally:
        if group:
            dist.destroy_process_group()
    return read_json(codes_dir / "neighbors.json", "neighbours summary")


def _document_records(bank: MemoryBank, key_lookup: KeyLookup) -> np.ndarray:
    """Each bank document's global record index in the codes, -1 where it cannot be a
    neighbour: not in the codes, or not a train record of both the bank and the codes."""
    doc_record = np.full(len(bank), -1, dtype=np.int64)
    code_train = key_lookup.in_split("train")
    for start, rows in bank.metadata.batches():
        gi = key_lookup.lookup([r["key"] for r in rows])
        bank_train = np.array([r.get("split", "train") == "train" for r in rows], dtype=bool)
        ok = (gi >= 0) & bank_train & code_train[np.maximum(gi, 0)]
        doc_record[start:start + len(rows)] = np.where(ok, gi, -1)
    return doc_record


def _merge_neighbors(job: NeighborsJob, num_units: int, key_lookup: KeyLookup, bank_documents: int) -> dict:
    """The finished units' parts, in unit order (the dataset's record order; a record queried
    twice keeps its first result), into neighbors.npy and neighbors.json; the parts are then
    removed."""
    parts, codes_dir, policy = Path(job.parts), Path(job.codes), job.policy
    num_records = key_lookup.num_records
    neighbors = np.full((num_records, policy.num_docs), -1, dtype=np.int64)
    found = np.zeros(num_records, dtype=bool)
    skipped = np.zeros(len(SKIP_REASONS), dtype=np.int64)
    not_in_codes = 0
    for u in range(num_units):
        part = load_neighbors_part(parts, u)
        records = part["records"]
        first = np.zeros(len(records), dtype=bool)
        first[np.unique(records, return_index=True)[1]] = True  # a key twice in the unit
        keep = first & ~found[records]  # ... or in an earlier unit
        neighbors[records[keep]] = part["neighbors"][keep]
        skipped += part["skipped"][keep].sum(0)
        found[records[keep]] = True
        not_in_codes += int(part["not_in_codes"])
    doc_record = load_npy(parts / "documents.npy", "bank documents' record indices")
    counts = (neighbors >= 0).sum(1)
    summary = {
        "format": NEIGHBORS_FORMAT, "k": policy.num_docs, "seed": job.seed, "policy": policy.to_dict(),
        "index": str(Path(job.index).resolve()), "retriever": str(Path(job.retriever).resolve()),
        "data": job.data, "num_records": num_records,
        "rows_with_k": int((counts == policy.num_docs).sum()),
        "rows_by_count": {str(c): int((counts == c).sum()) for c in range(policy.num_docs + 1)},
        "rows_with_k_by_split": {s: int(((counts == policy.num_docs) & key_lookup.in_split(s)).sum())
                                 for s in key_lookup.split_names},
        "skipped": {r: int(c) for r, c in zip(SKIP_REASONS, skipped)},
        "bank_documents": bank_documents, "bank_documents_usable": int((doc_record >= 0).sum()),
        "records_without_query": int((~found).sum()),  # in the codes but not found in the dataset
        "dataset_records_not_in_codes": not_in_codes,
    }
    del doc_record
    with atomic_path(codes_dir / "neighbors.npy") as tmp:
        np.save(tmp, neighbors)
    write_json(codes_dir / "neighbors.json", summary)
    # whole or gone: a kill inside a plain rmtree would leave a folder with parts missing
    remove_tree(parts)
    return summary
