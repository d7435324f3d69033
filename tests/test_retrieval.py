"""Retrieval augmentation: bi-encoder training, the CLIP backend, the FAISS memory bank, the
selection policy (CM3Leon Sec. 2.2) and the neighbours file pretraining reads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from cm3leon.errors import CM3LeonError
from cm3leon.retrieval.encoder import (
    BiEncoder, BiEncoderConfig, BiEncoderRetriever, load_retriever, make_clip_retriever, save_bi_encoder,
)
from cm3leon.retrieval.index import (
    KeyLookup, MemoryBank, MetadataRows, Retrieval, build_index, compute_neighbors, index_params, make_faiss_index,
    retrieve_for_prompt,
)
from cm3leon.retrieval.policy import RetrievalPolicy, drop_image_patches, drop_text, select_documents
from cm3leon.retrieval.train import contrastive_loss, recall_at_k, retrieval_metrics, train_retriever

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "yellow": (230, 210, 20)}
SHAPES = ("circle", "square")
PLACES = {"left": 4, "right": 18}


def make_dataset(root: Path, size: int = 32) -> Path:
    """32 scenes (4 colours x 2 shapes x 2 places x 2 sizes): 24 train, 4 val, 4 test."""
    (root / "images").mkdir(parents=True)
    lines, i = [], 0
    for colour, rgb in COLOURS.items():
        for shape in SHAPES:
            for place, x in PLACES.items():
                for big in (False, True):
                    im = Image.new("RGB", (size, size), "white")
                    d = ImageDraw.Draw(im)
                    s = 12 if big else 7
                    box = (x, 10, x + s, 10 + s)
                    (d.ellipse if shape == "circle" else d.rectangle)(box, fill=rgb)
                    im.save(root / "images" / f"{i}.png")
                    split = "val" if i % 8 == 3 else "test" if i % 8 == 6 else "train"
                    text = f"a {'large' if big else 'small'} {colour} {shape} on the {place}"
                    lines.append({"image": f"images/{i}.png", "text": text, "split": split})
                    i += 1
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return root


def make_codes(data: Path, out: Path) -> Path:
    """A tokenized directory keyed like the dataset (fake codes: the record number)."""
    from cm3leon.data.codes import CodeShardWriter
    from cm3leon.data.readers import open_dataset

    w = CodeShardWriter(out, grid=(2, 2), codebook_size=64, text_vocab_size=300, shard_size=10)
    for i, r in enumerate(open_dataset(str(data), size=None)):
        w.add(r.key, r.split, r.text, [1, 2, 3], np.full(4, i))
    w.close()
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Dataset, codes, a briefly trained retriever and a flat index over the train split."""
    root = tmp_path_factory.mktemp("retrieval")
    data = make_dataset(root / "data")
    codes = make_codes(data, root / "codes")
    metrics = train_retriever(data, root / "retriever", steps=30, batch_size=16, size=32, dim=32, seed=0)
    build_index(data, root / "retriever", root / "index", codes=codes, batch_size=8, chunk_size=16)
    return {"root": root, "data": data, "codes": codes, "retriever": root / "retriever",
            "index": root / "index", "metrics": metrics}


# ---------------------------------------------------------------------------- metrics and loss

def test_recall_at_k_on_hand_made_similarities():
    sim = torch.tensor([[0.9, 0.1, 0.0],   # query 0: its positive ranks 1st
                        [0.8, 0.5, 0.1],   # query 1: positive ranks 2nd
                        [0.7, 0.6, 0.5]])  # query 2: positive ranks 3rd
    r = recall_at_k(sim, ks=(1, 2, 3))
    assert r == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 3: pytest.approx(1.0)}
    pos = torch.tensor([[True, False, False], [True, True, False], [False, False, True]])
    assert recall_at_k(sim, ks=(1,), positives=pos)[1] == pytest.approx(2 / 3)  # query 1's top hit is a positive


def test_retrieval_metrics_counts_identical_captions_as_matches():
    t = torch.eye(3)
    i = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # images 0 and 1 swapped
    strict = retrieval_metrics(t, i, ["a", "b", "c"])
    assert strict["text_to_image_recall@1"] == pytest.approx(1 / 3, abs=1e-4)  # rounded to 4 places
    same = retrieval_metrics(t, i, ["a", "a", "c"])  # captions 0 and 1 identical: the swap is no error
    assert same["text_to_image_recall@1"] == 1.0 and same["image_to_text_recall@1"] == 1.0


def test_contrastive_loss_is_symmetric_cross_entropy_and_groups_share_targets():
    torch.manual_seed(0)
    t = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    i = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    scale = torch.tensor(10.0)
    logits = scale * t @ i.t()
    ref = (torch.nn.functional.cross_entropy(logits, torch.arange(4)) +
           torch.nn.functional.cross_entropy(logits.t(), torch.arange(4))) / 2
    assert torch.allclose(contrastive_loss(t, i, scale), ref)
    assert torch.allclose(contrastive_loss(t, i, scale, torch.arange(4)), ref)  # unique groups = plain CLIP
    # two identical captions with identical images: plain CLIP cannot tell which image is "the"
    # positive (loss >= log 2 on those rows); as one group the perfect embedding has ~0 loss
    e = torch.eye(3)
    t2 = i2 = e[[0, 0, 1, 2]]
    grouped = contrastive_loss(t2, i2, torch.tensor(50.0), torch.tensor([0, 0, 1, 2]))
    plain = contrastive_loss(t2, i2, torch.tensor(50.0))
    assert grouped < 1e-6 and plain == pytest.approx(np.log(2) / 2, rel=1e-4)


