"""`CM3Leon` API and `cm3leon generate` on a tiny random model directory."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from cm3leon.api import REQUIRED_FILES, CM3Leon, _best_text, prepare_image
from cm3leon.cli import main
from cm3leon.decode.config import DECODING_FILE, DecodingConfig
from cm3leon.errors import CM3LeonError

@pytest.fixture(scope="module")
def model_dir(task_model_dir):
    return task_model_dir


@pytest.fixture(scope="module")
def m(model_dir):
    return CM3Leon.from_pretrained(model_dir)


@pytest.fixture()
def picture():
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 40, 3), dtype=np.uint8))


def test_from_pretrained_loads_every_part(m):
    assert m.tokens_per_image == 16 and m.resolution == 16
    assert m.retriever is None and m.retrieval is None
    assert "CM3Leon(" in repr(m)


@pytest.mark.parametrize("method", ["topp", "cfg", "cdk", "best_of_n"])
def test_text_to_image_returns_pil_images_of_the_tokenizer_resolution(m, method):
    img = m.text_to_image("a red circle", method=method, seed=0, num_candidates=2)
    assert isinstance(img, Image.Image) and img.size == (16, 16) and img.mode == "RGB"
    imgs = m.text_to_image("a red circle", n=2, method=method, seed=0, num_candidates=2)
    assert isinstance(imgs, list) and len(imgs) == 2 and all(isinstance(i, Image.Image) for i in imgs)


def test_same_seed_same_image_and_samples_carry_their_settings(m):
    a = m.sample_images("a blue square", n=2, method="cfg", cfg_scale=2.0, seed=5)
    b = m.sample_images("a blue square", n=2, method="cfg", cfg_scale=2.0, seed=5)
    assert [s.codes for s in a] == [s.codes for s in b] and len(a[0].codes) == 16
    assert a[0].settings["guidance"] == {"method": "cfg", "cfg_scale": 2.0}
    assert a[0].seed == 5 and a[0].index == 0


def test_best_of_n_keeps_every_candidate_half_cfg_half_cdk_ranked_by_score(m):
    samples = m.sample_images("a red circle", n=4, method="best_of_n", num_candidates=4, seed=1)
    assert sorted(s.method for s in samples) == ["cdk", "cdk", "cfg", "cfg"]
    scores = [s.score for s in samples]
    assert scores == sorted(scores, reverse=True) and all(s.scorer == "likelihood" for s in samples)
    assert all(np.isfinite(scores))


def test_clip_scorer_without_a_retriever_or_an_unknown_scorer_is_a_clear_error(m):
    with pytest.raises(CM3LeonError, match="retriever"):
        m.sample_images("a red circle", method="best_of_n", num_candidates=2, scorer="clip")
    with pytest.raises(CM3LeonError, match="scorer"):
        m.sample_images(["a red circle"], method="best_of_n", num_candidates=2, scorer="vibes")


def test_text_tasks_return_strings(m, picture):
    caption = m.image_to_text(picture, max_new_tokens=6)
    answer = m.answer(picture, "what colour is the circle?", max_new_tokens=6)
    assert isinstance(caption, str) and isinstance(answer, str)


def test_captioning_with_candidates_keeps_the_best_scored_of_the_greedy_and_sampled_captions(m, picture,
                                                                                           monkeypatch):
    greedy = m.image_to_text([picture, picture.rotate(90)], max_new_tokens=6, seed=0)
    seen = []
    real = m.caption_scores

    def scores(image, codes, captions, scorer):
        seen.append((list(captions), scorer))
        out = real(image, codes, captions, scorer)
        assert len(out) == len(captions) and all(np.isfinite(out))
        return [-len(c) for c in captions]  # prefer the shortest: a ranking the test can predict

    monkeypatch.setattr(m, "caption_scores", scores)
    best = m.image_to_text([picture, picture.rotate(90)], max_new_tokens=6, seed=0, num_candidates=4,
                           scorer="likelihood")
    assert len(seen) == 2 and len(best) == 2  # both images had distinct candidates to rank
    for (cands, scorer), g, b in zip(seen, greedy, best):
        assert scorer == "likelihood" and cands[0] == g  # the greedy caption is the first candidate
        assert 2 <= len(cands) <= 4 and len(set(cands)) == len(cands) and all(c.strip() for c in cands)
        assert b == min(cands, key=len)
    # one candidate: the greedy caption, nothing scored
    seen.clear()
    assert m.image_to_text(picture, max_new_tokens=6, seed=0, num_candidates=1) == greedy[0] and not seen
    with pytest.raises(CM3LeonError, match="num_candidates"):
        m.image_to_text(picture, num_candidates=0)
    with pytest.raises(CM3LeonError, match="retriever"):
        m.image_to_text(picture, num_candidates=2, scorer="clip")
    with pytest.raises(CM3LeonError, match="scorer"):
        m.image_to_text(picture, scorer="vibes")  # a bad scorer is refused even for one caption


def test_decoding_json_sets_how_many_caption_candidates_the_model_ranks(model_dir, tmp_path, picture, monkeypatch):
    d = tmp_path / "model"
    shutil.copytree(model_dir, d)
    (d / DECODING_FILE).write_text(json.dumps({"caption_candidates": 3}))
    tuned = CM3Leon.from_pretrained(d)
    assert tuned.decoding.caption_candidates == 3
    seen, rows = [], []
    monkeypatch.setattr(tuned, "caption_scores", lambda im, codes, caps, scorer: seen.append(caps) or [0.0] * len(caps))
    real_write = tuned._write_texts
    monkeypatch.setattr(tuned, "_write_texts", lambda tps, *a: rows.append(len(tps)) or real_write(tps, *a))
    tuned.image_to_text(picture, max_new_tokens=6, temperature=0.0, seed=1)
    assert rows == [1, 2]  # the greedy caption, then the 2 sampled candidates
    assert not seen or 2 <= len(seen[0]) <= 3  # scored unless all 3 candidates were the same text
    (d / DECODING_FILE).write_text(json.dumps({"caption_candidates": 0}))
    with pytest.raises(CM3LeonError, match="caption_candidates"):
        CM3Leon.from_pretrained(d)


def test_answering_with_candidates_keeps_the_answer_under_which_the_picture_is_likeliest(m, picture, monkeypatch):
    from cm3leon.decode.rerank import sequence_logprob
    from cm3leon.layout.templates import prompt

    codes = m.encode_image(picture)
    got = m.answer_scores(codes, "is there a circle?", ["yes", "no"])
    conds = [prompt("vqa_image", {"question": "is there a circle?", "answer": a}, m.vocab, m.text_tokenizer)
             for a in ("yes", "no")]
    assert conds[0][-1] == m.vocab.break_id  # the picture follows the answer's text, as in training
    drawn = sequence_logprob(m.model, conds, [m.prompts.image(codes)] * 2, reduction="sum")
    infill = m.prompts.vqa(codes, "is there a circle?", 4).cond
    assert infill[-1] == m.vocab.mask_id(0)  # the answer is written where `answer` writes it
    said = sequence_logprob(m.model, [infill] * 2, [m.prompts.text(f" {a}.") + [m.vocab.eoss_id] for a in ("yes", "no")],
                            reduction="sum")
    assert got == pytest.approx((drawn + said).tolist(), rel=1e-5) and got[0] != got[1]
    mean = sequence_logprob(m.model, conds, [m.prompts.image(codes)] * 2)
    assert torch.allclose(mean * len(m.prompts.image(codes)), drawn, rtol=1e-5)  # sum = mean x length

    questions = ["what colour is it?", "where is it?"]
    greedy = m.answer([picture, picture], questions, max_new_tokens=4, seed=0)
    seen = []

    def scores(c, question, answers, max_new_tokens):
        seen.append((question, list(answers)))
        return [-len(a) for a in answers]  # prefer the shortest: a ranking the test can predict

    monkeypatch.setattr(m, "answer_scores", scores)
    best = m.answer([picture, picture], questions, max_new_tokens=4, seed=0, num_candidates=6)
    assert len(seen) == 2 and len(best) == 2  # both questions had distinct answers to rank
    for (q, cands), question, g, b in zip(seen, questions, greedy, best):
        assert q == question and cands[0] == g  # the greedy answer is the first candidate
        assert 2 <= len(cands) <= 6 and len(set(cands)) == len(cands) and all(c.strip() for c in cands)
        assert not any(c.endswith(".") for c in cands)  # ranked as answered, the template's '.' removed
        assert b == min(cands, key=len)
    seen.clear()
    assert m.answer(picture, questions[0], max_new_tokens=4, seed=0, num_candidates=1) == greedy[0] and not seen
    with pytest.raises(CM3LeonError, match="num_candidates"):
        m.answer(picture, "where?", num_candidates=0)


def test_an_answer_too_long_for_the_context_is_never_ranked_first(m, picture):
    codes = m.encode_image(picture)
    long = " ".join(["circle"] * 400)
    assert m.answer_scores(codes, "what is it?", ["red", long])[1] == float("-inf")
    def score(uniq):
        return m.answer_scores(codes, "what is it?", uniq)

    assert _best_text([long, "red"], score) == "red"
    assert _best_text([long, long + " x"], score) == long  # nothing fits: the greedy one stays


def test_decoding_json_and_generate_vqa_set_how_many_answers_the_model_ranks(model_dir, tmp_path, picture,
                                                                            monkeypatch):
    d = tmp_path / "model"
    shutil.copytree(model_dir, d)
    (d / DECODING_FILE).write_text(json.dumps({"answer_candidates": 3}))
    tuned = CM3Leon.from_pretrained(d)
    assert tuned.decoding.answer_candidates == 3
    rows = []
    real_write = tuned._write_texts
    monkeypatch.setattr(tuned, "_write_texts", lambda tps, *a: rows.append(len(tps)) or real_write(tps, *a))
    tuned.answer(picture, "where is it?", max_new_tokens=4, seed=1)
    assert rows == [1, 2]  # the greedy answer, then the 2 sampled candidates
    out = tmp_path / "answers"
    assert main(["generate", "vqa", "--model", str(d), "--image", str(_save(picture, tmp_path)),
                 "--question", "where is it?", "--seed", "0", "--answer-candidates", "2", "--out", str(out)]) == 0
    got = [json.loads(l) for l in (out / "samples.jsonl").read_text().splitlines()]
    assert len(got) == 1 and got[0]["settings"]["answer_candidates"] == 2
    (d / DECODING_FILE).write_text(json.dumps({"answer_candidates": 0}))
    with pytest.raises(CM3LeonError, match="answer_candidates"):
        CM3Leon.from_pretrained(d)


def test_edit_with_candidates_keeps_the_edit_the_model_finds_most_likely(m, picture):
    from cm3leon.decode.rerank import sequence_logprob

    samples = m.edit_samples(picture, "make it blue", seed=0, n=3)
    ranked = m.rank_edits(m.encode_image(picture), "make it blue", samples)
    cond = m.prompts.edit(m.encode_image(picture), "make it blue").cond
    direct = sequence_logprob(m.model, [cond] * 3, [m.prompts.image(s.codes) for s in samples]).tolist()
    assert sorted(s.score for s in ranked) == pytest.approx(sorted(direct), rel=1e-5)
    assert [s.score for s in ranked] == sorted((s.score for s in ranked), reverse=True)
    assert all(s.scorer == "likelihood" for s in ranked)
    best = m.edit(picture, "make it blue", seed=0, num_candidates=3)
    assert np.array_equal(np.asarray(best), np.asarray(ranked[0].image))
    two = m.edit([picture, picture], ["make it blue", "make it blue"], seed=0, num_candidates=3)
    assert len(two) == 2 and all(isinstance(i, Image.Image) for i in two)  # one best edit per pair
    with pytest.raises(CM3LeonError, match="num_candidates"):
        m.edit(picture, "make it blue", num_candidates=0)


def test_decoding_json_sets_how_many_edits_the_model_ranks(model_dir, tmp_path, picture, monkeypatch):
    d = tmp_path / "model"
    shutil.copytree(model_dir, d)
    (d / DECODING_FILE).write_text(json.dumps({"edit_candidates": 2}))
    tuned = CM3Leon.from_pretrained(d)
    seen = []
    real = tuned._rank_edits
    monkeypatch.setattr(tuned, "_rank_edits", lambda cond, ss: seen.append(len(ss)) or real(cond, ss))
    assert isinstance(tuned.edit(picture, "make it blue", seed=0), Image.Image) and seen == [2]
    out = tmp_path / "edits"
    assert main(["generate", "edit", "--model", str(d), "--image", str(_save(picture, tmp_path)),
                 "--instruction", "make it blue", "--seed", "0", "--edit-candidates", "3", "--out", str(out)]) == 0
    rows = [json.loads(l) for l in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["scorer"] == "likelihood" and rows[0]["score"] is not None


def _save(picture, folder):
    path = folder / "picture.png"
    picture.save(path)
    return path


def test_edit_and_infill_return_images_and_infill_keeps_codes_outside_the_span(m, picture, monkeypatch):
    assert isinstance(m.edit(picture, "make it blue", seed=0), Image.Image)
    original = m.encode_image(picture)
    seen = []
    real = m.decode_images
    monkeypatch.setattr(m, "decode_images", lambda codes: seen.extend(codes) or real(codes))
    out = m.infill_image(picture, (0.0, 0.0, 0.5, 0.5), seed=0)  # top-left 2x2 cells of 4x4
    assert isinstance(out, Image.Image)
    new = seen[0]
    keep = [i for i in range(16) if not (i // 4 < 2 and i % 4 < 2)]
    assert [new[i] for i in keep] == [original[i] for i in keep]


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "CMYK", "1"])
def test_images_of_any_mode_and_size_are_converted(m, mode):
    im = Image.new("RGB", (53, 31), (200, 30, 30)).convert(mode)
    p = prepare_image(im, 16)
    assert p.mode == "RGB" and p.size == (16, 16)
    assert len(m.encode_image(im)) == 16
    assert len(m.encode_image(np.zeros((7, 9, 3), dtype=np.uint8))) == 16


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(cfg_scale=-1.0), "cfg_scale"),
        (dict(temperature=-0.5), "temperature"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=0), "top_k"),
        (dict(method="cdk", cdk_alpha=3.0), "cdk_alpha"),
        (dict(method="cdk", cdk_k=0), "cdk_k"),
        (dict(method="beam"), "method"),
        (dict(n=0), "n must"),
        (dict(n=200000), "n must be an integer in"),
        (dict(temperature=True), "temperature"),
        (dict(temperature=1e-40), "temperature"),
        (dict(cfg_scale=1e38), "cfg_scale"),
        (dict(cfg_scale=float("nan")), "cfg_scale"),
        (dict(seed=2**64), "seed"),
        (dict(seed=-1), "seed"),
    ],
)
def test_bad_decoding_arguments_name_the_argument(m, kwargs, name):
    with pytest.raises(CM3LeonError, match=name):
        m.text_to_image("a red circle", **kwargs)


def test_image_arrays_are_read_by_their_dtype(m):
    grey = np.full((8, 8, 3), 128, dtype=np.uint8)
    same = [grey, grey.astype(np.int64), (grey.astype(np.uint16) * 257), grey.astype(np.float32) / 255]
    codes = [list(m.encode_image(a)) for a in same]
    assert all(c == codes[0] for c in codes)
    for bad, match in ((grey.astype(np.int64) * 3, "0..255"), (grey.astype(np.float32), r"\[0, 1\]"),
                       (np.full((8, 8, 3), np.nan, dtype=np.float32), "NaN"), (grey > 0, "boolean"),
                       (np.zeros((8, 8, 2), dtype=np.uint8), "HxWxC")):
        with pytest.raises(CM3LeonError, match=match):
            m.encode_image(bad)


def test_bad_image_files_and_text_are_named_errors_before_any_work(m, tmp_path, monkeypatch):
    import struct
    import zlib

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    big = tmp_path / "big.png"  # a PNG header claiming 20000 x 20000 pixels, never decoded
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0))
                    + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))
    with pytest.raises(CM3LeonError, match="big.png: not a usable image.*decompression_bomb"):
        m.image_to_text(big)
    with pytest.raises(CM3LeonError, match="prompt is not valid Unicode"):
        m.text_to_image("a red \ud800 circle")
    # a megabyte prompt: cut to what the context can hold before it is tokenized
    seen = []
    real = m.prompts.tok.encode
    monkeypatch.setattr(m.prompts.tok, "encode", lambda s, *a, **k: seen.append(len(s)) or real(s, *a, **k))
    with pytest.warns(UserWarning, match=r"tokens\+?; truncated"):
        m.text_to_image("a red circle " * 80000, seed=0)
    assert max(seen) <= m.model.config.max_seq_len * 64


def test_bad_task_inputs_give_clear_errors(m, picture):
    with pytest.raises(CM3LeonError, match="prompt is empty"):
        m.text_to_image("")
    with pytest.raises(CM3LeonError, match="image_guidance"):
        m.edit(picture, "make it blue", image_guidance=-1.0)
    with pytest.raises(CM3LeonError, match="not found"):
        m.image_to_text("/nonexistent/picture.png")
    with pytest.raises(CM3LeonError, match="expected|PIL"):
        m.image_to_text(42)
    with pytest.raises(CM3LeonError, match="max_seq_len"):
        m.image_to_text(picture, max_new_tokens=500)
    with pytest.warns(UserWarning, match="truncated"):
        assert isinstance(m.text_to_image("a red circle " * 60, seed=0), Image.Image)


@pytest.mark.parametrize("rel", [r for r, _ in REQUIRED_FILES])
def test_model_dir_missing_a_part_names_the_file(model_dir, tmp_path, rel):
    d = tmp_path / "model"
    shutil.copytree(model_dir, d)
    (d / rel).unlink()
    with pytest.raises(CM3LeonError, match=rel.replace(".", r"\.")):
        CM3Leon.from_pretrained(d)


def test_cli_writes_pngs_and_samples_jsonl(model_dir, tmp_path, picture, capsys):
    out = tmp_path / "out"
    rc = main(["generate", "image", "a red circle", "--model", str(model_dir),
               "--prompt", "a blue square", "--n", "2", "--method", "cfg", "--out", str(out), "--seed", "3"])
    assert rc == 0
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["0000_0.png", "0000_1.png", "0001_0.png", "0001_1.png"]
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and rows[0]["prompt"] == "a red circle" and rows[2]["seed"] == 4
    assert rows[0]["settings"]["guidance"]["cfg_scale"] == 3.0 and rows[0]["file"] == "0000_0.png"
    assert Image.open(out / "0001_1.png").size == (16, 16)
    img_path = tmp_path / "in.png"
    picture.save(img_path)
    assert main(["generate", "caption", "--model", str(model_dir), "--image", str(img_path), "--out", str(out),
                 "--max-new-tokens", "4"]) == 0
    assert main(["generate", "edit", "--model", str(model_dir), "--image", str(img_path),
                 "--instruction", "make it blue", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["task"] for r in rows] == ["image"] * 4 + ["caption", "edit"]
    assert (out / "0002_0.png").is_file()  # later runs never overwrite earlier images


def test_cli_reports_a_bad_model_dir_without_a_traceback(tmp_path, capsys):
    rc = main(["generate", "image", "--model", str(tmp_path / "nope"), "--prompt", "x", "--out", str(tmp_path)])
    assert rc == 2 and "model directory not found" in capsys.readouterr().err


class _FakeRetrieval:
    """Stands in for `cm3leon.retrieval.index.Retrieval` (same call, same document dicts)."""

    def __init__(self, text):
        self.text, self.calls = text, []

    def retrieve_for_prompt(self, text=None, image=None, k=2):
        self.calls.append((text, k))
        docs = [{"key": "d0", "text": self.text, "code_index": 0, "image_codes": list(range(16)), "score": 0.8},
                {"key": "d1", "text": self.text, "code_index": 1, "image_codes": None, "score": 0.7}]
        return docs[:k]


class _FakeScorer:
    def clip_score(self, images, texts):
        # Deterministic score: brightness of the image, so the ranking is checkable.
        return torch.tensor([float(np.asarray(im).mean()) for im in images])


def test_retrieved_documents_go_into_both_streams_and_clip_score_reranks(m, monkeypatch):
    fake = _FakeRetrieval("a blue square")
    monkeypatch.setattr(m, "retrieval", fake)
    monkeypatch.setattr(m, "retriever", _FakeScorer())
    seen = []
    import cm3leon.api as api

    real = api.generate

    def spy(model, prompts, constraint, **kw):
        seen.append((prompts, kw.get("guidance_prompts")))
        return real(model, prompts, constraint, **kw)

    monkeypatch.setattr(api, "generate", spy)
    samples = m.sample_images("a red circle", n=4, method="best_of_n", num_candidates=4, seed=0)
    doc = m.prompts.document(api.Document(m.text_tokenizer.encode("a blue square"), list(range(16))))
    cond, uncond = seen[0][0][0], seen[0][1][0][0]
    assert cond[1:1 + len(doc)] == doc and uncond[1:1 + len(doc)] == doc  # retrieved docs kept in uncond
    assert uncond[1 + len(doc):] == [m.vocab.mask_id(0), m.vocab.break_id]
    assert samples[0].retrieved == ["d0"]  # the document without image codes is skipped
    assert [s.scorer for s in samples] == ["clip"] * 4
    bright = [float(np.asarray(s.image).mean()) for s in samples]
    assert bright == sorted(bright, reverse=True)
    # scorer="likelihood" ranks by the model's own caption likelihood even with a retriever
    own = m.sample_images("a red circle", n=4, method="best_of_n", num_candidates=4, seed=0, scorer="likelihood")
    assert [s.scorer for s in own] == ["likelihood"] * 4
    text = m.prompts.text("a red circle") + [m.vocab.eoss_id]
    direct = [float(api.sequence_logprob(m.model, [m.prompts.caption(s.codes, len(text)).cond], [text])[0])
              for s in own]
    assert [s.score for s in own] == pytest.approx(direct, rel=1e-4) and direct == sorted(direct, reverse=True)


def test_decoding_json_sets_the_models_text_to_image_defaults_and_arguments_override_it(model_dir, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(model_dir, d)
    plain = CM3Leon.from_pretrained(d)
    assert plain.decoding == DecodingConfig() and plain.decoding.model_defaults() == {
        "method": "cfg", "cfg_scale": 3.0, "temperature": 1.0, "num_retrieved": 2,
        "cdk_k": 10, "num_candidates": 8,  # the paper's (CD-K's k and best-of-N's N: ours)
        "image_guidance": 1.5, "text_guidance": 7.5, "caption_candidates": 1, "edit_candidates": 1,
        "answer_candidates": 1, "scorer": "auto"}
    (d / DECODING_FILE).write_text(json.dumps({"cfg_scale": 1.5, "num_retrieved": 0, "cdk_k": 1}))
    tuned = CM3Leon.from_pretrained(d)
    assert tuned.decoding.model_defaults() == {"method": "cfg", "cfg_scale": 1.5, "temperature": 1.0,
                                               "num_retrieved": 0, "cdk_k": 1, "num_candidates": 8,
                                               "image_guidance": 1.5, "text_guidance": 7.5,
                                               "caption_candidates": 1, "edit_candidates": 1,
                                               "answer_candidates": 1, "scorer": "auto"}
    # the sampling temperature the model draws best at is one of its defaults too
    (d / DECODING_FILE).write_text(json.dumps({"cfg_scale": 1.5, "temperature": 0.5}))
    cool = CM3Leon.from_pretrained(d)
    assert cool.decoding.temperature == 0.5
    assert cool.sample_images("a blue square", method="cfg", seed=3)[0].codes == \
        plain.sample_images("a blue square", method="cfg", cfg_scale=1.5, temperature=0.5, seed=3)[0].codes
    (d / DECODING_FILE).write_text(json.dumps({"cfg_scale": 1.5, "num_retrieved": 0, "cdk_k": 1}))
    tuned = CM3Leon.from_pretrained(d)
    cdk = tuned.sample_images("a blue square", method="cdk", seed=3)[0]
    assert cdk.settings["guidance"]["cdk_k"] == 1
    assert cdk.codes == plain.sample_images("a blue square", method="cdk", cdk_k=1, seed=3)[0].codes
    default = tuned.sample_images("a blue square", method="cfg", seed=3)[0]
    assert default.settings["guidance"] == {"method": "cfg", "cfg_scale": 1.5}
    assert default.codes == plain.sample_images("a blue square", method="cfg", cfg_scale=1.5, seed=3)[0].codes
    batch = tuned.sample_images(["a blue square", "a red circle"], method="cfg", seed=3)
    assert [s.settings["guidance"]["cfg_scale"] for s in batch] == [1.5, 1.5]
    config = tuned.sample_images("a blue square", decoding=DecodingConfig(cfg_scale=1.5), seed=3)[0]
    assert config.codes == default.codes  # a whole DecodingConfig in place of the model's
    given = tuned.sample_images("a blue square", method="cfg", cfg_scale=4.0, seed=3)[0]
    assert given.settings["guidance"]["cfg_scale"] == 4.0
    # a model may recommend its text->image method and best-of-N's N too
    (d / DECODING_FILE).write_text(json.dumps({"method": "best_of_n", "num_candidates": 2}))
    ranked = CM3Leon.from_pretrained(d).sample_images("a blue square", seed=3)
    assert len(ranked) == 1 and ranked[0].score is not None  # one image: the best of 2 candidates


def test_decoding_json_sets_the_models_editing_guidance_and_temperature(model_dir, tmp_path, picture):
    """Editing draws with the model's decoding.json scales and temperature (the paper's 1.5 / 7.5
    at temperature 1 without one); arguments override them."""
    d = tmp_path / "model"
    shutil.copytree(model_dir, d)
    plain = CM3Leon.from_pretrained(d)
    paper = plain.edit_samples(picture, "make it blue", seed=4)[0]
    assert paper.settings["guidance"] == {"method": "edit", "image_guidance": 1.5, "text_guidance": 7.5}
    assert paper.settings["temperature"] == 1.0
    (d / DECODING_FILE).write_text(json.dumps({"image_guidance": 1.0, "text_guidance": 1.5, "temperature": 0.5}))
    tuned = CM3Leon.from_pretrained(d)
    own = tuned.edit_samples(picture, "make it blue", seed=4)[0]
    assert own.settings["guidance"] == {"method": "edit", "image_guidance": 1.0, "text_guidance": 1.5}
    assert own.settings["temperature"] == 0.5
    assert own.codes == plain.edit_samples(picture, "make it blue", image_guidance=1.0, text_guidance=1.5,
                                           temperature=0.5, seed=4)[0].codes
    given = tuned.edit_samples(picture, "make it blue", text_guidance=7.5, temperature=1.0, seed=4)[0]
    assert given.settings["guidance"]["text_guidance"] == 7.5 and given.codes != own.codes
    assert given.codes == plain.edit_samples(picture, "make it blue", image_guidance=1.0, seed=4)[0].codes


@pytest.mark.parametrize("content, field", [
    ({"cfg_scale": "high"}, "cfg_scale"), ({"num_retrieved": 1.5}, "num_retrieved"),
    ({"num_retrieved": -1}, "num_retrieved"), ({"cdk_k": 0}, "cdk_k"), ({"top_p": 0.5}, "unknown"),
    ({"temperature": -1}, "temperature"), ({"text_guidance": -2}, "text_guidance"),
    ({"image_guidance": "x"}, "image_guidance"), ({"scorer": "vibes"}, "scorer"),
    ({"caption_candidates": 0}, "caption_candidates"), ({"edit_candidates": 1.5}, "edit_candidates"),
    ({"answer_candidates": 257}, "answer_candidates"), ([1, 2], "JSON object"),
])
def test_a_bad_decoding_json_names_the_file_and_field(model_dir, tmp_path, content, field):
    d = tmp_path / "model"
    shutil.copytree(model_dir, d)
    (d / DECODING_FILE).write_text(json.dumps(content))
    with pytest.raises(CM3LeonError, match=rf"decoding\.json.*{field}"):
        CM3Leon.from_pretrained(d)
