"""Training sequences: retrieval-augmented documents (`cm3leon.layout.documents`), CM3, and
packing into blocks.

A document holds k retrieved documents before the query pair; `order="image_first"` swaps
text and image in every pair (image -> text direction). Documents are CM3-transformed and packed greedily
into blocks of `seq_len` tokens; a document is never split across blocks, the rest of a
block is `<pad>` with target -100. When a document does not fit a block, its least relevant
retrieved documents are dropped (last neighbour first) until it fits; a document that does
not fit even with none is skipped and counted (`PackedStream.skipped`).

Streams are `IterableDataset`s, infinite by default (epoch after epoch, a new order each),
deterministic by (seed, epoch), and sharded without overlap across ranks × DataLoader
workers. Each block carries its stream position so training can checkpoint and resume
exactly where it was (`BlockStream.resume`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from cm3leon.data.codes import CodeDataset
from cm3leon.errors import CM3LeonError
from cm3leon.layout.documents import ORDERS, QUERY_PAIR_SEGMENTS, build_document
from cm3leon.objectives.cm3 import IGNORE_INDEX, CM3Config, CM3Example, cm3_transform
from cm3leon.tokenizers.vocab import Vocab
from cm3leon.utils.io import load_npy

NEIGHBORS_FILE = "neighbors.npy"


def query_pair_cm3() -> CM3Config:
    """CM3 settings that score only the query pair, unmasked: the loss is taken on the same
    tokens (the query's text and image given what precedes them) whatever the number of
    retrieved documents, so runs with k = 2 and k = 0 compare fairly."""
    return CM3Config(poisson_lambda=0.0, min_spans=0, max_spans=0, loss_on=list(QUERY_PAIR_SEGMENTS))


def vocab_for_codes(codes: CodeDataset | str | Path, num_sentinels: int | None = None) -> Vocab:
    """The unified vocabulary of a tokenized directory: its `vocab.json` when present, else
    the sizes in `meta.json` (text_vocab_size, codebook_size, num_sentinels or 16)."""
    codes = codes if isinstance(codes, CodeDataset) else CodeDataset(codes)
    if (codes.path / "vocab.json").is_file():
        vocab = Vocab.load(codes.path / "vocab.json")
        if num_sentinels is not None and num_sentinels != vocab.num_sentinels:
            raise CM3LeonError(f"{codes.path / 'vocab.json'} has {vocab.num_sentinels} sentinels, asked for {num_sentinels}")
        return vocab
    m = codes.meta
    return Vocab(int(m["text_vocab_size"]), int(m["codebook_size"]),
                 int(num_sentinels or m.get("num_sentinels", 16)))


def load_neighbors(codes: CodeDataset, num_retrieved: int, path: str | Path | None = None) -> np.ndarray | None:
    """`neighbors.npy` of a tokenized directory: int64 [num_records, K] global record
    indices, -1 = none. None when `num_retrieved` is 0."""
    if num_retrieved <= 0:
        return None
    path = Path(path) if path is not None else codes.path / NEIGHBORS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: num_retrieved={num_retrieved} needs the retrieval stage's neighbours "
            f"(run `cm3leon retrieval`), or use num_retrieved=0")
    nb = load_npy(path, "retrieval neighbours")
    total = int(codes.meta["num_records"])
    if nb.ndim != 2 or nb.shape[0] != total:
        raise CM3LeonError(f"{path}: shape {nb.shape}, expected [{total}, K] (one row per record)")
    if num_retrieved > nb.shape[1]:
        raise CM3LeonError(f"num_retrieved={num_retrieved} but {path} holds only {nb.shape[1]} neighbours per record")
    return nb


class BlockStream(IterableDataset):
    """A resumable, sharded stream of fixed-length (tokens, targets) blocks.

    Yields `(tokens int64 [L], targets int64 [L], position int64 [3])`, position =
    (logical worker, epoch, cursor after this block). The trainer keeps the last position
    of each logical worker and the number of batches consumed; `resume(state)` makes the
    next iteration continue exactly there, in the same order, with any DataLoader worker
    count equal to the one saved. Subclasses implement `_blocks`."""

    def __init__(self, seed: int = 0, epochs: int | None = None):
        super().__init__()
        self.seed = int(seed)
        self.epochs = epochs  # None: infinite; validation uses 1
        self.rank, self.world = 0, 1
        self._resume: dict | None = None

    def set_shard(self, rank: int, world: int) -> None:
        """This process's rank among `world` data-parallel ranks (set before iterating)."""
        self.rank, self.world = int(rank), int(world)

    def resume(self, state: dict | None) -> None:
        """Continue after `state` = {"batches": batches consumed, "num_workers": N,
        "positions": {logical worker: [epoch, cursor]}} (as kept by the trainer)."""
        self._resume = state

    def _blocks(self, shard: int, num_shards: int, epoch: int, cursor: int) -> Iterator[tuple]:
        """Yield (tokens, targets, epoch, cursor_after) from (epoch, cursor) on."""
        raise NotImplementedError

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rotation, positions = 0, {}
        if self._resume:
            saved = int(self._resume.get("num_workers", 1))
            if saved != num_workers:
                raise CM3LeonError(
                    f"resuming a data stream saved with {saved} DataLoader workers under {num_workers}; "
                    "use the same num_workers")
            # The DataLoader takes batches from workers round-robin starting at worker 0;
            # rotating the logical ids makes the resumed order continue the saved one.
            rotation = int(self._resume.get("batches", 0)) % num_workers
            positions = {int(k): v for k, v in self._resume.get("positions", {}).items()}
        logical = (worker + rotation) % num_workers
        epoch, cursor = positions.get(logical, (0, 0))
        shard, num_shards = self.rank * num_workers + logical, self.world * num_workers
        for tokens, targets, ep, cur, *pos in self._blocks(shard, num_shards, int(epoch), int(cursor)):
            yield (torch.from_numpy(tokens), torch.from_numpy(targets),
                   torch.tensor([logical, ep, cur], dtype=torch.int64), *(torch.from_numpy(p) for p in pos))


class MapBlockStream(BlockStream):
    """Any map-style dataset of (tokens, targets) blocks as a resumable, sharded stream
    (a new permutation each epoch when `shuffle`)."""

    def __init__(self, dataset, seed: int = 0, shuffle: bool = True, epochs: int | None = None):
        super().__init__(seed, epochs)
        self.dataset, self.shuffle = dataset, shuffle

    def _blocks(self, shard, num_shards, epoch, cursor):
        n = len(self.dataset)
        if n < num_shards:
            raise CM3LeonError(f"dataset has {n} blocks, fewer than the {num_shards} data shards (ranks x workers)")
        while self.epochs is None or epoch < self.epochs:
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            mine = order[shard::num_shards]
            for i in range(cursor, len(mine)):
                item = self.dataset[int(mine[i])]
                tokens, targets = (item["tokens"], item["targets"]) if isinstance(item, dict) else item[:2]
                yield (np.asarray(tokens, dtype=np.int64), np.asarray(targets, dtype=np.int64),
                       epoch, i + 1)
            epoch, cursor = epoch + 1, 0


class PackedStream(BlockStream):
    """Greedy packing of variable-length examples into `seq_len` blocks, never splitting one.

    Subclasses give `num_items` and `example(item, epoch)` (a `CM3Example`, or None to
    skip). Items are visited in a per-epoch permutation, strided across shards."""

    def __init__(self, seq_len: int, pad_id: int, seed: int = 0, shuffle: bool = True,
                 epochs: int | None = None):
        super().__init__(seed, epochs)
        if seq_len < 2:
            raise CM3LeonError(f"seq_len must be >= 2, got {seq_len}")
        self.seq_len, self.pad_id, self.shuffle = int(seq_len), int(pad_id), shuffle
        self.skipped = 0  # examples too long for a block (counted in this process only)
        self.position_config = None  # set_positions: blocks also carry position ids

    def set_positions(self, model_config) -> None:
        """Make every block carry the position ids of its documents (each from 0, in the
        model's scheme: `cm3leon.model.positions`) as a 4th array, so that the trainer can
        keep packed documents apart. An example whose positions would pass the model's
        context is skipped like one too long for a block."""
        self.position_config = model_config

    @property
    def num_items(self) -> int:
        raise NotImplementedError

    def example(self, item: int, epoch: int) -> CM3Example | None:
        raise NotImplementedError

    def _skip(self, item: int) -> None:
        self.skipped += 1
        if self.skipped == 1:
            warnings.warn(f"item {item} does not fit a {self.seq_len}-token block and is skipped "
                          "(further skips are only counted)", stacklevel=2)

    def _blocks(self, shard, num_shards, epoch, cursor):
        n, L = self.num_items, self.seq_len
        if n < num_shards:
            raise CM3LeonError(f"{n} items, fewer than the {num_shards} data shards (ranks x workers)")
        while self.epochs is None or epoch < self.epochs:
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            mine = order[shard::num_shards]
            tokens, targets, positions, used, emitted = [], [], [], 0, 0
            for i in range(cursor, len(mine)):
                ex = self.example(int(mine[i]), epoch)
                if ex is None:
                    continue
                pos = self._positions(ex)
                if pos is not None and pos[-1] >= self.position_config.max_seq_len:
                    self._skip(int(mine[i]))
                    continue
                if used + len(ex) > L:
                    # Block full: its position says "resume at item i" (re-made deterministically).
                    yield self._block(tokens, targets, positions, used, epoch, i)
                    tokens, targets, positions, used = [], [], [], 0
                    emitted += 1
                tokens.append(ex.tokens)
                targets.append(ex.targets)
                positions.append(pos)
                used += len(ex)
            if used:
                yield self._block(tokens, targets, positions, used, epoch + 1, 0)
                emitted += 1
            if not emitted and cursor == 0:
                raise CM3LeonError(f"no item of shard {shard} fits a {L}-token block; raise seq_len")
            epoch, cursor = epoch + 1, 0

    def _positions(self, ex: CM3Example) -> np.ndarray | None:
        if self.position_config is None:
            return None
        from cm3leon.model.positions import document_positions

        return document_positions(ex.tokens, self.position_config).numpy()

    def _block(self, tokens: list, targets: list, positions: list, used: int, epoch: int, cursor: int) -> tuple:
        """(tokens, targets, epoch, cursor[, positions]) of one block, padded to seq_len;
        padding gets position 0 (each pad its own document)."""
        rest = self.seq_len - used
        tok = np.concatenate(tokens + [np.full(rest, self.pad_id, np.int64)])
        tgt = np.concatenate(targets + [np.full(rest, IGNORE_INDEX, np.int64)])
        if self.position_config is None:
            return tok, tgt, epoch, cursor
        return tok, tgt, epoch, cursor, np.concatenate(positions + [np.zeros(rest, np.int64)])


class CM3PretrainStream(PackedStream):
    """Pretraining blocks from code shards: each record with its `num_retrieved` neighbours
    (`neighbors.npy`), in text-first / image-first / random order, CM3-transformed, packed.
    With `retrieval_dropout` p, a record goes without its retrieved documents with probability
    p (the query pair alone), so the model also learns to draw and describe from the query alone.

    Every random choice for a record comes from a generator seeded by (seed, epoch, record),
    so a block is the same whatever the sharding, and resuming re-makes it exactly."""

    def __init__(self, codes: CodeDataset | str | Path, split: str = "train", seq_len: int = 512,
                 num_retrieved: int = 0, order: str = "text_first", image_first_prob: float = 0.5,
                 cm3: CM3Config | None = None, vocab: Vocab | None = None, seed: int = 0,
                 shuffle: bool = True, epochs: int | None = None, neighbors: str | Path | None = None,
                 max_items: int | None = None, retrieval_dropout: float = 0.0):
        self.codes = codes if isinstance(codes, CodeDataset) and codes.split == split else CodeDataset(
            codes.path if isinstance(codes, CodeDataset) else codes, split=split)
        self.vocab = vocab or vocab_for_codes(self.codes)
        super().__init__(seq_len, self.vocab.pad_id, seed, shuffle, epochs)
        if order not in ORDERS:
            raise CM3LeonError(f"order must be one of {ORDERS}, got {order!r}")
        if not 0.0 <= image_first_prob <= 1.0:
            raise CM3LeonError(f"image_first_prob must be in [0, 1], got {image_first_prob}")
        if len(self.codes) == 0:
            raise CM3LeonError(f"{self.codes.path}: the {split!r} split has no records")
        self.order, self.image_first_prob = order, float(image_first_prob)
        self.num_retrieved = int(num_retrieved)
        if not 0.0 <= retrieval_dropout <= 1.0:
            raise CM3LeonError(f"retrieval_dropout must be in [0, 1], got {retrieval_dropout}")
        self.retrieval_dropout = float(retrieval_dropout)
        self.cm3 = cm3 or CM3Config()
        self.neighbors = load_neighbors(self.codes, self.num_retrieved, neighbors)
        if max_items is not None and max_items < 1:
            raise CM3LeonError(f"max_items must be >= 1 or None, got {max_items}")
        self.max_items = max_items  # only the split's first records (a fixed evaluation set)

    @property
    def num_items(self) -> int:
        return len(self.codes) if self.max_items is None else min(len(self.codes), self.max_items)

    def retrieved_indices(self, gi: int) -> list[int]:
        """The first `num_retrieved` valid neighbours of record `gi` (global indices)."""
        if self.neighbors is None:
            return []
        row = [int(j) for j in self.neighbors[gi] if j >= 0 and j != gi]
        return row[: self.num_retrieved]

    def document(self, gi: int, order: str, num_retrieved: int | None = None) -> np.ndarray:
        text_ids, codes = self.codes.tokens(gi)
        retrieved = [self.codes.tokens(j) for j in self.retrieved_indices(gi)[:num_retrieved]]
        return build_document(text_ids, codes, self.vocab, retrieved, order)

    def example(self, item: int, epoch: int) -> CM3Example | None:
        gi = int(self.codes.indices[item])
        rng = np.random.default_rng([self.seed, epoch, gi])
        order = self.order
        if order == "random":
            order = "image_first" if rng.random() < self.image_first_prob else "text_first"
        k_max = len(self.retrieved_indices(gi))
        if self.retrieval_dropout > 0 and rng.random() < self.retrieval_dropout:
            k_max = 0
        for k in range(k_max, -1, -1):  # drop the least relevant first
            doc = self.document(gi, order, k)
            if len(doc) > self.seq_len:
                continue  # CM3 only lengthens a document
            ex = cm3_transform(doc, self.vocab, np.random.default_rng([self.seed, epoch, gi, k]), self.cm3)
            if len(ex) <= self.seq_len:
                return ex
        self._skip(gi)
        return None