# ---------------------------------------------------------------------------- bi-encoder

def test_bi_encoder_trains_loss_goes_down_and_reloads(world):
    m = world["metrics"]
    assert m["final_loss"] < m["first_loss"] - 0.3
    for key in ("text_to_image_recall@1", "text_to_image_recall@5", "image_to_text_recall@1", "image_to_text_recall@5"):
        assert 0.0 <= m[key] <= 1.0
    assert m["eval_split"] == "test" and m["num_pairs"] == 4
    saved = json.loads((world["retriever"] / "metrics.json").read_text())
    assert saved["final_loss"] == m["final_loss"]
    r = load_retriever(world["retriever"], device="cpu")
    imgs = [Image.open(world["data"] / "images" / f"{i}.png") for i in range(3)] + [Image.new("RGB", (50, 40), "red")]
    e = r.embed_image(imgs)
    assert e.shape == (4, 32) and torch.allclose(e.norm(dim=-1), torch.ones(4), atol=1e-5)
    d = r.embed_documents(["a red circle"] * 4, imgs)
    assert torch.allclose(d.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.allclose(r.embed_text(["a red circle", "x"]), load_retriever(world["retriever"], device="cpu").embed_text(["a red circle", "x"]))


def test_clip_score_is_cosine_of_pairs(world):
    r = load_retriever(world["retriever"], device="cpu")
    imgs = [Image.open(world["data"] / "images" / f"{i}.png") for i in range(3)]
    texts = ["a small red circle on the left", "a blue square", "yellow"]
    s = r.clip_score(imgs, texts)
    ref = (r.embed_image(imgs) * r.embed_text(texts)).sum(-1)
    assert s.shape == (3,) and torch.allclose(s, ref)
    with pytest.raises(CM3LeonError, match="2 images but 3 texts"):
        r.clip_score(imgs[:2], texts)


def _tiny_clip_dir(path: Path) -> Path:
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz0123456789.,":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(str(path))
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    CLIPModel(cfg).save_pretrained(str(path))
    return path


def test_tiny_random_clip_retriever_embeds_with_right_shapes_and_norms(tmp_path):
    pytest.importorskip("transformers")
    src = _tiny_clip_dir(tmp_path / "hf")
    info = make_clip_retriever(src, tmp_path / "ret")
    assert info["kind"] == "clip" and info["dim"] == 16 and (tmp_path / "ret" / "clip" / "config.json").is_file()
    r = load_retriever(tmp_path / "ret", device="cpu")
    texts = ["a red circle", "two blue squares on the left", "x"]
    t = r.embed_text(texts)
    imgs = [Image.new("RGB", (64, 48), "red"), Image.new("RGB", (32, 32), "blue"), Image.new("RGB", (20, 90), "white")]
    i = r.embed_image(imgs)
    assert t.shape == (3, 16) and i.shape == (3, 16)
    assert torch.allclose(t.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(i.norm(dim=-1), torch.ones(3), atol=1e-5)
    # the text path is the model's own: CLIPModel.forward's normalised text_embeds agree
    enc = r.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = r.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                      pixel_values=torch.zeros(3, 3, 32, 32))
    assert torch.allclose(t, out.text_embeds, atol=1e-5)
    assert r.clip_score(imgs, texts).shape == (3,)
    linked = make_clip_retriever(src, tmp_path / "linked", copy=False)
    assert Path(linked["clip_dir"]) == src.resolve()
    assert torch.allclose(load_retriever(tmp_path / "linked", device="cpu").embed_text(texts), t, atol=1e-6)


def test_clip_retriever_on_a_folder_without_clip_names_it(tmp_path):
    pytest.importorskip("transformers")
    with pytest.raises(CM3LeonError, match="not a Hugging Face CLIP directory"):
        make_clip_retriever(tmp_path, tmp_path / "ret")
    with pytest.raises(CM3LeonError, match="config.json"):
        load_retriever(tmp_path)


# ---------------------------------------------------------------------------- policy

def _info(table):
    return lambda i: table[i]


def test_select_skips_candidates_above_relevance_threshold():
    info = _info({0: ("a", "sa", True), 1: ("b", "sb", True), 2: ("c", "sc", True)})
    chosen, skipped = select_documents([0, 1, 2], [0.95, 0.85, 0.5], info, RetrievalPolicy(num_docs=2))
    assert [d for d, _ in chosen] == [1, 2] and skipped["threshold"] == 1
    chosen, _ = select_documents([0, 1, 2], [0.95, 0.85, 0.5], info, RetrievalPolicy(num_docs=2, max_relevance=None))
    assert [d for d, _ in chosen] == [0, 1]


def test_select_skips_duplicates_of_chosen_documents_and_of_the_query():
    info = _info({0: ("a", "s1", True), 1: ("a", "s2", True),   # same key as 0
                  2: ("c", "s1", True),                          # same text+image as 0
                  3: ("d", "sq", True),                          # same content as the query
                  4: ("e", "s5", True)})
    chosen, skipped = select_documents([0, 1, 2, 3, 4], [0.8, 0.7, 0.6, 0.5, 0.4], info, RetrievalPolicy(num_docs=2),
                                       query_key="q", query_signature="sq")
    assert [d for d, _ in chosen] == [0, 4] and skipped["duplicate"] == 3
    chosen, _ = select_documents([0, 1, 2], [0.8, 0.7, 0.6], info, RetrievalPolicy(num_docs=2, dedupe=False))
    assert [d for d, _ in chosen] == [0, 1]


def test_select_excludes_the_query_itself_and_ineligible_documents():
    info = _info({0: ("q", "sx", True), 1: ("b", "sb", False), 2: ("c", "sc", True), 3: ("d", "sd", True)})
    chosen, skipped = select_documents([0, 1, 2, 3], [0.5, 0.4, 0.3, 0.2], info, RetrievalPolicy(num_docs=2), query_key="q")
    assert [d for d, _ in chosen] == [2, 3] and skipped["self"] == 1 and skipped["ineligible"] == 1


def test_select_ranks_by_score_and_counts_a_candidate_found_twice_once():
    info = _info({i: (str(i), f"s{i}", True) for i in range(4)})
    chosen, skipped = select_documents([3, 1, 1, 2, -1], [0.1, 0.7, 0.7, 0.5, 9.0], info, RetrievalPolicy(num_docs=3))
    assert [d for d, _ in chosen] == [1, 2, 3] and sum(skipped.values()) == 0


def test_text_query_dropout_drops_about_20_percent_of_words_and_bytes():
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(50)]
    kept = [len(drop_text(" ".join(words), 0.2, rng).split()) for _ in range(200)]
    assert abs(1 - np.mean(kept) / 50 - 0.2) < 0.015  # 10,000 Bernoulli(0.2): sd of the rate ~0.004
    text = "abcdefghij" * 10
    kept = [len(drop_text(text, 0.2, rng, unit="byte")) for _ in range(200)]
    assert abs(1 - np.mean(kept) / 100 - 0.2) < 0.015
    assert drop_text("a b", 0.0, rng) == "a b"
    assert len(drop_text("one two", 0.99, rng).split()) == 1  # never empties the query


