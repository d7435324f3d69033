"""Document layout, packing into blocks, sharding and exact resume of the pretraining stream."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from cm3leon.data.codes import CodeShardWriter
from cm3leon.objectives.sequences import (CM3PretrainStream, PackedStream, build_document, query_pair_cm3,
                                    vocab_for_codes)
from cm3leon.errors import CM3LeonError
from cm3leon.objectives.cm3 import IGNORE_INDEX, CM3Config, CM3Example, invert_cm3
from cm3leon.tokenizers.vocab import Vocab

GRID, CODEBOOK, TEXT_VOCAB = (4, 4), 32, 40


def make_codes(root: Path, n: int = 60, neighbors: int = 3, seed: int = 0) -> Path:
    """Code shards of random records (every 10th in val) + a neighbors.npy, plus stand-in
    tokenizer folders named in meta.json."""
    rng = np.random.default_rng(seed)
    for name in ("text_tokenizer", "image_tokenizer"):
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "config.json").write_text('{"stand_in": true}')
    w = CodeShardWriter(root / "codes", grid=GRID, codebook_size=CODEBOOK, text_vocab_size=TEXT_VOCAB,
                        shard_size=25, extra_meta={"text_tokenizer": str(root / "text_tokenizer"),
                                                   "image_tokenizer": str(root / "image_tokenizer")})
    for i in range(n):
        text = rng.integers(0, TEXT_VOCAB, size=int(rng.integers(3, 8)))
        codes = (np.arange(16) * (1 + text[0] % 3) + text[0]) % CODEBOOK  # learnable from the caption
        w.add(f"r{i}", "val" if i % 10 == 0 else "train", "caption", text, codes)
    w.close()
    if neighbors:
        nb = np.stack([(np.arange(n) + j) % n for j in range(1, neighbors + 1)], 1).astype(np.int64)
        nb[::7, -1] = -1  # some records have fewer neighbours
        np.save(root / "codes" / "neighbors.npy", nb)
    return root / "codes"


VOCAB = Vocab(TEXT_VOCAB, CODEBOOK, num_sentinels=16)


def test_build_document_without_retrieval_layout():
    doc = build_document([5, 6, 7], np.arange(4).reshape(2, 2), VOCAB)
    t, i = VOCAB.text_offset, VOCAB.image_offset
    assert doc.tolist() == [1, t + 5, t + 6, t + 7, 2, i, i + 1, i + 2, i + 3, 1]


def test_build_document_with_two_retrieved_text_first_and_image_first():
    t, i = VOCAB.text_offset, VOCAB.image_offset
    retrieved = [([1], [10, 11]), ([2, 3], [12])]
    doc = build_document([4], [13], VOCAB, retrieved)
    assert doc.tolist() == [1, t + 1, 2, i + 10, i + 11, 2, t + 2, t + 3, 2, i + 12, 2, t + 4, 2, i + 13, 1]
    assert np.flatnonzero(doc == VOCAB.eos_id).tolist() == [0, len(doc) - 1]
    doc = build_document([4], [13], VOCAB, retrieved, order="image_first")
    assert doc.tolist() == [1, i + 10, i + 11, 2, t + 1, 2, i + 12, 2, t + 2, t + 3, 2, i + 13, 2, t + 4, 1]


def test_build_document_rejects_unknown_order_and_bad_ids():
    with pytest.raises(CM3LeonError, match="order"):
        build_document([1], [1], VOCAB, order="sideways")
    with pytest.raises(CM3LeonError, match="image code out of range"):
        build_document([1], [CODEBOOK], VOCAB)


def test_vocab_for_codes_reads_the_sizes_of_meta(tmp_path):
    v = vocab_for_codes(make_codes(tmp_path, neighbors=0))
    assert (v.text_vocab_size, v.image_vocab_size) == (TEXT_VOCAB, CODEBOOK)


def _walk(stream: CM3PretrainStream, n_blocks: int, shard: int = 0, num_shards: int = 1):
    return [b for b, _ in zip(stream._blocks(shard, num_shards, 0, 0), range(n_blocks))]


@pytest.mark.parametrize("order", ["text_first", "image_first"])
def test_packing_never_splits_a_document_and_blocks_have_seq_len(tmp_path, order):
    codes = make_codes(tmp_path)
    stream = CM3PretrainStream(codes, seq_len=128, num_retrieved=2, order=order,
                               cm3=CM3Config(poisson_lambda=1.0), epochs=1)
    order_items = np.random.default_rng([0, 0]).permutation(stream.num_items)
    examples = [e for e in (stream.example(int(k), 0) for k in order_items) if e is not None]
    blocks = list(stream._blocks(0, 1, 0, 0))
    assert len(blocks) > 5
    k = 0
    for tokens, targets, _, _ in blocks:
        assert tokens.shape == targets.shape == (128,)
        used = 0
        while k < len(examples) and used + len(examples[k]) <= 128:  # greedy packing, whole documents
            ex = examples[k]
            np.testing.assert_array_equal(tokens[used:used + len(ex)], ex.tokens)
            np.testing.assert_array_equal(targets[used:used + len(ex)], ex.targets)
            used += len(ex)
            k += 1
        assert (tokens[used:] == VOCAB.pad_id).all() and (targets[used:] == IGNORE_INDEX).all()
        assert used > 0
    assert k == len(examples)  # every document landed in exactly one block
    first = invert_cm3(examples[0], VOCAB)
    segments = VOCAB.segments(first)
    kinds = [kind for kind, _ in segments if kind != "special"]
    assert kinds[:2] == (["text", "image"] if order == "text_first" else ["image", "text"])


def test_documents_include_neighbours_and_drop_the_least_relevant_when_too_long(tmp_path):
    codes = make_codes(tmp_path)
    lam0 = CM3Config(poisson_lambda=0.0)
    roomy = CM3PretrainStream(codes, seq_len=128, num_retrieved=2, cm3=lam0)
    gi = int(roomy.codes.indices[1])
    ex = roomy.example(1, 0)
    nbrs = roomy.retrieved_indices(gi)
    assert len(nbrs) == 2
    expected = build_document(roomy.codes.get(gi).text_ids, roomy.codes.get(gi).image_codes, VOCAB,
                              [(roomy.codes.get(j).text_ids, roomy.codes.get(j).image_codes) for j in nbrs])
    np.testing.assert_array_equal(ex.tokens, expected)
    # A block too short for 3 pairs keeps the query and the first neighbour only.
    tight = CM3PretrainStream(codes, seq_len=len(expected) - 1, num_retrieved=2, cm3=lam0)
    ex = tight.example(1, 0)
    np.testing.assert_array_equal(ex.tokens, tight.document(gi, "text_first", 1))
    # A block shorter than the bare query skips it and counts it.
    tiny = CM3PretrainStream(codes, seq_len=8, num_retrieved=2, cm3=lam0)
    with pytest.warns(UserWarning, match="does not fit"):
        assert tiny.example(1, 0) is None
    assert tiny.skipped == 1


def test_retrieval_dropout_shows_that_share_of_records_without_their_documents(tmp_path):
    codes = make_codes(tmp_path, n=200)
    lam0 = CM3Config(poisson_lambda=0.0)
    full = CM3PretrainStream(codes, seq_len=128, num_retrieved=2, cm3=lam0)
    half = CM3PretrainStream(codes, seq_len=128, num_retrieved=2, cm3=lam0, retrieval_dropout=0.5)
    none = CM3PretrainStream(codes, seq_len=128, num_retrieved=2, cm3=lam0, retrieval_dropout=1.0)
    dropped = 0
    for item in range(half.num_items):
        gi = int(half.codes.indices[item])
        bare = half.document(gi, "text_first", 0)
        ex = half.example(item, 0)
        if len(ex.tokens) == len(bare):
            np.testing.assert_array_equal(ex.tokens, bare)  # the query pair alone
            dropped += 1
        else:  # kept: exactly the documents of the stream without dropout
            np.testing.assert_array_equal(ex.tokens, full.example(item, 0).tokens)
        np.testing.assert_array_equal(none.example(item, 0).tokens, bare)
    assert 0.35 < dropped / half.num_items < 0.65
    # Seeded per (seed, epoch, record): the same records are dropped on every pass.
    again = CM3PretrainStream(codes, seq_len=128, num_retrieved=2, cm3=lam0, retrieval_dropout=0.5)
    assert all(np.array_equal(again.example(i, 0).tokens, half.example(i, 0).tokens) for i in range(40))
    with pytest.raises(CM3LeonError, match="retrieval_dropout"):
        CM3PretrainStream(codes, seq_len=128, num_retrieved=2, retrieval_dropout=1.5)


def test_random_order_mixes_both_directions(tmp_path):
    stream = CM3PretrainStream(make_codes(tmp_path, neighbors=0), seq_len=128, order="random",
                               image_first_prob=0.5, cm3=CM3Config(poisson_lambda=0.0))
    firsts = {VOCAB.segments(stream.example(i, 0).tokens)[1][0] for i in range(20)}
    assert firsts == {"text", "image"}


@pytest.mark.parametrize("order", ["text_first", "image_first"])
def test_query_pair_stream_scores_the_same_tokens_at_any_num_retrieved(tmp_path, order):
    """val_query_loss compares k = 2 and k = 0 fairly: the same records, the same scored tokens
    (the query's text, image and their delimiters), never a retrieved document's."""
    codes = make_codes(tmp_path)
    scored = {}
    for k in (0, 2):
        stream = CM3PretrainStream(codes, "val", seq_len=128, num_retrieved=k, order=order, cm3=query_pair_cm3(),
                                   shuffle=False, epochs=1, max_items=4)
        assert stream.num_items == 4 < len(stream.codes)
        per_doc = []
        for i in range(stream.num_items):
            ex = stream.example(i, 0)
            gi = int(stream.codes.indices[i])
            text, image = stream.codes.tokens(gi)
            assert not VOCAB.is_mask(ex.tokens).any()  # unmasked: no CM3 span moved away
            got = ex.targets[ex.targets != IGNORE_INDEX]
            first, second = (VOCAB.text_to_ids(text), VOCAB.image_to_ids(image))[:: 1 if order == "text_first" else -1]
            np.testing.assert_array_equal(got, np.concatenate([first, [VOCAB.break_id], second, [VOCAB.eos_id]]))
            per_doc.append(got)
            if k:
                assert len(ex.tokens) > len(got) + 1  # the retrieved documents are context, not scored
        blocks = [t[t != IGNORE_INDEX] for _, t, _, _ in stream._blocks(0, 1, 0, 0)]
        np.testing.assert_array_equal(np.concatenate(blocks), np.concatenate(per_doc))
        scored[k] = np.concatenate(per_doc)
    np.testing.assert_array_equal(scored[0], scored[2])


def test_missing_neighbours_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neighbors.npy"):
        CM3PretrainStream(make_codes(tmp_path, neighbors=0), num_retrieved=2)


def test_stream_is_deterministic_and_resumes_exactly(tmp_path):
    codes = make_codes(tmp_path)

    def blocks(resume=None, n=12):
        s = CM3PretrainStream(codes, seq_len=64, num_retrieved=1, seed=3)
        s.resume(resume)
        return [b for b, _ in zip(s, range(n))]

    full = blocks(n=80)  # more than one epoch: 54 train records, about one per block
    epochs = [int(b[2][1]) for b in full]  # epoch of the position *after* each block
    assert epochs[0] == 0 and epochs[-1] >= 1
    k = 61
    state = {"batches": k, "num_workers": 1, "positions": {"0": full[k - 1][2][1:].tolist()}}
    resumed = blocks(state, n=80 - k)
    assert len(resumed) == 80 - k
    for a, b in zip(full[k:], resumed):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # A new epoch brings a new order.
    second_epoch_start = epochs.index(1) + 1
    assert not torch.equal(full[0][0], full[second_epoch_start][0])


class _Items(PackedStream):
    """Item i becomes a 3-token document carrying i, to see which items each shard sees."""

    def __init__(self, n, **kw):
        super().__init__(seq_len=7, pad_id=0, **kw)
        self.n = n

    @property
    def num_items(self):
        return self.n

    def example(self, item, epoch):
        t = np.array([1, 100 + item, 1], dtype=np.int64)
        return CM3Example(t, np.full(3, IGNORE_INDEX), np.zeros(3, np.uint8))


def test_ranks_and_workers_see_disjoint_items_covering_the_epoch():
    seen = []
    for rank in range(2):
        ds = _Items(23, epochs=1)
        ds.set_shard(rank, 2)
        for tokens, _, _ in DataLoader(ds, batch_size=None, num_workers=2):
            seen += [int(t) - 100 for t in tokens if t >= 100]
    assert sorted(seen) == list(range(23))


def test_workers_resume_in_the_same_order():
    def run(resume, n):
        ds = _Items(40, seed=1)
        ds.resume(resume)
        out, state = [], {"batches": resume["batches"] if resume else 0, "num_workers": 2,
                          "positions": dict(resume["positions"]) if resume else {}}
        for tokens, _, pos in DataLoader(ds, batch_size=3, num_workers=2):
            out.append(tokens)
            state["positions"][str(int(pos[-1, 0]))] = pos[-1, 1:].tolist()
            state["batches"] += 1
            if len(out) == n:
                return out, state

    full, _ = run(None, 9)
    first, state = run(None, 5)  # 5 batches: an odd count, so worker 1 is next
    rest, _ = run(state, 4)
    for a, b in zip(full, first + rest):
        assert torch.equal(a, b)


def test_damaged_code_shards_and_neighbours_are_named_errors(tmp_path):
    import shutil

    from cm3leon.data.codes import CodeDataset
    from cm3leon.objectives.sequences import load_neighbors
    from cm3leon.errors import CM3LeonError

    codes = make_codes(tmp_path / "ok")
    for name, damage, match in (("image_codes.npy", b"junk", "image_codes.npy: image codes file truncated"),
                                ("text_offsets.npy", "short", "do not fit"),
                                ("split.npy", None, "split.npy: splits file missing")):
        bad = tmp_path / name
        shutil.copytree(codes, bad)
        f = next(bad.glob("shard-*")) / name
        if damage is None:
            f.unlink()
        elif damage == "short":
            np.save(f, np.load(f)[:-1])
        else:
            f.write_bytes(damage)
        with pytest.raises(CM3LeonError, match=match):
            CodeDataset(bad)
    (codes / "neighbors.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(CM3LeonError, match="neighbors.npy: retrieval neighbours file truncated"):
        load_neighbors(CodeDataset(codes), 2)