def test_image_query_dropout_fills_about_20_percent_of_patches_with_the_mean_colour():
    rng = np.random.default_rng(0)
    x = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    img = Image.fromarray(x)
    rates = []
    for _ in range(100):
        out, dropped = drop_image_patches(img, 0.2, rng, grid=8)
        rates.append(dropped.mean())
        y = np.asarray(out)
        cells = y.reshape(8, 4, 8, 4, 3).transpose(0, 2, 1, 3, 4)  # (row, col, 4, 4, 3)
        orig = x.reshape(8, 4, 8, 4, 3).transpose(0, 2, 1, 3, 4)
        mean = x.reshape(-1, 3).mean(0).round()
        assert (cells[dropped] == mean).all()
        assert (cells[~dropped] == orig[~dropped]).all()
    assert abs(np.mean(rates) - 0.2) < 0.02  # 6,400 patches


def test_policy_rejects_bad_settings_with_clear_errors():
    with pytest.raises(CM3LeonError, match="query_dropout"):
        RetrievalPolicy(query_dropout=1.5)
    with pytest.raises(CM3LeonError, match="query_modalities"):
        RetrievalPolicy(query_modalities=("audio",))
    g = RetrievalPolicy.for_generation(num_docs=3)
    assert g.max_relevance is None and g.query_dropout == 0 and g.num_docs == 3


# ---------------------------------------------------------------------------- memory bank

def _saved_bank(path: Path, vecs: np.ndarray, index_type: str, **kw):
    """(in-memory FAISS index, its params) after writing a bank directory at `path`."""
    import faiss

    from cm3leon.retrieval.index import index_params

    params = index_params(len(vecs), vecs.shape[1], index_type, **kw)
    index = make_faiss_index(vecs, index_type, params)
    faiss.write_index(index, str(path / "index.faiss"))
    np.save(path / "vectors.npy", vecs)
    (path / "metadata.jsonl").write_text("".join(json.dumps({"key": str(i), "text": ""}) + "\n" for i in range(len(vecs))))
    (path / "index.json").write_text(json.dumps({"format": "cm3leon-index/1", "dim": vecs.shape[1], "count": len(vecs),
                                                 "index_type": index_type, "params": params}))
    return index, params


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("index_type", ["flat", "ivf", "ivfpq"])
def test_index_save_load_gives_identical_hits(tmp_path, index_type):
    rng = np.random.default_rng(0)
    vecs = _unit(rng, 2000, 32)
    index, _ = _saved_bank(tmp_path, vecs, index_type, refine=1)
    q = vecs[:20] + 0.1 * rng.standard_normal((20, 32)).astype(np.float32)
    s0, i0 = index.search(q, 10)
    s1, i1 = MemoryBank.load(tmp_path).search(q, 10)
    assert np.array_equal(i0, i1) and np.array_equal(s0, s1)
    if index_type == "flat":
        assert (i1[:, 0] == np.arange(20)).all()  # exact search finds the perturbed originals


def test_ivfpq_refine_reranks_compressed_hits_exactly(tmp_path):
    rng = np.random.default_rng(0)
    vecs = _unit(rng, 3000, 32)
    q = _unit(rng, 50, 32)
    index, _ = _saved_bank(tmp_path, vecs, "ivfpq", refine=4, nprobe=64)
    bank = MemoryBank.load(tmp_path)
    s, ids = bank.search(q, 10)
    exact_scores = np.einsum("nkd,nd->nk", vecs[ids], q)
    assert np.allclose(s, exact_scores, atol=1e-5)  # scores are exact inner products
    assert (np.diff(s, axis=1) <= 1e-6).all()
    truth = np.argsort(-(q @ vecs.T), axis=1)[:, :10]
    recall = lambda got: np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, truth)])
    assert recall(ids) > recall(index.search(q, 10)[1]) + 0.1  # re-ranking recovers PQ's confusions


def test_ivfpq_defaults_are_the_measured_ones():
    # 225k 32-dim vectors: recall@10 0.27 with 4-byte codes at refine 4, 0.996 with 16-byte
    # codes at refine 16 (benchmarks/scale.py run)
    params = index_params(20_000, 32, "ivfpq")
    assert params["refine"] == 16 and params["pq_m"] == 16
    assert index_params(20_000, 512, "ivfpq")["pq_m"] == 64  # CLIP-size vectors: 8 dimensions a sub-quantiser
    assert index_params(20_000, 30, "ivfpq")["pq_m"] == 15  # the largest divisor leaving 2+ dimensions
    from cm3leon.cli import build_parser

    args = build_parser().parse_args(["index", "build", "--data", "d", "--retriever", "r", "--out", "o"])
    assert args.refine == 16


def test_built_index_finds_its_own_documents_and_maps_codes(world):
    bank = MemoryBank.load(world["index"])
    assert len(bank) == 24 and bank.dim == 32  # the train split
    r = load_retriever(world["retriever"], device="cpu")
    rows = [bank.document(i) for i in range(len(bank))]
    imgs = [Image.open(world["data"] / f"{row['key']}.png") for row in rows]
    q = r.embed_documents([row["text"] for row in rows], imgs).numpy()
    scores, ids = bank.search(q, 1)
    assert (ids[:, 0] == np.arange(len(bank))).all()
    assert np.allclose(scores[:, 0], 1.0, atol=1e-4)
    from cm3leon.data.codes import CodeDataset

    cds = CodeDataset(world["codes"])
    for i, row in enumerate(rows):
        rec = cds.get(row["code_index"])
        assert rec.key == row["key"] and rec.split == "train"
        assert np.array_equal(row["image_codes"], rec.image_codes)


def test_index_build_resumes_after_an_interruption(world, tmp_path, monkeypatch):
    calls = {"n": 0, "docs": 0}
    real = BiEncoderRetriever.embed_documents

    def flaky(self, texts, images):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # after 2 chunks of 8 are on disk
        calls["docs"] += len(texts)
        return real(self, texts, images)

    monkeypatch.setattr(BiEncoderRetriever, "embed_documents", flaky)
    out = tmp_path / "index"
    with pytest.raises(KeyboardInterrupt):
        build_index(world["data"], world["retriever"], out, codes=world["codes"], batch_size=8, chunk_size=8)
    assert len(list((out / "embeddings").glob("chunk-*.npy"))) == 2 and not (out / "index.json").exists()
    # the same retriever path with other weights (another digest) is another build: refused
    state = json.loads((out / "embeddings" / "build.json").read_text())
    (out / "embeddings" / "build.json").write_text(json.dumps({**state, "retriever_sha256": {"x": "y"}}))
    with pytest.raises(CM3LeonError, match="interrupted build with other settings"):
        build_index(world["data"], world["retriever"], out, codes=world["codes"], batch_size=8, chunk_size=8)
    (out / "embeddings" / "build.json").write_text(json.dumps(state))
    (out / "embeddings" / ".chunk-00002.npy.abc.tmp").mkdir()  # a chunk write cut short
    calls["docs"] = 0
    build_index(world["data"], world["retriever"], out, codes=world["codes"], batch_size=8, chunk_size=8)
    assert calls["docs"] == 24 - 16  # only the rest was embedded
    a, b = MemoryBank.load(out), MemoryBank.load(world["index"])
    assert [a.document(i)["key"] for i in range(len(a))] == [b.document(i)["key"] for i in range(len(b))]
    assert np.allclose(a.vectors(range(24)), b.vectors(range(24)), atol=1e-6)
    assert not (out / "embeddings").exists()


def test_a_retriever_retrained_in_place_is_the_one_the_next_build_uses(world, tmp_path):
    """build_index loads the retriever once per call, not once per process: a second build in the
    same process after the retriever was retrained at the same path embeds with the new weights
    (as a fresh process would)."""
    import shutil

    retriever = tmp_path / "retriever"
    shutil.copytree(world["retriever"], retriever)
    build_index(world["data"], retriever, tmp_path / "a", batch_size=8, chunk_size=16)
    train_retriever(world["data"], retriever, steps=5, batch_size=16, size=32, dim=32, seed=1)
    build_index(world["data"], retriever, tmp_path / "b", batch_size=8, chunk_size=16)
    shutil.copytree(retriever, tmp_path / "fresh")
    build_index(world["data"], tmp_path / "fresh", tmp_path / "c", batch_size=8, chunk_size=16)
    a, b, c = (np.load(tmp_path / x / "vectors.npy") for x in "abc")
    assert not np.allclose(a, b)
    assert np.array_equal(b, c)


INDEX_FILES = ("vectors.npy", "metadata.jsonl", "image_codes.npy", "index.faiss", "index.json")


def test_index_build_with_workers_writes_what_one_process_writes(world, tmp_path):
    """`cm3leon index build --workers 2` over webdataset shards (units of 10 records, batches
    of 3 and chunks of 4 that divide neither) writes the one-process build's files byte for
    byte; over a captions.jsonl folder (one unit) extra workers change nothing."""
    from cm3leon.cli import main
    from cm3leon.data.shapes import synthesize_webdataset

    data = Path(synthesize_webdataset(tmp_path / "wds", num=40, size=32, seed=0, shard_size=10)["out"])
    codes = make_codes(data, tmp_path / "codes")
    args = dict(codes=codes, batch_size=3, chunk_size=4, index_type="ivf")
    one = build_index(data, world["retriever"], tmp_path / "one", **args)
    assert main(["index", "build", "--data", str(data), "--retriever", str(world["retriever"]), "--codes", str(codes),
                 "--out", str(tmp_path / "two"), "--batch-size", "3", "--chunk-size", "4", "--index-type", "ivf",
                 "--workers", "2"]) == 0
    assert 0 < one["count"] < 40 and not (tmp_path / "two" / "embeddings").exists()
    for name in INDEX_FILES:
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    keys = [MemoryBank.load(tmp_path / "two").document(i)["key"] for i in range(one["count"])]
    from cm3leon.data.readers import open_dataset
    assert keys == [r.key for r in open_dataset(data, size=32, split="train")]  # the dataset's order

    build_index(world["data"], world["retriever"], tmp_path / "folder", codes=world["codes"], batch_size=8,
                chunk_size=16, workers=4)
    for name in INDEX_FILES:
        assert (tmp_path / "folder" / name).read_bytes() == (world["index"] / name).read_bytes(), name


def test_index_build_under_torchrun_writes_what_one_process_writes(world, tmp_path):
    """The ranks of `torchrun --nproc_per_node=2` take whole shards; rank 0 merges them into
    the one-process build's files (both with one torch thread, as torchrun's ranks run)."""
    import os
    import subprocess
    import sys

    from cm3leon.data.shapes import synthesize_webdataset

    data = Path(synthesize_webdataset(tmp_path / "wds", num=30, size=32, seed=1, shard_size=10)["out"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = build_index(data, world["retriever"], tmp_path / "one", batch_size=3, chunk_size=4)
    finally:
        torch.set_num_threads(threads)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "cm3leon.cli",
           "index", "build", "--data", str(data), "--retriever", str(world["retriever"]),
           "--out", str(tmp_path / "ranks"), "--batch-size", "3", "--chunk-size", "4"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["count"] == one["count"]  # printed once, by rank 0
    for name in ("vectors.npy", "metadata.jsonl", "index.faiss", "index.json"):
        assert (tmp_path / "ranks" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name


def test_index_build_refuses_bad_worker_counts(world, tmp_path, monkeypatch, capsys):
    from cm3leon.cli import main

    with pytest.raises(CM3LeonError, match="--workers must be >= 1, got 0"):
        build_index(world["data"], world["retriever"], tmp_path / "x", workers=0)
    assert main(["index", "build", "--data", str(world["data"]), "--retriever", str(world["retriever"]),
                 "--out", str(tmp_path / "x"), "--workers", "-1"]) == 2
    assert "--workers must be >= 1, got -1" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(CM3LeonError, match="--workers 2 under torchrun: each of the 2 ranks is one worker"):
        build_index(world["data"], world["retriever"], tmp_path / "x", workers=2)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name,content,match", [
    ("index.faiss", b"garbage" * 10, "index.faiss: not a readable FAISS index"),
    ("vectors.npy", b"garbage" * 10, "vectors.npy: index vectors file truncated or not a plain .npy array"),
    ("metadata.jsonl", b"{nope\n", r"metadata.jsonl:1: malformed JSON line"),
    ("metadata.jsonl", b"[1, 2]\n", "metadata.jsonl: every line must be a JSON object"),
    ("index.json", b"{", "index.json: not valid JSON"),
    ("image_codes.npy", "short", "image_codes.npy rows"),
])
def test_a_damaged_memory_bank_file_is_a_named_error(world, tmp_path, name, content, match):
    import shutil

    broken = tmp_path / "index"
    shutil.copytree(world["index"], broken)
    if content == "short":
        np.save(broken / name, np.load(broken / name)[:-1])
    else:
        (broken / name).write_bytes(content)
    with pytest.raises(CM3LeonError, match=match):
        MemoryBank.load(broken)


def test_bank_reads_metadata_rows_on_demand_and_keeps_no_row_dicts(world):
    """At millions of documents a dict per row does not fit: the bank keeps byte offsets only."""
    bank = MemoryBank.load(world["index"])
    lines = [json.loads(line) for line in (world["index"] / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(bank) == len(lines) == 24
    for i in reversed(range(len(bank))):  # any order: each row is found by its offset
        doc, row = bank.document(i), lines[i]
        assert {f: doc[f] for f in ("key", "text", "split", "code_index")} == \
            {f: row.get(f) for f in ("key", "text", "split", "code_index")}
        assert bank.doc_info(i) == (row["key"], row["sig"], True)
    assert not hasattr(bank, "rows")
    assert not any(isinstance(v, (list, dict)) and len(v) >= len(lines) for v in vars(bank).values())
    meta = bank.metadata
    assert meta._starts.dtype == np.int64 and meta._starts.shape == (24,)
    assert [r for _, rows in meta.batches(size=5) for r in rows] == lines
    with pytest.raises(IndexError):
        meta[24]
    small = MetadataRows(world["index"] / "metadata.jsonl", cache_size=3)
    assert [small[i]["key"] for i in range(24)] == [r["key"] for r in lines]
    assert len(small._cache) == 3  # the cache stays bounded
    small.close()


def test_metadata_rows_skip_blank_lines_and_name_the_bad_line(tmp_path):
    p = tmp_path / "metadata.jsonl"
    good = [{"key": "a", "text": "x"}, {"key": "ünï", "text": "y"}]
    p.write_bytes(b"\n".join(json.dumps(r).encode() for r in good[:1]) + b"\n\n" + json.dumps(good[1]).encode() + b"\n")
    rows = MetadataRows(p)
    assert len(rows) == 2 and [rows[1], rows[0]] == good[::-1]
    assert [r for _, b in rows.batches(size=1) for r in b] == good
    rows.close()
    for content, match in [
        (b'{"key": "a", "text": ""}\n{"key": "b", "text": ""}\n{"key": "c", "te\n', r"metadata.jsonl:3: malformed JSON line"),
        (b'{"key": "a", "text": ""}\n{"key": "b", "text": "\xff\xfe"}\n', r"metadata.jsonl:2: malformed JSON line"),
        (b'{"key": "a", "text": ""}\n{"text": "no key"}\n', r"metadata.jsonl:2: the row needs a string 'key'"),
        (b'{"key": "a"}\n', r"metadata.jsonl:1: the row has no 'text'"),
        (b'{"key": "a", "text": ""}\n"just a string"\n', r"metadata.jsonl: every line must be a JSON object"),
    ]:
        p.write_bytes(content)
        with pytest.raises(CM3LeonError, match=match):
            MetadataRows(p)


def test_a_corrupt_metadata_line_in_a_built_bank_is_a_named_error(world, tmp_path):
    import shutil

    broken = tmp_path / "index"
    shutil.copytree(world["index"], broken)
    lines = (broken / "metadata.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    lines[5] = lines[5][: len(lines[5]) // 2] + "\n"  # a row cut short in the middle of the file
    (broken / "metadata.jsonl").write_text("".join(lines), encoding="utf-8")
    with pytest.raises(CM3LeonError, match=r"metadata\.jsonl:6: malformed JSON line"):
        MemoryBank.load(broken)


def test_key_lookup_gives_the_first_record_of_a_key_and_minus_one_for_unknown_keys():
    pairs = [("b", "train"), ("a", "val"), ("b", "test"), ("κλειδί", "train"), ("a\x00", "train"),
             ("ab", "train"), ("κλειδί", "val"), ("a", "train"), ("日本語のキー" * 5, "test"), ("", "train")]
    ref: dict[str, int] = {}
    for gi, (k, _) in enumerate(pairs):
        ref.setdefault(k, gi)
    for chunk in (2, 3, 65536):  # keys encoded in chunks of different widths
        kl = KeyLookup(iter(pairs), chunk=chunk)
        queries = list(ref) + ["c", "a\x00\x00", "κλειδ", "κλειδίκ", "x" * 500, "日本語のキー"]
        assert kl.lookup(queries).tolist() == [ref.get(q, -1) for q in queries]
        assert kl.lookup([]).dtype == np.int64 and kl.lookup([]).shape == (0,)
        assert kl.get("κλειδί") == 3 and kl.get("b") == 0 and kl.get("nope") is None and kl.get("nope", -1) == -1
        assert len(kl) == len(pairs) and [kl.split_names[c] for c in kl.split_codes] == [s for _, s in pairs]
        assert kl.split_names == ("test", "train", "val")
        assert kl.in_split("val").tolist() == [s == "val" for _, s in pairs] and not kl.in_split("other").any()
    rng = np.random.default_rng(0)
    keys = [str(int(x)) for x in rng.integers(0, 300, 1000)]  # many repeats, lengths 1-3
    ref = {}
    for gi, k in enumerate(keys):
        ref.setdefault(k, gi)
    kl = KeyLookup(((k, "train") for k in keys), chunk=64)
    queries = [str(i) for i in range(-5, 305)]
    assert kl.lookup(queries).tolist() == [ref.get(q, -1) for q in queries]
    assert KeyLookup([]).lookup(["a"]).tolist() == [-1]


def test_code_lookup_of_a_tokenized_directory_with_repeated_keys(tmp_path):
    from cm3leon.data.codes import CodeShardWriter
    from cm3leon.retrieval.index import _code_lookup

    w = CodeShardWriter(tmp_path / "codes", grid=(1, 1), codebook_size=8, text_vocab_size=10, shard_size=2)
    for key, split in [("k1", "train"), ("ключ", "val"), ("k1", "test"), ("k22", "train"), ("ключ", "train")]:
        w.add(key, split, "t", [1], [0])
    w.close()
    codes, kl = _code_lookup(tmp_path / "codes")
    assert len(codes) == kl.num_records == 5
    assert kl.lookup(["k1", "ключ", "k22", "k2"]).tolist() == [0, 1, 3, -1]
    assert kl.in_split("train").tolist() == [True, False, False, True, True]


def test_damaged_retriever_weights_are_a_named_error(world, tmp_path):
    import shutil

    d = tmp_path / "retriever"
    shutil.copytree(world["retriever"], d)
    (d / "model.safetensors").write_bytes(b"xx")
    with pytest.raises(CM3LeonError, match="model.safetensors: retriever weights file truncated or corrupt"):
        load_retriever(d, device="cpu")


def test_missing_metadata_and_dimension_mismatch_give_clear_errors(world, tmp_path):
    import shutil

    broken = tmp_path / "index"
    shutil.copytree(world["index"], broken)
    (broken / "metadata.jsonl").unlink()
    with pytest.raises(CM3LeonError, match="metadata.jsonl"):
        MemoryBank.load(broken)
    with pytest.raises(CM3LeonError, match="index.json"):
        MemoryBank.load(tmp_path / "nothing")
    other = tmp_path / "other_retriever"
    save_bi_encoder(BiEncoder(BiEncoderConfig(embed_dim=8)), other)
    with pytest.raises(CM3LeonError, match=r"8 dimensions.*index\.json.*32-dimensional"):
        Retrieval(load_retriever(other, device="cpu"), MemoryBank.load(world["index"]))
    with pytest.raises(CM3LeonError, match="8 dimensions"):
        compute_neighbors(world["index"], world["codes"], retriever=other)


# ---------------------------------------------------------------------------- neighbours

def _check_neighbors(codes: Path, k: int) -> tuple[np.ndarray, dict]:
    from cm3leon.data.codes import CodeDataset

    nb = np.load(codes / "neighbors.npy")
    info = json.loads((codes / "neighbors.json").read_text())
    cds = CodeDataset(codes)
    assert nb.shape == (len(cds), k) and nb.dtype == np.int64
    for gi, row in enumerate(nb):
        assert gi not in row  # never the record itself
        for j in row[row >= 0]:
            assert cds.get(int(j)).split == "train"  # never a val/test record
        real = row[row >= 0]
        assert len(set(real.tolist())) == len(real)  # no document twice
    assert sum(info["rows_by_count"].values()) == len(cds)
    assert info["rows_with_k"] == int(((nb >= 0).sum(1) == k).sum())
    return nb, info


def test_neighbors_file_shape_no_self_no_heldout_and_deterministic(world):
    s = compute_neighbors(world["index"], world["codes"], k=2, seed=3)
    nb, info = _check_neighbors(world["codes"], 2)
    assert info["policy"]["query_dropout"] == 0.2 and info["policy"]["max_relevance"] == 0.9 and s == info
    assert info["rows_with_k_by_split"]["val"] + info["rows_with_k_by_split"]["test"] > 0  # held-out queries get docs too
    assert info["skipped"]["self"] > 0  # train queries met themselves and skipped them
    compute_neighbors(world["index"], world["codes"], k=2, seed=3)
    assert np.array_equal(np.load(world["codes"] / "neighbors.npy"), nb)


def test_neighbors_never_come_from_heldout_even_when_the_index_holds_every_split(world, tmp_path):
    everything = tmp_path / "index_all"
    build_index(world["data"], world["retriever"], everything, split="all")
    assert len(MemoryBank.load(everything)) == 32
    info = compute_neighbors(everything, world["codes"], k=3, policy=RetrievalPolicy(max_relevance=None))
    assert info["bank_documents_usable"] == 24 and info["skipped"]["ineligible"] > 0
    _check_neighbors(world["codes"], 3)


def test_retrieve_for_prompt_returns_documents_with_codes_and_model_dir_layout(world, tmp_path):
    import shutil

    r = load_retriever(world["retriever"], device="cpu")
    bank = MemoryBank.load(world["index"])
    hits = retrieve_for_prompt(r, bank, text="a large red circle on the left", k=3)
    assert len(hits) == 3 and [h["score"] for h in hits] == sorted([h["score"] for h in hits], reverse=True)
    for h in hits:
        assert set(h) >= {"key", "text", "code_index", "score", "image_codes"} and h["code_index"] is not None
        assert h["image_codes"].tolist() == [h["code_index"]] * 4  # the fake codes are the record number
    img = Image.open(world["data"] / "images" / "0.png")
    assert len(retrieve_for_prompt(r, bank, image=img, k=2)) == 2
    assert Retrieval.from_model_dir(tmp_path) is None
    shutil.copytree(world["retriever"], tmp_path / "retriever")
    shutil.copytree(world["index"], tmp_path / "index")
    got = Retrieval.from_model_dir(tmp_path, device="cpu").retrieve_for_prompt(text="a large red circle on the left", k=3)
    assert [h["key"] for h in got] == [h["key"] for h in hits]


def test_index_cli_query_and_neighbors(world, capsys):
    from cm3leon.cli import main

    assert main(["index", "query", "--index", str(world["index"]), "--k", "3", "a small blue square on the right"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    scores = [float(line.split()[1]) for line in lines]
    assert scores == sorted(scores, reverse=True)
    assert main(["index", "query", "--index", str(world["index"])]) == 2  # no query: a clear error, exit 2
    assert "give a query text" in capsys.readouterr().err
    assert main(["index", "neighbors", "--index", str(world["index"]), "--codes", str(world["codes"]), "--k", "1"]) == 0
    assert np.load(world["codes"] / "neighbors.npy").shape == (32, 1)


@pytest.fixture(scope="module")
def shards(world, tmp_path_factory):
    """40 webdataset records in 4 shards of 10 (the units of --workers), their codes and a
    flat index of their train split."""
    from cm3leon.data.shapes import synthesize_webdataset

    root = tmp_path_factory.mktemp("shards")
    data = Path(synthesize_webdataset(root / "wds", num=40, size=32, seed=0, shard_size=10)["out"])
    codes = make_codes(data, root / "codes")
    build_index(data, world["retriever"], root / "index", codes=codes, batch_size=8, chunk_size=16)
    return {"root": root, "data": data, "codes": codes, "index": root / "index"}


def _codes_copy(shards, out: Path) -> Path:
    import shutil

    shutil.copytree(shards["codes"], out)
    return out


NEIGHBOR_FILES = ("neighbors.npy", "neighbors.json")


def test_neighbors_with_workers_write_what_one_process_writes(shards, tmp_path):
    """`cm3leon index neighbors --workers 2` over 4 shards (batches of 3 that divide no shard)
    writes the one-process files byte for byte, and leaves no parts behind."""
    from cm3leon.cli import main

    one, two = _codes_copy(shards, tmp_path / "one"), _codes_copy(shards, tmp_path / "two")
    s = compute_neighbors(shards["index"], one, k=2, seed=1, batch_size=3)
    assert s["num_records"] == 40 and s["records_without_query"] == 0 and s["skipped"]["self"] > 0
    assert main(["index", "neighbors", "--index", str(shards["index"]), "--codes", str(two), "--k", "2",
                 "--seed", "1", "--batch-size", "3", "--workers", "2"]) == 0
    for name in NEIGHBOR_FILES:
        assert (two / name).read_bytes() == (one / name).read_bytes(), name
    assert not (two / "neighbors.parts").exists() and not (one / "neighbors.parts").exists()
    _check_neighbors(two, 2)


def test_neighbors_resume_after_an_interruption_without_redoing_finished_units(shards, tmp_path, monkeypatch):
    """Interrupted after 2 of 4 units, a rerun searches only the other 2 (a part write cut
    short is cleaned up) and writes the uninterrupted run's bytes; other settings are refused."""
    import cm3leon.retrieval.index as index_mod

    straight, run = _codes_copy(shards, tmp_path / "straight"), _codes_copy(shards, tmp_path / "run")
    compute_neighbors(shards["index"], straight, k=2, batch_size=4)
    real, units = index_mod.neighbors_unit, []

    def interrupted(job, unit, bar=None):
        if unit == 2:
            raise KeyboardInterrupt
        return real(job, unit, bar)

    monkeypatch.setattr(index_mod, "neighbors_unit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        compute_neighbors(shards["index"], run, k=2, batch_size=4)
    parts = run / "neighbors.parts"
    assert sorted(p.name for p in parts.glob("unit-*")) == ["unit-00000.npz", "unit-00001.npz"]
    assert not (run / "neighbors.npy").exists()
    with pytest.raises(CM3LeonError, match="an interrupted run with other settings"):
        compute_neighbors(shards["index"], run, k=3, batch_size=4)
    (parts / ".unit-00002.npz.abc.tmp").mkdir()  # a part write cut short

    def counted(job, unit, bar=None):
        units.append(unit)
        return real(job, unit, bar)

    monkeypatch.setattr(index_mod, "neighbors_unit", counted)
    compute_neighbors(shards["index"], run, k=2, batch_size=4)
    assert units == [2, 3]  # the finished units were not searched again
    for name in NEIGHBOR_FILES:
        assert (run / name).read_bytes() == (straight / name).read_bytes(), name
    assert not parts.exists() and not [p for p in run.iterdir() if p.name.startswith(".")]


def test_neighbors_under_torchrun_write_what_one_process_writes(shards, tmp_path):
    """The ranks of `torchrun --nproc_per_node=2` take whole shards; rank 0 merges them into
    the one-process files (both with one torch thread, as torchrun's ranks run)."""
    import os
    import subprocess
    import sys

    one, ranks = _codes_copy(shards, tmp_path / "one"), _codes_copy(shards, tmp_path / "ranks")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        compute_neighbors(shards["index"], one, k=2)
    finally:
        torch.set_num_threads(threads)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "cm3leon.cli",
           "index", "neighbors", "--index", str(shards["index"]), "--codes", str(ranks), "--k", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["num_records"] == 40  # printed once, by rank 0
    for name in NEIGHBOR_FILES:
        assert (ranks / name).read_bytes() == (one / name).read_bytes(), name


def test_neighbors_refuse_bad_worker_counts(shards, tmp_path, monkeypatch, capsys):
    from cm3leon.cli import main

    codes = _codes_copy(shards, tmp_path / "codes")
    with pytest.raises(CM3LeonError, match="--workers must be >= 1, got 0"):
        compute_neighbors(shards["index"], codes, workers=0)
    assert main(["index", "neighbors", "--index", str(shards["index"]), "--codes", str(codes),
                 "--workers", "-1"]) == 2
    assert "--workers must be >= 1, got -1" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(CM3LeonError, match="--workers 2 under torchrun: each of the 2 ranks is one worker"):
        compute_neighbors(shards["index"], codes, workers=2)
    assert sorted(p.name for p in codes.iterdir()) == sorted(p.name for p in shards["codes"].iterdir())
